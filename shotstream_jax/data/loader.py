"""Deterministic, shardable, checkpointable batches over array_record data sources (grain).

    source = builder.as_data_source()['train']
    it = make_iterator(source, batch_size=8, seed=0, pad=PadStory(max_shots=4, frames_per_shot=9))
    batch = next(it)
    state = it.get_state()           # a small dict: store it with the training checkpoint
    it.set_state(state)              # resumes with exactly the batches that would have followed

Order is a pure function of (seed, shard_index, shard_count): each host reads its own slice
`source[shard_index::shard_count]`, shuffled globally per epoch (a new permutation every epoch)
and batched across epoch boundaries. The iterator state is the position in that sequence, so
restoring it replays nothing and skips nothing.
"""

import dataclasses
from typing import Any, Callable, Optional, Sequence

import grain
import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class PadStory:
  """Pads a variable-length story to fixed shapes so that examples batch.

  frames and per-frame arrays -> max_shots * frames_per_shot frames (shot_index -1 on padding,
  `frame_mask` marks real frames); per-shot arrays and captions -> max_shots (captions b'').
  Examples with more shots are cut to `max_shots`.
  """
  max_shots: int
  frames_per_shot: int
  frame_keys: Sequence[str] = ('frames', 'shot_index', 'frame_index')
  shot_keys: Sequence[str] = ('framing', 'motion', 'frame_ranges')

  def __call__(self, ex: dict) -> dict:
    ex = dict(ex)
    n_shots = min(len(ex['shot_captions']), self.max_shots)
    keep = np.asarray(ex['shot_index']) < n_shots
    max_frames = self.max_shots * self.frames_per_shot
    n_frames = min(int(keep.sum()), max_frames)
    for k in self.frame_keys:
      if k in ex:
        fill = -1 if k == 'shot_index' else 0
        ex[k] = _pad(np.asarray(ex[k])[keep][:max_frames], max_frames, fill)
    for k in self.shot_keys:
      if k in ex:
        ex[k] = _pad(np.asarray(ex[k])[:n_shots], self.max_shots, -1)
    caps = [_as_bytes(c) for c in list(ex['shot_captions'])[:n_shots]]
    ex['shot_captions'] = np.array(caps + [b''] * (self.max_shots - n_shots), dtype=object)
    ex['frame_mask'] = np.arange(max_frames) < n_frames
    ex['num_shots'] = np.int32(n_shots)
    return ex


def _pad(x: np.ndarray, n: int, fill) -> np.ndarray:
  out = np.full((n,) + x.shape[1:], fill, x.dtype)
  out[:len(x)] = x
  return out


def _as_bytes(x) -> bytes:
  if isinstance(x, np.ndarray):
    x = x.item()
  return x if isinstance(x, bytes) else str(x).encode()


def host_slice(index: Optional[int], count: Optional[int], field: str):
  """(index, count) of this host's slice; defaults to jax.process_index()/process_count()."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  if not 0 <= index < count:
    raise ValueError(f'{field}: need 0 <= index < count, got {index}/{count}')
  return index, count


def make_dataset(source, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                 num_epochs: Optional[int] = None, drop_remainder: bool = True,
                 shard_index: Optional[int] = None, shard_count: Optional[int] = None,
                 pad: Optional[Callable[[dict], dict]] = None,
                 transform: Optional[Callable[[dict], Any]] = None,
                 random_transform: Optional[Callable[[dict, Any], Any]] = None
                 ) -> grain.MapDataset:
  """The grain MapDataset: shard -> shuffle per epoch -> repeat -> pad/transform -> batch.

  `random_transform(record, rng)` gets a numpy Generator seeded from (seed, position in the
  stream), so its draws too replay exactly after `set_state`.
  """
  shard_index, shard_count = host_slice(shard_index, shard_count, 'shard_index/shard_count')
  if batch_size < 1:
    raise ValueError(f'batch_size: need >= 1, got {batch_size}')
  if len(source) < shard_count:
    raise ValueError(f'source has {len(source)} examples, fewer than shard_count={shard_count}')
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)   # reseeds the shuffle every epoch
  if pad is not None:
    ds = ds.map(pad)
  if transform is not None:
    ds = ds.map(transform)
  if random_transform is not None:
    ds = ds.random_map(random_transform, seed=seed)
  return ds.batch(batch_size, drop_remainder=drop_remainder)


def make_iterator(source, *, read_threads: int = 2, prefetch: int = 4, **kwargs):
  """An iterator with get_state()/set_state() over `make_dataset(source, **kwargs)`."""
  ds = make_dataset(source, **kwargs)
  options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(options))


def from_config(source, cfg, pad=None, **overrides):
  """`make_iterator` with the `loader` section of configs/data.py."""
  kwargs = dict(batch_size=cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle,
                num_epochs=cfg.num_epochs, drop_remainder=cfg.drop_remainder, pad=pad)
  kwargs.update(overrides)
  return make_iterator(source, **kwargs)
