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
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from shotstream_jax import loading
from shotstream_jax.data import loader as loader_lib
from shotstream_jax.data import precompute as pc
from shotstream_jax.models import random_init
from shotstream_jax.models import vae as vae_lib

SOURCES = ('storyworld', 'precomputed')
NEGATIVES = ('auto', 'precomputed', 'zeros')


def make_iterator(source, transform: Callable, *, batch_size: int, read_threads: int = 2,
                  prefetch: int = 4, **kwargs):
  """A grain iterator with get_state()/set_state(): shard -> shuffle per epoch -> repeat ->
  transform(record, rng) -> batch (data/loader.py; `kwargs` are its make_dataset's)."""
  if batch_size < 1:
    raise ValueError(f'data.batch_size: need >= 1 per process, got {batch_size}')
  return loader_lib.make_iterator(source, batch_size=batch_size, random_transform=transform,
                                  read_threads=read_threads, prefetch=prefetch, **kwargs)


def train_iterator(config, train_dir: str, transform: Callable, shard_index: int,
                   shard_count: int, batch_size: int):
  """The endless, shuffled, checkpointable training iterator of a stage (config.data)."""
  d = config.data
  return make_iterator(pc.PrecomputedSource(train_dir), transform, batch_size=batch_size,
                       seed=d.seed, shuffle=d.shuffle, shard_index=shard_index,
                       shard_count=shard_count, read_threads=d.read_threads, prefetch=d.prefetch)


def heldout_batches(config, heldout_dir: str, transform: Callable, batch_size: int,
                    limit: int = 0) -> list:
  """A fixed list of held-out batches (same examples every evaluation); `limit` 0 = all.

  The per-example randomness (which shot is the target) is seeded by `train.eval_seed`.
  """
  source = pc.PrecomputedSource(heldout_dir)
  it = make_iterator(source, transform, batch_size=batch_size,
                     seed=config.train.eval_seed, shuffle=False, num_epochs=1,
                     shard_index=jax.process_index(), shard_count=jax.process_count(),
                     read_threads=1, prefetch=1)
  batches = list(it)
  if not batches:   # drop_remainder: a split smaller than one batch would skip eval silently
    raise ValueError(f'data.batch_size: {batch_size} per process is more than the '
                     f'{len(source)} held-out examples of '
                     f'{heldout_dir}; lower it or set train.eval_every=0')
  return batches[:limit] if limit else batches


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
  root = data_root(data_cfg, workdir)
  dirs = tuple(os.path.join(root, split) for split in ('train', 'heldout'))
  if all(os.path.exists(os.path.join(d, pc.META_FILE)) for d in dirs) and \
     all(precomputed_complete(d) for d in dirs):
    return dirs
  sources, name = storyworld_sources(data_cfg.storyworld, root)
  if jax.process_index() == 0:
    _encode_storyworld(data_cfg, config, sources, name, dirs)
  _sync('storyworld prepared')
  return dirs


def negative_text(mode: str, train_dir: str, text_len: int, text_dim: int,
                  field: str) -> np.ndarray:
  """The unconditional text rows [text_len, text_dim] of classifier-free guidance.

  'precomputed': the negative prompt's embedding stored by precompute (the reference: Wan's
  negative prompt); 'zeros': a zero embedding (what prompt dropout trains a from-scratch
  teacher on); 'auto': precomputed when the shards hold it, else zeros. `field` names the
  config field in errors.
  """
  if mode not in NEGATIVES:
    raise ValueError(f'{field}: unknown {mode!r}; accepted: {", ".join(NEGATIVES)}')
  have = os.path.exists(os.path.join(train_dir, pc.NEGATIVE_FILE))
  if mode == 'precomputed' and not have:
    raise ValueError(f'{field}: precomputed, but {train_dir} has no {pc.NEGATIVE_FILE}; use '
                     'auto or zeros')
  if mode == 'zeros' or not have:
    return np.zeros((text_len, text_dim), np.float32)
  return pc.PrecomputedSource(train_dir).negative().astype(np.float32)


def latent_stats(train_dir: str, max_examples: int = 256):
  """(mean, variance) per latent channel over the first examples of precomputed shards."""
  source = pc.PrecomputedSource(train_dir, pad_text=False)
  latents = [np.asarray(source[i]['latents'], np.float64)
             for i in range(min(max_examples, len(source)))]
  z = np.concatenate([x.reshape(-1, x.shape[-1]) for x in latents])
  return (jnp.asarray(z.mean(0), jnp.float32), jnp.asarray(z.var(0), jnp.float32))


def data_root(data_cfg, workdir: str) -> str:
  """Where source='storyworld' data lives: `data.dir`, default <workdir>/data."""
  return data_cfg.dir or os.path.join(workdir, 'data')


def storyworld_sources(storyworld_cfg, root: str):
  """({'train', 'heldout'} random-access sources of StoryWorld *pixels*, builder name): the
  tfds builder sized by `storyworld_cfg` (configs/data.py), built under <root>/tfds on first
  use and reused after. What stage 0 (the VAE) trains on and what precompute encodes."""
  from shotstream_jax.data import storyworld_builder  # pylint: disable=g-import-not-at-top
  builder = storyworld_builder.StoryWorld(cfg=storyworld_cfg, data_dir=os.path.join(root, 'tfds'))
  if jax.process_index() == 0:
    builder.download_and_prepare()
  _sync('storyworld pixels prepared')
  return builder.as_data_source(), builder.builder_config.name


def _sync(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def precomputed_complete(out_dir: str) -> bool:
  """Whether `out_dir` holds finished precomputed shards (an interrupted run's do not count)."""
  try:
    pc.PrecomputedSource(out_dir)
    return True
  except FileNotFoundError:
    return False


def _encode_storyworld(data_cfg, config, sources, name, dirs):
  """Precompute StoryWorld with the preset's VAE / umT5 at random weights (`tiny` only)."""
  seed = config.seed   # the same embedded encoders generation builds (configs/shotstream.py)
  encoders = pc.Encoders(
      vae_lib.WanVAE(config.vae), random_init.embedded_vae(config.vae, seed),
      loading.embedded_prompt_encoder(config, seed),
      {'vae': f'embedded(seed={seed})', 'text': f'embedded(seed={seed})', 'tokenizer': 'hash'})
  for split, out in zip(('train', 'heldout'), dirs):
    pc.precompute(sources[split], out, encoders, context_frames=config.model.context_frames,
                  source_name=f'storyworld/{name}:{split}', progress=False)


def flatten_tables(rows, *caption_ids):
  """(table [B R, L, d], *ids): per-example caption tables rows [B, R, L, d] stacked into one
  table, which the DiT's cross-attention reads once for the whole batch, and each array of
  caption-row ids [B, ...] offset by R b so that it indexes its own example's rows."""
  b, r = rows.shape[:2]
  off = r * jnp.arange(b, dtype=jnp.int32)
  table = rows.reshape((b * r,) + rows.shape[2:])
  return (table,) + tuple(ids + off.reshape((b,) + (1,) * (ids.ndim - 1)) for ids in caption_ids)
