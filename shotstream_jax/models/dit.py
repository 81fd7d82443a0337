"""The Wan2.1 DiT as one Flax linen module for teacher, critic and student (DESIGN 4.1-4.3).

    velocity = WanDiT(config.model).apply({'params': params}, latents, timesteps, context,
                                          frame_pos=..., frame_shot=..., frame_caption=...,
                                          attention='bidirectional' | 'block_causal')

What ShotStream adds to Wan, and how it appears here:
  * one timestep per latent frame (`timesteps [B, F]`): the time embedding `e` and the six
    modulation vectors `e0` are per frame and broadcast over that frame's tokens;
  * a shot-aware temporal RoPE (`frame_pos`, `frame_shot`; see rope.py);
  * per-frame caption routing (`frame_caption` indexes rows of `context`), kept separate from the
    RoPE shot id;
  * the student's block-causal mask over [context frames | chunk 0 | chunk 1 | ...].

Param names mirror the original Wan checkpoint (`blocks`, `self_attn.q`, `norm3`, `ffn_0`,
`head.head`, ...), with the 30 blocks stacked on a leading layer axis (`nn.scan`). The residual
stream, norms, modulation and RoPE run in float32; matmuls and attention in `config.dtype`.

Cached modes (the streaming student) use two seams: `return_kv=True` returns every layer's
post-RoPE self-attention K/V, and `prefix_kv=[(k, v, valid), ...]` lets the queries attend to extra
per-layer K/V (the global and local caches) in front of their own.
"""

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from shotstream_jax.models import attention as attn_lib
from shotstream_jax.models import common
from shotstream_jax.models.common import dtype_of
from shotstream_jax.models import rope as rope_lib
from shotstream_jax.sampling import schedule

def timestep_sinusoid(t, dim: int):
  """Wan's timestep features: [cos | sin] of t * 10000**(-j/(dim/2)), float32."""
  half = dim // 2
  freqs = jnp.exp(-np.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  arg = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)


def _xavier(axes):
  return nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes)


def _zeros(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _ones(axes):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def Dense(features: int, axes: tuple, dtype=jnp.float32, zero_init: bool = False, name=None):
  """nn.Dense with logical axis names, fp32 params and a compute dtype."""
  init = _zeros(axes) if zero_init else _xavier(axes)
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=init,
                  bias_init=_zeros(axes[-1:]), name=name)


class RMSNorm(nn.Module):
  """RMS norm over the last axis with a learned scale, computed in float32."""
  eps: float
  axis_name: str = 'embed'

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', _ones((self.axis_name,)), (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * scale


def _layer_norm(eps, affine, name=None):
  return nn.LayerNorm(epsilon=eps, use_bias=affine, use_scale=affine, dtype=jnp.float32,
                      param_dtype=jnp.float32, use_fast_variance=False, name=name,
                      scale_init=_ones(('embed',)), bias_init=_zeros(('embed',)))


def _modulate(x, shift, scale, num_frames):
  """x [B, F*S, D] * (1 + scale) + shift with per-frame shift/scale [B, F, D]."""
  b, t, d = x.shape
  x = x.reshape(b, num_frames, t // num_frames, d)
  x = x * (1 + scale[:, :, None]) + shift[:, :, None]
  return x.reshape(b, t, d)


def _gate(y, gate, num_frames):
  b, t, d = y.shape
  y = y.astype(jnp.float32).reshape(b, num_frames, t // num_frames, d) * gate[:, :, None]
  return y.reshape(b, t, d)


# Activation layouts in logical names. Training maps them to mesh axes (`logical_axis_rules`,
# training/sharding.activation_sharding); elsewhere they are no-ops. Under FSDP an example's
# activations stay whole on its devices and the examples are split ('batch'); heads and FFN
# columns follow their tensor-parallel weights. The width is None, not 'embed': the weights'
# 'embed' is FSDP-split over the same mesh axis as the batch.
ACT_RESIDUAL = ('batch', None, None)           # [B, tokens, dim]
ACT_HEADS = ('batch', None, 'heads', None)     # q / k / v [B, tokens, heads, head_dim]
ACT_MLP = ('batch', None, 'mlp')               # FFN hidden [B, tokens, ffn_dim]


class SelfAttention(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, x, angles, mask, prefix_kv, prefix_valid):
    """prefix_kv: a tuple of (k, v) segments attended in front of the own keys."""
    cfg = self.cfg
    dt = dtype_of(cfg.dtype)
    heads, hd = cfg.num_heads, cfg.dim // cfg.num_heads
    b, t, _ = x.shape
    q = RMSNorm(cfg.eps, 'heads', name='norm_q')(Dense(cfg.dim, ('embed', 'heads'), dt, name='q')(x))
    k = RMSNorm(cfg.eps, 'heads', name='norm_k')(Dense(cfg.dim, ('embed', 'heads'), dt, name='k')(x))
    v = Dense(cfg.dim, ('embed', 'heads'), dt, name='v')(x)
    q = rope_lib.apply_rope(q.reshape(b, t, heads, hd), angles).astype(dt)
    k = rope_lib.apply_rope(k.reshape(b, t, heads, hd), angles).astype(dt)
    v = v.reshape(b, t, heads, hd).astype(dt)
    q, k, v = (nn.with_logical_constraint(a, ACT_HEADS) for a in (q, k, v))
    new_kv = (k, v)
    if prefix_kv:
      out = attn_lib.prefix_attention(
          q, k, v, mask, [(pk.astype(dt), pv.astype(dt)) for pk, pv in prefix_kv],
          prefix_valid, cfg.attention)
    else:
      out = attn_lib.dot_product_attention(q, k, v, mask=mask, implementation=cfg.attention)
    out = Dense(cfg.dim, ('heads', 'embed'), dt, name='o')(out.reshape(b, t, cfg.dim))
    return out, new_kv


class CrossAttention(nn.Module):
  """Video tokens attend to text rows; optionally each frame to its own caption.

  `text_kv` (the per-caption keys and values) depends only on the prompts, so generation
  computes it once per shot (`WanTextKV`) and passes it in; training computes it inline.
  """
  cfg: Any

  def setup(self):
    cfg = self.cfg
    dt = dtype_of(cfg.dtype)
    self.q = Dense(cfg.dim, ('embed', 'heads'), dt, name='q')
    self.k = Dense(cfg.dim, ('embed', 'heads'), dt, name='k')
    self.v = Dense(cfg.dim, ('embed', 'heads'), dt, name='v')
    self.o = Dense(cfg.dim, ('heads', 'embed'), dt, name='o')
    self.norm_q = RMSNorm(cfg.eps, 'heads')
    self.norm_k = RMSNorm(cfg.eps, 'heads')

  def text_kv(self, text):
    """text [N, L, D] -> (k, v) [N, L, H, Dh] in the compute dtype."""
    cfg = self.cfg
    n, l, _ = text.shape
    shape = (n, l, cfg.num_heads, cfg.dim // cfg.num_heads)
    dt = dtype_of(cfg.dtype)
    return (self.norm_k(self.k(text)).reshape(shape).astype(dt),
            self.v(text).reshape(shape).astype(dt))

  def __call__(self, x, text_kv, frame_caption, num_frames):
    cfg = self.cfg
    dt = dtype_of(cfg.dtype)
    heads, hd = cfg.num_heads, cfg.dim // cfg.num_heads
    b, t, _ = x.shape
    k, v = text_kv
    q = self.norm_q(self.q(x))
    if frame_caption is None:  # one caption per batch row
      q = q.reshape(b, t, heads, hd).astype(dt)
      out = attn_lib.dot_product_attention(q, k, v, implementation=cfg.attention)
    else:  # each latent frame attends to the caption it is routed to
      q = q.reshape(b * num_frames, t // num_frames, heads, hd).astype(dt)
      idx = frame_caption.reshape(-1)
      out = attn_lib.dot_product_attention(q, k[idx], v[idx], implementation=cfg.attention)
    return self.o(out.reshape(b, t, cfg.dim))


class _TextKVBlock(nn.Module):
  """The text-only slice of a WanBlock (same param paths), for `WanTextKV`."""
  cfg: Any

  @nn.compact
  def __call__(self, text, _):
    return text, CrossAttention(self.cfg, name='cross_attn').text_kv(text)


class WanBlock(nn.Module):
  """One DiT block; scanned over layers (carry = residual stream)."""
  cfg: Any
  return_kv: bool = False

  @nn.compact
  def __call__(self, x, layer_inputs, inputs: 'BlockInputs'):
    prefix_kv, text_kv = layer_inputs
    cfg = self.cfg
    dt = dtype_of(cfg.dtype)
    e0, num_frames = inputs.e0, inputs.e0.shape[1]
    x = nn.with_logical_constraint(x, ACT_RESIDUAL)
    mod = self.param('modulation', _modulation_init(('norm', None, 'embed')),
                     (1, 6, cfg.dim), jnp.float32)
    shift, scale, gate, c_shift, c_scale, c_gate = jnp.split(mod[None] + e0, 6, axis=2)
    shift, scale, gate, c_shift, c_scale, c_gate = (
        a[:, :, 0] for a in (shift, scale, gate, c_shift, c_scale, c_gate))

    h = _modulate(_layer_norm(cfg.eps, False, 'norm1')(x), shift, scale, num_frames)
    y, kv = SelfAttention(cfg, name='self_attn')(h.astype(dt), inputs.angles, inputs.mask,
                                                 prefix_kv, inputs.prefix_valid)
    x = x + _gate(y, gate, num_frames)

    h = _layer_norm(cfg.eps, True, 'norm3')(x).astype(dt)
    cross = CrossAttention(cfg, name='cross_attn')
    if text_kv is None:
      text_kv = cross.text_kv(inputs.text)
    x = x + cross(h, text_kv, inputs.frame_caption, num_frames).astype(jnp.float32)

    h = _modulate(_layer_norm(cfg.eps, False, 'norm2')(x), c_shift, c_scale, num_frames)
    y = Dense(cfg.ffn_dim, ('embed', 'mlp'), dt, name='ffn_0')(h.astype(dt))
    y = nn.with_logical_constraint(y, ACT_MLP)
    y = Dense(cfg.dim, ('mlp', 'embed'), dt, name='ffn_2')(nn.gelu(y, approximate=True))
    x = x + _gate(y, c_gate, num_frames)
    return x, (kv if self.return_kv else None)


def _modulation_init(axes):
  def init(key, shape, dtype):
    return jax.random.normal(key, shape, dtype) / np.sqrt(shape[-1])
  return nn.with_logical_partitioning(init, axes)


class Head(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, x, e, num_frames):
    cfg = self.cfg
    mod = self.param('modulation', _modulation_init(('norm', None, 'embed')),
                     (1, 2, cfg.dim), jnp.float32)
    shift, scale = jnp.split(mod[None] + e[:, :, None], 2, axis=2)
    h = _modulate(_layer_norm(cfg.eps, False, 'norm')(x), shift[:, :, 0], scale[:, :, 0],
                  num_frames)
    out_dim = cfg.out_channels * int(np.prod(cfg.patch_size))
    return Dense(out_dim, ('embed', None), dtype_of(cfg.dtype), zero_init=True,
                 name='head')(h.astype(dtype_of(cfg.dtype)))


class BlockInputs(NamedTuple):
  """What every scanned block reads besides its own layer's params and prefix K/V."""
  e0: jax.Array                          # [B, F, 6, D] per-frame modulation (float32)
  angles: jax.Array                      # RoPE angles of this call's tokens
  mask: Any                              # None (full) or an `attention.BlockCausal`
  text: Optional[jax.Array]              # [N, L_text, D] embedded text; None with `text_kv`
  frame_caption: Optional[jax.Array]     # [B, F] caption row per frame, or None (row b)
  prefix_valid: tuple                    # per prefix segment: mask, None or `Filled`


class WanDiT(nn.Module):
  """Wan2.1 T2V DiT with per-frame timesteps, shot-aware RoPE and caption routing.

  Attributes:
    config: the `model` section of configs/shotstream.py.
  """
  config: Any

  @nn.compact
  def __call__(self, latents, timesteps, context=None, frame_pos=None, frame_shot=None,
               frame_caption=None, attention: str = 'bidirectional',
               chunk_frames: Optional[int] = None, context_frames: Optional[int] = None,
               prefix_kv=(), return_kv: bool = False, text_kv=None):
    """Flow velocity for `latents`.

    Args:
      latents: [B, F, H, W, C] latent video, channels last.
      timesteps: [B, F] flow timesteps in [0, 1000], one per latent frame ([F] or a scalar
        broadcast).
      context: [N, L, text_dim] text embeddings; N = B, or the number of captions when
        `frame_caption` is given. May be None when `text_kv` is given.
      frame_pos: int [F] or [B, F] temporal RoPE positions (default arange(F)).
      frame_shot: int [F] or [B, F] RoPE shot ids (default zeros).
      frame_caption: int [F] or [B, F] caption row of `context` for each frame (default: row b
        for batch element b).
      attention: 'bidirectional' (teacher, critic) or 'block_causal' (student training).
      chunk_frames, context_frames: the block-causal layout (default: from the config).
      prefix_kv: a sequence of (k [L, B, P, H, Dh], v, valid) segments attended in front of
        the sequence's own keys (the streaming caches); valid is a bool mask [B, P], None (all
        slots hold keys) or `attention.Filled` (the first `length` slots, attended at the cost
        of the filled part only).
      return_kv: also return the stacked per-layer post-RoPE (k, v) of this call's tokens.
      text_kv: optional precomputed cross-attention (k, v) [L, N, L_text, H, Dh] from
        `WanTextKV` (replaces `context`).

    Returns:
      velocity [B, F, H, W, C_out] in float32, and (k, v) if `return_kv`.
    """
    cfg = self.config
    b, f, hgt, wid, _ = _check_latents(latents, cfg)
    fp, hp, wp = f // cfg.patch_size[0], hgt // cfg.patch_size[1], wid // cfg.patch_size[2]
    timesteps = _per_frame('timesteps', timesteps, b, fp, jnp.float32)
    frame_pos = _per_frame('frame_pos', frame_pos, b, fp, jnp.int32, jnp.arange(fp))
    frame_shot = _per_frame('frame_shot', frame_shot, b, fp, jnp.int32, jnp.zeros(fp))
    frame_caption = _caption_routing(cfg, b, fp, context, text_kv, frame_caption)
    segments = _prefix_segments(prefix_kv)

    dt = dtype_of(cfg.dtype)
    x = Dense(cfg.dim, (None, 'embed'), dt, name='patch_embedding')(
        _patchify(latents, cfg).astype(dt)).astype(jnp.float32)
    e, e0 = _time_embedding(cfg, timesteps)
    inputs = BlockInputs(
        e0=e0,
        angles=rope_lib.rope_angles(frame_pos, frame_shot, hp, wp, cfg.dim // cfg.num_heads,
                                    base=cfg.rope.base, theta=cfg.rope.theta,
                                    position_gap=cfg.rope.position_gap),
        mask=_attention_mask(cfg, attention, fp, hp * wp, chunk_frames, context_frames),
        text=None if context is None else _text_embedding(cfg, context),
        frame_caption=frame_caption,
        prefix_valid=tuple(valid for _, _, valid in segments))
    block = nn.remat(WanBlock, prevent_cse=False) if cfg.remat else WanBlock
    x, kv = _scan_layers(cfg, block, (0, nn.broadcast))(cfg, return_kv, name='blocks')(
        x, (tuple((k, v) for k, v, _ in segments), text_kv), inputs)

    out = Head(cfg, name='head')(x, e, fp).astype(jnp.float32)
    out = _unpatchify(out, latents.shape, cfg)
    out = velocity_from_output(cfg, out, latents, timesteps, cfg.patch_size[0])
    return (out, kv) if return_kv else out


def _scan_layers(cfg, block, in_axes):
  """`block` scanned over the layers, its params stacked on a leading 'layers' axis."""
  return nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                 in_axes=in_axes, length=cfg.num_layers, unroll=cfg.get('scan_unroll', 1),
                 metadata_params={nn.PARTITION_NAME: 'layers'})


def _patchify(latents, cfg):
  """[B, F, H, W, C] -> [B, tokens, pt*ph*pw*C]: (pt, ph, pw, C) per token, C fastest;
  tokens laid out (frame, h, w)."""
  b, f, hgt, wid, c = latents.shape
  pt, ph, pw = cfg.patch_size
  x = latents.reshape(b, f // pt, pt, hgt // ph, ph, wid // pw, pw, c)
  return x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, -1, pt * ph * pw * c)


def _unpatchify(out, shape, cfg):
  """The head's tokens [B, tokens, pt*ph*pw*C_out] back to [B, F, H, W, C_out]."""
  b, f, hgt, wid, _ = shape
  pt, ph, pw = cfg.patch_size
  out = out.reshape(b, f // pt, hgt // ph, wid // pw, pt, ph, pw, cfg.out_channels)
  return out.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, f, hgt, wid, cfg.out_channels)


def _time_embedding(cfg, timesteps):
  """Per-frame time embedding e [B, F, D] and modulation e0 [B, F, 6, D], in float32 (called
  inside a compact method)."""
  b, fp = timesteps.shape
  sin = timestep_sinusoid(timesteps, cfg.freq_dim)
  e = Dense(cfg.dim, (None, 'embed'), jnp.float32, name='time_embedding_0')(sin)
  e = Dense(cfg.dim, ('mlp', 'embed'), jnp.float32, name='time_embedding_2')(nn.silu(e))
  e0 = Dense(6 * cfg.dim, ('embed', 'mlp'), jnp.float32, name='time_projection')(nn.silu(e))
  return e, e0.reshape(b, fp, 6, cfg.dim)


def _caption_routing(cfg, b, fp, context, text_kv, frame_caption):
  """Checks the text inputs; `frame_caption` as [B, F] int32, or None (frame of batch row b
  reads text row b, which needs as many text rows as batch rows)."""
  if (context is None) == (text_kv is None):
    raise ValueError('context: pass exactly one of context (text embeddings) and text_kv')
  if context is not None and (context.ndim != 3 or context.shape[-1] != cfg.text_dim):
    raise ValueError(f'context: expected [N, L, {cfg.text_dim}], got {tuple(context.shape)}')
  rows = context.shape[0] if context is not None else text_kv[0].shape[1]
  if frame_caption is not None:
    return _per_frame('frame_caption', frame_caption, b, fp, jnp.int32)
  if rows != b:
    raise ValueError(f'context: has {rows} rows but the batch has {b}; pass '
                     'frame_caption to route frames to captions')
  return None


def _attention_mask(cfg, attention, fp, frame_tokens, chunk_frames, context_frames):
  """None (bidirectional) or the student's block-causal layout."""
  if attention not in attn_lib.ATTENTION_MODES:
    raise ValueError(f'attention: unknown mode {attention!r}; accepted: '
                     f'{", ".join(attn_lib.ATTENTION_MODES)}')
  if attention != 'block_causal':
    return None
  return attn_lib.BlockCausal(
      fp, frame_tokens, cfg.chunk_frames if chunk_frames is None else chunk_frames,
      cfg.context_frames if context_frames is None else context_frames)


PREDICTIONS = ('velocity', 'x0')


def velocity_from_output(cfg, out, latents, timesteps, pt: int = 1):
  """The flow velocity a head output stands for (`model.prediction`, configs/shotstream.py):
  the output itself, or for 'x0' v = (x_t - x0) / max(sigma, x0_min_sigma), sigma = t / 1000
  per latent frame. x0 = x_t - sigma v then gives the head's x0 back wherever sigma is at
  least the floor (every student step, every training timestep above it)."""
  prediction = cfg.get('prediction', 'velocity')
  if prediction == 'velocity':
    return out
  if prediction != 'x0':
    raise ValueError(f'model.prediction: unknown {prediction!r}; accepted: '
                     f'{", ".join(PREDICTIONS)}')
  sigma = jnp.maximum(schedule.timestep_sigma(jnp.repeat(timesteps, pt, axis=1)),
                      cfg.x0_min_sigma)
  return (latents.astype(jnp.float32) - out) / sigma[:, :, None, None, None]


class WanTextKV(nn.Module):
  """Per-layer cross-attention keys/values of text embeddings, with `WanDiT`'s params.

  `WanTextKV(cfg).apply({'params': dit_params}, context)` -> (k, v) [L, N, L_text, H, Dh]:
  the prompt-only part of every DiT call, computed once per shot during generation.
  """
  config: Any

  @nn.compact
  def __call__(self, context):
    cfg = self.config
    _, kv = _scan_layers(cfg, _TextKVBlock, 0)(cfg, name='blocks')(
        _text_embedding(cfg, context), None)
    return kv


def _text_embedding(cfg, context):
  """Linear -> tanh-GELU -> Linear on umT5 rows (called inside a compact method)."""
  dt = dtype_of(cfg.dtype)
  text = Dense(cfg.dim, (None, 'embed'), dt, name='text_embedding_0')(context.astype(dt))
  return Dense(cfg.dim, ('mlp', 'embed'), dt, name='text_embedding_2')(
      nn.gelu(text, approximate=True))


def _prefix_segments(prefix_kv):
  """A sequence of (k, v, valid) segments (None: none) as a tuple of triples."""
  segments = tuple(prefix_kv or ())
  for seg in segments:
    if not isinstance(seg, (tuple, list)) or len(seg) != 3:
      raise ValueError('prefix_kv: expected a sequence of (k, v, valid) segments, got an '
                       f'element of type {type(seg).__name__}')
  return tuple(tuple(seg) for seg in segments)


def _check_latents(latents, cfg):
  if latents.ndim != 5:
    raise ValueError(f'latents: expected [B, F, H, W, C], got shape {tuple(latents.shape)}')
  b, f, h, w, c = latents.shape
  if c != cfg.in_channels:
    raise ValueError(f'latents: expected {cfg.in_channels} channels (last axis), got {c}')
  for name, size, p in (('frames', f, cfg.patch_size[0]), ('height', h, cfg.patch_size[1]),
                        ('width', w, cfg.patch_size[2])):
    if size % p:
      raise ValueError(f'latents: {name} {size} is not a multiple of the patch size {p}')
  return b, f, h, w, c


def _per_frame(name, value, b, f, dtype, default=None):
  """Broadcast a per-frame array ([], [F] or [B, F]) to [B, F]."""
  if value is None:
    value = default
  value = jnp.asarray(value)
  if value.ndim > 2 or (value.ndim == 2 and value.shape[0] not in (1, b)) or \
     (value.ndim >= 1 and value.shape[-1] not in (1, f)):
    raise ValueError(f'{name}: expected shape [{b}, {f}] (batch, latent frames), '
                     f'got {tuple(value.shape)}')
  return jnp.broadcast_to(value, (b, f)).astype(dtype)


def init_params(config, key, latent_shape=None, text_len=None):
  """Random params (a plain, unboxed pytree) for a model config (traced on one patch of
  latents unless `latent_shape` [(B,) F, H, W] is given: no shape of the params depends on it)."""
  model = WanDiT(config)
  latent_shape = latent_shape or tuple(config.patch_size)
  f, h, w = latent_shape[1:] if len(latent_shape) == 4 else latent_shape
  lat = jax.ShapeDtypeStruct((1, f, h, w, config.in_channels), jnp.float32)
  ctx = jax.ShapeDtypeStruct((1, text_len or 1, config.text_dim), jnp.float32)
  # lazy_init computes only the initializers (no forward pass).
  variables = model.lazy_init(key, lat, jax.ShapeDtypeStruct((1, f), jnp.float32), ctx)
  return nn.meta.unbox(variables['params'])


def param_shapes(config):
  """Parameter ShapeDtypeStructs without allocating anything."""
  return jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))


def count_params(config) -> int:
  return common.count(param_shapes(config))
