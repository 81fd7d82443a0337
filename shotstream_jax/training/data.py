"""Training inputs: precomputed shards -> per-example random crops -> host-local batches.

    train_dir, heldout_dir = prepare(config.data, config, workdir)   # StoryWorld built if asked
    it = make_iterator(PrecomputedSource(train_dir), make_example, batch_size=..., seed=...)
    batch = next(it); state = it.get_state(); it.set_state(state)    # exact resume

The per-example transform gets a numpy Generator seeded by grain from (seed, position in the
stream), so which shot is the target, like the order, is a pure function of the iterator
position: restoring the iterator state replays the same batches. Everything stochastic inside
the step (noise, timesteps, dropout) comes from the train state's PRNG key instead.
"""

import os
from typing import Callable, Optional

import grain
import jax

from shotstream_jax.data import loader as loader_lib
from shotstream_jax.data import precompute as pc

SOURCES = ('storyworld', 'precomputed')


def make_dataset(source, transform: Callable, *, batch_size: int, seed: int = 0,
                 shuffle: bool = True, num_epochs: Optional[int] = None,
                 drop_remainder: bool = True, shard_index: Optional[int] = None,
                 shard_count: Optional[int] = None) -> grain.MapDataset:
  """shard -> shuffle per epoch -> repeat -> random transform(record, rng) -> batch."""
  shard_index, shard_count = loader_lib.host_slice(shard_index, shard_count, 'data shard')
  if batch_size < 1:
    raise ValueError(f'data.batch_size: need >= 1 per process, got {batch_size}')
  if len(source) < shard_count:
    raise ValueError(f'data: {len(source)} examples, fewer than {shard_count} processes')
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds.random_map(transform, seed=seed)
  return ds.batch(batch_size, drop_remainder=drop_remainder)


def make_iterator(source, transform: Callable, *, read_threads: int = 2, prefetch: int = 4,
                  **kwargs):
  """A grain iterator with get_state()/set_state() over `make_dataset(...)`."""
  ds = make_dataset(source, transform, **kwargs)
  options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(options))


def prepare(data_cfg, config, workdir: str):
  """(train_dir, heldout_dir) of precomputed shards named by `data_cfg`.

  source='precomputed': the folders written by launch/precompute.py (real VAE / umT5 weights).
  source='storyworld': builds StoryWorld sized by `data_cfg.storyworld` (configs/data.py) and
  precomputes it with the preset's VAE and umT5 at RANDOM weights and a hash tokenizer, into
  `data_cfg.dir` (default <workdir>/data). That is honest only for the `tiny` model: the
  latents are a fixed random encoding of StoryWorld pixels. Finished shards are reused.
  """
  if data_cfg.source not in SOURCES:
    raise ValueError(f'data.source: unknown {data_cfg.source!r}; accepted: {", ".join(SOURCES)}')
  if data_cfg.source == 'precomputed':
    for field in ('train_dir', 'heldout_dir'):
      if not data_cfg[field]:
        raise ValueError(f'data.{field}: required with data.source=precomputed (a folder '
                         'written by launch/precompute.py)')
    return data_cfg.train_dir, data_cfg.heldout_dir
  root = data_cfg.dir or os.path.join(workdir, 'data')
  dirs = tuple(os.path.join(root, split) for split in ('train', 'heldout'))
  if all(os.path.exists(os.path.join(d, pc.META_FILE)) for d in dirs) and \
     all(_complete(d) for d in dirs):
    return dirs
  if jax.process_index() == 0:
    _build_storyworld(data_cfg, config, root, dirs)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('storyworld prepared')
  return dirs


def _complete(out_dir: str) -> bool:
  try:
    pc.PrecomputedSource(out_dir)
    return True
  except FileNotFoundError:
    return False


def _build_storyworld(data_cfg, config, root, dirs):
  # pylint: disable=g-import-not-at-top
  from shotstream_jax import text as text_lib
  from shotstream_jax.data import storyworld_builder
  from shotstream_jax.models import random_init, tokenizer, umt5
  from shotstream_jax.models import vae as vae_lib
  builder = storyworld_builder.StoryWorld(cfg=data_cfg.storyworld,
                                          data_dir=os.path.join(root, 'tfds'))
  builder.download_and_prepare()
  vae = vae_lib.WanVAE(config.vae)
  seed = data_cfg.encoder_seed
  text_params = random_init.random_params(umt5.param_shapes(config.text), seed + 1)
  tok = tokenizer.HashTokenizer(config.text.text_len, config.text.vocab_size)
  encoders = pc.Encoders(
      vae, random_init.random_params(vae_lib.param_shapes(vae), seed),
      text_lib.PromptEncoder(text_params, config.text, tok),
      {'vae': f'random(seed={seed})', 'text': f'random(seed={seed + 1})', 'tokenizer': 'hash'})
  sources = builder.as_data_source()
  for split, out in zip(('train', 'heldout'), dirs):
    pc.precompute(sources[split], out, encoders, context_frames=config.model.context_frames,
                  source_name=f'storyworld/{builder.builder_config.name}:{split}',
                  progress=False)
