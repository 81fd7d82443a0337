"""Whole stories as one pure, jitted, batched function: every shot, its context, its decode.

    gen = story.StoryGenerator(sampler, vae, num_shots=4, frames_per_shot=21, budget=6)
    frames = gen(dit_params, vae_params, rows, seeds)   # rows [B, S, L, D] -> uint8 [B, S*F, H, W, 3]

`StorySession` (pipeline.py) is the interactive path: one shot at a time, prompts arriving while
the story streams, Python deciding the context. When all prompts are known up front (evaluation
over a test set, sharded over a TPU slice) the context choice is static: every shot of a
generated story has the same length, so which earlier frames shot s conditions on depends only
on s (context.choose_context). This module turns that choice into index tables and runs the
story as one `lax.scan` over shots, vmapped over stories:

  per shot s: caption table rows = rows[caption_shots[s]] -> cross-attention K/V;
              context latents = the VAE encoding of the chosen decoded frames (zeros for the
              first shot, and for every shot with sampling.context='none');
              latents = sampler.shot (prefill + scan over chunks); frames = whole-shot decode.

Only the decoded frames some later shot may pick are kept in float (a few per shot,
context.context_candidates); the video is kept as uint8. A story's noise comes from its seed
alone (`jax.random.key(seed)`, shot s from fold_in(key, s), as in StorySession), so story i of
a batch is the video `pipe.generate(story_i, seed_i, streaming=False)` makes, whatever else is
in the batch and however the batch is sharded.
"""

import contextlib
import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from shotstream_jax import context as context_lib
from shotstream_jax.io.video import to_uint8
from shotstream_jax.models import dit
from shotstream_jax.models import vae as vae_lib
from shotstream_jax.sampling import causal


@dataclasses.dataclass(frozen=True)
class StoryTables:
  """Static per-shot context tables of an S-shot story (numpy, built once per S).

  ctx_slot [S, Cf]: row of each context frame in the candidate buffer (0 for a first shot).
  ctx_shot / ctx_caption [S, Cf], gen_shot / gen_caption [S]: RoPE shot ids and caption rows.
  caption_shots [S, Cf + 1]: which shot's prompt fills each caption-table row.
  has_context [S]: False where the context latents are zeros.
  keep_frame / keep_slot [S, K]: after shot s, its decoded frame keep_frame[s, k] goes to buffer
    row keep_slot[s, k] (padding entries write to the last, never-read row).
  """
  ctx_slot: np.ndarray
  ctx_shot: np.ndarray
  ctx_caption: np.ndarray
  gen_shot: np.ndarray
  gen_caption: np.ndarray
  caption_shots: np.ndarray
  has_context: np.ndarray
  keep_frame: np.ndarray
  keep_slot: np.ndarray

  @property
  def num_slots(self) -> int:
    """Candidate-buffer rows, the trash row included."""
    return int(self.keep_slot.max()) + 1


def story_tables(num_shots: int, frames_per_shot: int, budget: int,
                 context: str = 'history') -> StoryTables:
  """The tables of `num_shots` shots of `frames_per_shot` frames (see StoryTables)."""
  if num_shots < 1:
    raise ValueError(f'story: need >= 1 shot, got {num_shots}')
  lengths = [frames_per_shot] * num_shots
  choices = [context_lib.shot_context(context, lengths[:s], budget) for s in range(num_shots)]
  candidates = sorted({i for c in choices for i in c.frame_indices})
  slot = {frame: row for row, frame in enumerate(candidates)}
  trash = len(candidates)
  per_shot = [[i for i in candidates if i // frames_per_shot == s] for s in range(num_shots)]
  width = max(1, max(map(len, per_shot)))
  keep_frame = np.zeros((num_shots, width), np.int32)
  keep_slot = np.full((num_shots, width), trash, np.int32)
  for s, frames in enumerate(per_shot):
    keep_frame[s, :len(frames)] = [i - s * frames_per_shot for i in frames]
    keep_slot[s, :len(frames)] = [slot[i] for i in frames]
  i32 = lambda rows: np.asarray(rows, np.int32)
  return StoryTables(
      ctx_slot=i32([[slot[i] for i in c.frame_indices] or [0] * budget for c in choices]),
      ctx_shot=i32([c.ctx_shot for c in choices]),
      ctx_caption=i32([c.ctx_caption for c in choices]),
      gen_shot=i32([c.gen_shot for c in choices]),
      gen_caption=i32([c.gen_caption for c in choices]),
      caption_shots=i32([c.caption_shots for c in choices]),
      has_context=np.asarray([bool(c.frame_indices) for c in choices]),
      keep_frame=keep_frame, keep_slot=keep_slot)


class StoryGenerator:
  """`__call__(dit_params, vae_params, rows [B, S, L, D], seeds int [B])` -> uint8 frames
  [B, S * frames_per_shot, H, W, 3]: whole stories, one compilation per (B, S).

  `mesh`: stories are split over its 'data' axis (B a multiple of its size), weights
  replicated, and it is the ambient mesh while tracing (models/attention.py); without one,
  jit places everything on the default device.
  """

  def __init__(self, sampler: causal.CausalSampler, vae: vae_lib.WanVAE, num_shots: int,
               frames_per_shot: int, budget: int, context: str = 'history',
               mesh: Optional[jax.sharding.Mesh] = None):
    self.sampler, self.vae = sampler, vae
    self.frames_per_shot = frames_per_shot
    self.tables = story_tables(num_shots, frames_per_shot, budget, context)
    self.mesh = mesh
    self.compile_count = 0
    # spmd_axis_name: a shard_map inside (the splash kernel) splits the stories over 'data'.
    fn = jax.vmap(self._one_story, in_axes=(None, None, 0, 0),
                  spmd_axis_name=None if mesh is None else 'data')
    if mesh is None:
      self._fn = jax.jit(fn)
    else:
      P = jax.sharding.PartitionSpec
      named = functools.partial(jax.sharding.NamedSharding, mesh)
      self._fn = jax.jit(fn, in_shardings=(named(P()), named(P()), named(P('data')),
                                           named(P('data'))),
                         out_shardings=named(P('data')))

  def __call__(self, dit_params, vae_params, rows, seeds):
    rows = jnp.asarray(rows, jnp.float32)
    seeds = jnp.asarray(seeds, jnp.uint32)
    shots = len(self.tables.gen_shot)
    if rows.ndim != 4 or rows.shape[1] != shots or seeds.shape != rows.shape[:1]:
      raise ValueError(f'rows: expected [B, {shots}, text_len, dim] with seeds [B], got '
                       f'{tuple(rows.shape)} and {tuple(seeds.shape)}')
    if self.mesh is not None and rows.shape[0] % self.mesh.shape['data']:
      raise ValueError(f'batch: {rows.shape[0]} stories do not split over the mesh\'s '
                       f'{self.mesh.shape["data"]} data devices')
    ambient = (contextlib.nullcontext() if self.mesh is None else   # read by splash kernels
               jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh))
    with ambient:
      return self._fn(dit_params, vae_params, rows, seeds)

  def _one_story(self, dit_params, vae_params, rows, seed):
    """One story, traced with batch 1 inside (vmapped over stories by __init__)."""
    self.compile_count += 1
    sampler, vae, tab = self.sampler, self.vae, self.tables
    h, w = sampler.latent_hw
    key = jax.random.key(seed)
    text_kv_of = dit.WanTextKV(sampler.model_cfg).apply
    first = jnp.zeros((1, 1, h, w, sampler.model_cfg.in_channels), jnp.float32)
    probe = jax.eval_shape(lambda z: vae_lib.decode_step(
        vae, vae_params, vae_lib.init_decode_cache(vae, 1, h, w), z)[0], first)
    buffer = jnp.zeros((tab.num_slots,) + probe.shape[2:], jnp.float32)
    tables = {f.name: jnp.asarray(getattr(tab, f.name)) for f in dataclasses.fields(tab)}

    def shot(buffer, xs):
      s, t = xs['shot'], xs['tables']
      text_kv = text_kv_of({'params': dit_params}, rows[t['caption_shots']])
      ctx = jnp.swapaxes(vae_lib.encode_image(vae, vae_params, buffer[t['ctx_slot']]), 0, 1)
      plan = causal.ShotPlan(jnp.where(t['has_context'], ctx, 0.0), t['ctx_shot'][None],
                             t['ctx_caption'][None], t['gen_shot'][None],
                             t['gen_caption'][None], text_kv)
      latents = sampler.shot(dit_params, plan, jax.random.fold_in(key, s))
      frames = vae_lib.decode_step(vae, vae_params, vae_lib.init_decode_cache(vae, 1, h, w),
                                   latents)[0][0]
      buffer = buffer.at[t['keep_slot']].set(frames[t['keep_frame']])
      return buffer, to_uint8(frames, jnp)

    shots = len(tab.gen_shot)
    _, video = jax.lax.scan(shot, buffer, {'shot': jnp.arange(shots), 'tables': tables})
    return video.reshape((shots * video.shape[1],) + video.shape[2:])
