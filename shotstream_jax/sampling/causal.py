"""The streaming student: context prefill, chunk step, and a `lax.scan` over a shot's chunks.

Per shot (DESIGN 4.4): one bidirectional DiT pass over the clean context latents at t = 0 fills
the global cache; then every chunk starts from fresh noise, is denoised in the few warped steps
(re-noising each x0 prediction with fresh noise), and one more pass of the clean result at
`cache_timestep` writes its K/V into the local cache. A chunk attends to [global cache | local
cache | itself] with no mask. Everything here is a pure function of (params, plan, caches, key).
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from shotstream_jax.models import cache as cache_lib
from shotstream_jax.models import dit
from shotstream_jax.sampling import schedule

LOCAL_ATTENTION = ('filled', 'masked')


@flax.struct.dataclass
class ShotPlan:
  """Per-shot inputs, all fixed-shape arrays (one compilation for any story).

  ctx_latents: [B, Cf, h, w, C] clean context latents (zeros for the first shot).
  ctx_shot / ctx_caption: int32 [B, Cf] RoPE shot id and caption row of each context frame.
  gen_shot / gen_caption: int32 [B] the same for the frames being generated.
  text_kv: per-layer cross-attention (k, v) [L, N, L_text, H, Dh] of the caption table.
  """
  ctx_latents: jax.Array
  ctx_shot: jax.Array
  ctx_caption: jax.Array
  gen_shot: jax.Array
  gen_caption: jax.Array
  text_kv: Any


class CausalSampler:
  """Static structure (configs, latent size) + pure sampling functions of the student."""

  def __init__(self, model_cfg, sampling_cfg, latent_hw):
    self.model_cfg = model_cfg
    self.sampling_cfg = sampling_cfg
    self.latent_hw = tuple(latent_hw)
    check_layout(model_cfg, sampling_cfg, latent_hw)
    self.model = dit.WanDiT(model_cfg)
    self.timesteps, self.sigmas = schedule.sampling_schedule(sampling_cfg)
    ph, pw = model_cfg.patch_size[1:]
    self.tokens_per_frame = (self.latent_hw[0] // ph) * (self.latent_hw[1] // pw)
    self.chunk_frames = model_cfg.chunk_frames
    self.num_chunks = sampling_cfg.shot_latent_frames // self.chunk_frames
    self.local_tokens = sampling_cfg.local_frames * self.tokens_per_frame
    self.chunk_tokens = self.chunk_frames * self.tokens_per_frame
    # sampling.local_attention: 'filled' attends to the filled chunks only (block = a chunk)
    self.local_block = (self.chunk_tokens
                        if sampling_cfg.get('local_attention', 'filled') == 'filled' else 0)
    # No chunk of a shot overwrites another's K/V: the window holds the whole shot.
    self.local_holds_shot = self.num_chunks * self.chunk_tokens <= self.local_tokens

  # ------------------------------------------------------------------ pieces

  def prefill(self, params, plan: ShotPlan) -> cache_lib.KVCache:
    """Global context cache: the clean context frames at t = 0, bidirectional among themselves."""
    b, cf = plan.ctx_shot.shape
    _, kv = self.model.apply(
        {'params': params}, plan.ctx_latents, jnp.zeros((b, cf), jnp.float32),
        text_kv=plan.text_kv, frame_pos=jnp.arange(cf), frame_shot=plan.ctx_shot,
        frame_caption=plan.ctx_caption, return_kv=True)
    return cache_lib.from_kv(kv)

  def init_local(self, batch: int) -> cache_lib.KVCache:
    return cache_lib.init_cache(self.model_cfg, batch, self.local_tokens)

  def forward(self, params, plan: ShotPlan, global_cache, local_cache, index, x, t,
              return_kv: bool = False):
    """One DiT call on chunk `index`: x [B, n, h, w, C] at timesteps t [B, n], attending to
    [global cache | local cache | itself]. Returns the velocity (and the chunk's K/V)."""
    b, n = t.shape
    return self.model.apply(
        {'params': params}, x, t, text_kv=plan.text_kv,
        frame_pos=self.model_cfg.context_frames + index * n + jnp.arange(n),
        frame_shot=jnp.broadcast_to(plan.gen_shot[:, None], (b, n)),
        frame_caption=jnp.broadcast_to(plan.gen_caption[:, None], (b, n)),
        prefix_kv=[(global_cache.k, global_cache.v, None),   # always full
                   local_cache.segment(block=self.local_block)],
        return_kv=return_kv)

  def write_local(self, local_cache, kv, index):
    """Write chunk `index`'s K/V; a local window shorter than the shot is a ring buffer
    (attention ignores slot order, RoPE is already in the keys)."""
    offset = (index * self.chunk_tokens) % self.local_tokens
    return cache_lib.write(local_cache, kv, offset)

  def local_before(self, final_cache, index):
    """The local cache as chunk `index` read it, from the shot's final one: its first `index`
    chunks (only where `local_holds_shot`: no slot was overwritten since)."""
    if not self.local_holds_shot:
      raise ValueError('local_before: sampling.local_frames is shorter than a shot (a ring '
                       'buffer): earlier chunks were overwritten')
    length = jnp.asarray(index, jnp.int32) * self.chunk_tokens
    return cache_lib.KVCache(final_cache.k, final_cache.v, length)

  def noise_keys(self, key, index):
    """Keys of chunk `index`: [0] its starting noise, [i] the re-noising before step i."""
    return jax.random.split(jax.random.fold_in(key, index), len(self.sigmas))

  def chunk(self, params, plan: ShotPlan, global_cache, local_cache, index, key):
    """Denoise chunk `index` of the shot and write its clean K/V into the local cache.

    Returns (x0 [B, chunk, h, w, C], local_cache). The noise of every step derives from
    fold_in(key, index), so any schedule of calls gives the same video for the same key.
    """
    b, n = plan.gen_shot.shape[0], self.chunk_frames
    run = functools.partial(self.forward, params, plan, global_cache, local_cache, index)
    keys = self.noise_keys(key, index)
    shape = (b, n) + self.latent_hw + (self.model_cfg.in_channels,)
    x = jax.random.normal(keys[0], shape, jnp.float32)
    for i, (t, sigma) in enumerate(zip(self.timesteps, self.sigmas)):
      x0 = schedule.x0_from_velocity(x, run(x, jnp.full((b, n), t, jnp.float32)), sigma)
      if i + 1 < len(self.sigmas):
        x = schedule.add_noise(x0, jax.random.normal(keys[i + 1], shape, jnp.float32),
                               self.sigmas[i + 1])
    _, kv = run(x0, jnp.full((b, n), self.sampling_cfg.cache_timestep, jnp.float32),
                return_kv=True)
    return x0, self.write_local(local_cache, kv, index)

  # ------------------------------------------------------------------ whole shot

  def shot(self, params, plan: ShotPlan, key):
    """All latents of one shot [B, F, h, w, C]: prefill, then `lax.scan` over the chunks."""
    global_cache = self.prefill(params, plan)
    b = plan.gen_shot.shape[0]

    def body(local, index):
      x0, local = self.chunk(params, plan, global_cache, local, index, key)
      return local, x0

    _, xs = jax.lax.scan(body, self.init_local(b), jnp.arange(self.num_chunks))
    xs = jnp.swapaxes(xs, 0, 1)
    return xs.reshape((b, self.num_chunks * self.chunk_frames) + xs.shape[3:])


def check_layout(model_cfg, sampling_cfg, latent_hw) -> None:
  """One clear error for inconsistent chunk / shot / cache sizes."""
  n, shot = model_cfg.chunk_frames, sampling_cfg.shot_latent_frames
  if shot < 1:
    raise ValueError(f'sampling.shot_latent_frames: must be >= 1, got {shot}')
  if n < 1 or shot % n:
    raise ValueError(f'model.chunk_frames: must divide sampling.shot_latent_frames ({shot}), '
                     f'got {n}')
  if sampling_cfg.local_frames < n or sampling_cfg.local_frames % n:
    raise ValueError(f'sampling.local_frames: must be a positive multiple of model.chunk_frames '
                     f'({n}), got {sampling_cfg.local_frames}')
  if model_cfg.context_frames < 1:
    raise ValueError(f'model.context_frames: must be >= 1, got {model_cfg.context_frames}')
  ph, pw = model_cfg.patch_size[1:]
  if latent_hw[0] % ph or latent_hw[1] % pw:
    raise ValueError(f'sampling.height/width: latent size {tuple(latent_hw)} must be a multiple '
                     f'of the patch size {(ph, pw)}')
  if sampling_cfg.get('local_attention', 'filled') not in LOCAL_ATTENTION:
    raise ValueError(f'sampling.local_attention: unknown {sampling_cfg.local_attention!r}; '
                     f'accepted: {", ".join(LOCAL_ATTENTION)}')
  if np.any(np.asarray(sampling_cfg.denoising_steps) <= 0):
    raise ValueError('sampling.denoising_steps: must be positive')
