"""The Wan2.1 causal 3D VAE in Flax linen, with an explicit streaming cache (DESIGN 4.6).

    vae = WanVAE(config.vae)
    params = init_params(vae, rng)                 # or convert.vae.load_vae(path, config.vae)
    latents = encode(vae, params, video)   # [B, 4k+1, H, W, 3] in [-1, 1] -> [B, k+1, H/8, W/8, z]
    frames = decode(vae, params, latents)  # -> [B, 4k+1, H, W, 3], clamped to [-1, 1]

    step = jax.jit(functools.partial(decode_step, vae))
    cache = init_decode_cache(vae, batch, h, w)    # latent h, w
    for chunk in chunks:                           # [B, n, h, w, z]
      frames, cache = step(params, cache, chunk)   # first chunk: 1 + 4(n-1) frames, later: 4n

Layout is channels-last, [B, T, H, W, C]. Latents are normalised, (mu - mean) / std.

Why chunking is exact. Every temporal op of the Wan VAE is causal, so processing a clip in
pieces equals processing it whole as long as each piece sees what came before:
  * a time-kernel-3 conv pads 2 frames on the past side; its cache is the last 2 frames of its
    input stream (zeros before the start), so cache ++ chunk is exactly the padded window;
  * the encoder's stride-2 time conv passes the clip's first frame through unconvolved and then
    convolves (f0 f1 f2), (f2 f3 f4), ...: its cache is the last input frame;
  * the decoder's 2x time upsampler also passes the first frame through, then runs a causal
    conv (cache as above, starting from zeros) over the remaining frames, each input frame
    becoming two.
Only that "first frame passes through" rule depends on where the clip starts, and it changes
the output length. So the cache carries a static `first` flag (part of the tree structure, not
an array): a jitted step compiles once for the first chunk and once for all later chunks
(per chunk shape).
The reference's own chunking (encode 1, 4, 4, ... frames, decode 1 latent at a time) is one
schedule among many that give the same result; `encode` / `decode` use it via `lax.scan`, which
bounds memory by one chunk.
"""

import math
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from shotstream_jax.models import common
from shotstream_jax.models.common import dtype_of

CACHE_FRAMES = 2  # past frames a time-kernel-3 causal conv needs


@flax.struct.dataclass
class VAECache:
  """Per-conv past frames (a nested dict mirroring the module tree) and the static first flag.

  `feats=None` means "all zeros, shapes taken from the input": handy for one-off calls; use
  `init_encode_cache` / `init_decode_cache` for fixed-shape caches under jit.
  """
  feats: Any
  first: bool = flax.struct.field(pytree_node=False, default=True)


def _sub(cache, name):
  return None if cache is None else cache.get(name)


def _zeros_like_frames(x, n):
  return jnp.zeros((x.shape[0], n) + x.shape[2:], x.dtype)


def _conv(x, kernel, bias, strides, dtype):
  """VALID channels-last conv in `dtype` (params kept fp32); a 2-D kernel is a dense layer."""
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  if kernel.ndim == 2:
    y = x @ kernel
  elif kernel.ndim == 4:
    y = _conv2d(x, kernel, strides)
  else:
    y = _conv3d_as_2d(x, kernel, strides)
  return y + bias.astype(dtype)


def _conv2d(x, kernel, strides):
  return jax.lax.conv_general_dilated(x, kernel, strides, 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _conv3d_as_2d(x, kernel, strides):
  """A VALID 3-D conv as a sum over its time taps of 2-D convs on all frames at once.

  The same sum as a 3-D conv (up to float rounding); XLA:CPU runs 2-D convs several times
  faster than 3-D ones at the VAE's small channel counts, and accelerators fuse either.
  """
  kt = kernel.shape[0]
  st = strides[0]
  b, t = x.shape[:2]
  out_t = (t - kt) // st + 1
  y = 0
  for i in range(kt):
    xi = x[:, i:i + st * (out_t - 1) + 1:st]
    yi = _conv2d(xi.reshape((b * out_t,) + xi.shape[2:]), kernel[i], strides[1:])
    y = y + yi.reshape((b, out_t) + yi.shape[1:])
  return y


def _conv_params(module, kernel_size, in_features, features):
  """`kernel` [*kernel_size, in, out] and `bias`, fp32, with PyTorch's default init."""
  bound = 1.0 / math.sqrt(in_features * math.prod(kernel_size))
  init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
  kernel = module.param('kernel', init, tuple(kernel_size) + (in_features, features), jnp.float32)
  return kernel, module.param('bias', init, (features,), jnp.float32)


class Conv(nn.Module):
  """A VALID conv (or, with kernel_size=(), a dense layer) on channels-last input."""
  features: int
  kernel_size: tuple
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, strides=None):
    kernel, bias = _conv_params(self, self.kernel_size, x.shape[-1], self.features)
    return _conv(x, kernel, bias, strides or (1,) * len(self.kernel_size), self.dtype)


class CausalConv(nn.Module):
  """3-D conv padded 'same' in space and only on the past side in time.

  `cache` holds the previous CACHE_FRAMES input frames (zeros at the start of a clip); returns
  (output, new cache). Kernels of time size 1 need and return no cache.
  """
  features: int
  kernel_size: tuple = (3, 3, 3)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cache=None):
    kernel, bias = _conv_params(self, self.kernel_size, x.shape[-1], self.features)
    kt, kh, kw = self.kernel_size
    new_cache = None
    if kt > 1:
      past = kt - 1
      cache = _zeros_like_frames(x, past) if cache is None else cache.astype(x.dtype)
      x = jnp.concatenate([cache, x], axis=1)
      new_cache = x[:, -past:]
    x = jnp.pad(x, ((0, 0), (0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    return _conv(x, kernel, bias, (1, 1, 1), self.dtype), new_cache


class RMSNorm(nn.Module):
  """Wan's RMS norm: L2-normalise over channels, times sqrt(C) and a learned scale, in fp32."""
  eps: float

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones_init(), (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
    return (xf / jnp.maximum(norm, self.eps) * math.sqrt(c) * scale).astype(x.dtype)


class ResBlock(nn.Module):
  features: int
  cfg: Any

  @nn.compact
  def __call__(self, x, cache):
    dt = dtype_of(self.cfg.dtype, 'vae.dtype')
    h = x
    if x.shape[-1] != self.features:
      h, _ = CausalConv(self.features, (1, 1, 1), dt, name='shortcut')(x)
    x = nn.silu(RMSNorm(self.cfg.norm_eps, name='norm1')(x))
    x, c1 = CausalConv(self.features, dtype=dt, name='conv1')(x, _sub(cache, 'conv1'))
    x = nn.silu(RMSNorm(self.cfg.norm_eps, name='norm2')(x))
    x, c2 = CausalConv(self.features, dtype=dt, name='conv2')(x, _sub(cache, 'conv2'))
    return x + h, {'conv1': c1, 'conv2': c2}


class AttnBlock(nn.Module):
  """Single-head self-attention over the pixels of each frame (no mixing across time)."""
  cfg: Any

  @nn.compact
  def __call__(self, x):
    dt = dtype_of(self.cfg.dtype, 'vae.dtype')
    b, t, h, w, c = x.shape
    y = RMSNorm(self.cfg.norm_eps, name='norm')(x).reshape(b * t, h * w, c)
    qkv = Conv(3 * c, (), dt, name='to_qkv')(y)
    q, k, v = (a[:, :, None, :] for a in jnp.split(qkv, 3, axis=-1))
    y = jax.nn.dot_product_attention(q, k, v)[:, :, 0, :]
    y = Conv(c, (), dt, name='proj')(y)
    return x + y.reshape(b, t, h, w, c)


class MidBlock(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, x, cache):
    dim = x.shape[-1]
    x, c0 = ResBlock(dim, self.cfg, name='res_0')(x, _sub(cache, 'res_0'))
    x = AttnBlock(self.cfg, name='attn')(x)
    x, c1 = ResBlock(dim, self.cfg, name='res_1')(x, _sub(cache, 'res_1'))
    return x, {'res_0': c0, 'res_1': c1}


def _per_frame(fn, x):
  """Apply a 4-D (N, H, W, C) op to every frame of x [B, T, H, W, C]."""
  b, t = x.shape[:2]
  y = fn(x.reshape((b * t,) + x.shape[2:]))
  return y.reshape((b, t) + y.shape[1:])


class Downsample(nn.Module):
  """2x spatial (pad right/bottom, 3x3 stride 2) and optionally 2x causal temporal downsampling."""
  temporal: bool
  cfg: Any

  @nn.compact
  def __call__(self, x, cache, first):
    dt = dtype_of(self.cfg.dtype, 'vae.dtype')
    c = x.shape[-1]
    conv = Conv(c, (3, 3), dt, name='conv')
    x = _per_frame(lambda f: conv(jnp.pad(f, ((0, 0), (0, 1), (0, 1), (0, 0))), (2, 2)), x)
    if not self.temporal:
      return x, {}
    time_conv = Conv(c, (3, 1, 1), dt, name='time_conv')
    new_cache = {'time_conv': x[:, -1:]}
    if first:  # the clip's first frame passes through; then (f0 f1 f2), (f2 f3 f4), ...
      y = x[:, :1]
      if x.shape[1] > 1:
        y = jnp.concatenate([y, time_conv(x, (2, 1, 1))], axis=1)
    else:
      prev = _sub(cache, 'time_conv')
      prev = _zeros_like_frames(x, 1) if prev is None else prev.astype(x.dtype)
      y = time_conv(jnp.concatenate([prev, x], axis=1), (2, 1, 1))
    return y, new_cache


class Upsample(nn.Module):
  """Optionally 2x causal temporal upsampling, then 2x nearest spatial + 3x3 conv to C/2."""
  temporal: bool
  cfg: Any

  @nn.compact
  def __call__(self, x, cache, first):
    dt = dtype_of(self.cfg.dtype, 'vae.dtype')
    c = x.shape[-1]
    new_cache = {}
    if self.temporal:
      time_conv = CausalConv(2 * c, (3, 1, 1), dt, name='time_conv')
      prev = _sub(cache, 'time_conv')
      head, rest = (x[:, :1], x[:, 1:]) if first else (None, x)
      if rest.shape[1]:
        y, new_cache['time_conv'] = time_conv(rest, prev)
        b, t, h, w, _ = y.shape  # channels [frame 2i | frame 2i+1]
        y = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
      else:  # a lone first frame: the time conv has seen nothing yet
        y = rest
        new_cache['time_conv'] = (_zeros_like_frames(x, CACHE_FRAMES) if prev is None
                                  else prev.astype(x.dtype))
      x = y if head is None else jnp.concatenate([head, y], axis=1)
    conv = Conv(c // 2, (3, 3), dt, name='conv')
    x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
    x = _per_frame(lambda f: conv(jnp.pad(f, ((0, 0), (1, 1), (1, 1), (0, 0)))), x)
    return x, new_cache


class DownBlock(nn.Module):
  features: int
  resample: Optional[str]  # None | '2d' | '3d'
  cfg: Any

  @nn.compact
  def __call__(self, x, cache, first):
    new = {}
    for j in range(self.cfg.num_res_blocks):
      x, new[f'res_{j}'] = ResBlock(self.features, self.cfg, name=f'res_{j}')(
          x, _sub(cache, f'res_{j}'))
    if self.resample:
      x, new['downsample'] = Downsample(self.resample == '3d', self.cfg, name='downsample')(
          x, _sub(cache, 'downsample'), first)
    return x, new


class UpBlock(nn.Module):
  features: int
  resample: Optional[str]
  cfg: Any

  @nn.compact
  def __call__(self, x, cache, first):
    new = {}
    for j in range(self.cfg.num_res_blocks + 1):
      x, new[f'res_{j}'] = ResBlock(self.features, self.cfg, name=f'res_{j}')(
          x, _sub(cache, f'res_{j}'))
    if self.resample:
      x, new['upsample'] = Upsample(self.resample == '3d', self.cfg, name='upsample')(
          x, _sub(cache, 'upsample'), first)
    return x, new


def _resample_kinds(cfg, temporal_flags):
  n = len(cfg.dim_mult)
  return [None if i == n - 1 else ('3d' if temporal_flags[i] else '2d') for i in range(n)]


class Encoder(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, x, cache, first):
    cfg = self.cfg
    dt = dtype_of(cfg.dtype, 'vae.dtype')
    dims = [cfg.base_dim * m for m in (1,) + tuple(cfg.dim_mult)]
    new = {}
    x, new['conv_in'] = CausalConv(dims[0], dtype=dt, name='conv_in')(x, _sub(cache, 'conv_in'))
    for i, kind in enumerate(_resample_kinds(cfg, cfg.temporal_downsample)):
      x, new[f'down_{i}'] = DownBlock(dims[i + 1], kind, cfg, name=f'down_{i}')(
          x, _sub(cache, f'down_{i}'), first)
    x, new['mid'] = MidBlock(cfg, name='mid')(x, _sub(cache, 'mid'))
    x = nn.silu(RMSNorm(cfg.norm_eps, name='norm_out')(x))
    x, new['conv_out'] = CausalConv(2 * cfg.z_dim, dtype=dt, name='conv_out')(
        x, _sub(cache, 'conv_out'))
    return x, new


class Decoder(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, x, cache, first):
    cfg = self.cfg
    dt = dtype_of(cfg.dtype, 'vae.dtype')
    mult = tuple(cfg.dim_mult)
    base = decoder_base_dim(cfg)
    dims = [base * m for m in (mult[-1],) + mult[::-1]]
    new = {}
    x, new['conv_in'] = CausalConv(dims[0], dtype=dt, name='conv_in')(x, _sub(cache, 'conv_in'))
    x, new['mid'] = MidBlock(cfg, name='mid')(x, _sub(cache, 'mid'))
    kinds = _resample_kinds(cfg, tuple(cfg.temporal_downsample)[::-1])
    for i, kind in enumerate(kinds):
      x, new[f'up_{i}'] = UpBlock(dims[i + 1], kind, cfg, name=f'up_{i}')(
          x, _sub(cache, f'up_{i}'), first)
    x = nn.silu(RMSNorm(cfg.norm_eps, name='norm_out')(x))
    x, new['conv_out'] = CausalConv(cfg.image_channels, dtype=dt, name='conv_out')(
        x, _sub(cache, 'conv_out'))
    return x, new


class WanVAE(nn.Module):
  """Encoder + decoder with 1x1x1 quant convs around the latent; steps thread a VAECache."""
  cfg: Any

  def setup(self):
    dt = dtype_of(self.cfg.dtype, 'vae.dtype')
    self.encoder = Encoder(self.cfg)
    self.decoder = Decoder(self.cfg)
    self.quant_conv = CausalConv(2 * self.cfg.z_dim, (1, 1, 1), dt)
    self.post_quant_conv = CausalConv(self.cfg.z_dim, (1, 1, 1), dt)

  def _stats(self):
    return (jnp.asarray(self.cfg.latent_mean, jnp.float32),
            jnp.asarray(self.cfg.latent_std, jnp.float32))

  def encode_step(self, video, cache: VAECache):
    """Pixel chunk [B, t, H, W, 3] -> (normalised mu [B, t', H/8, W/8, z], cache)."""
    _check_encode_chunk(video, cache.first, self.cfg)
    _check_cache_size(cache, video, 'video')
    x, feats = self.encoder(video, cache.feats, cache.first)
    mu = self.quant_conv(x)[0][..., :self.cfg.z_dim].astype(jnp.float32)
    mean, std = self._stats()
    return (mu - mean) / std, VAECache(feats, first=False)

  def decode_step(self, latents, cache: VAECache):
    """Normalised latent chunk [B, n, h, w, z] -> (frames in [-1, 1], cache)."""
    _check_latents(latents, self.cfg)
    _check_cache_size(cache, latents, 'latents')
    mean, std = self._stats()
    z = latents.astype(jnp.float32) * std + mean
    x, feats = self.decoder(self.post_quant_conv(z)[0], cache.feats, cache.first)
    return jnp.clip(x.astype(jnp.float32), -1.0, 1.0), VAECache(feats, first=False)

  def __call__(self, video):
    """Whole-clip autoencode; touches every parameter (used by `init_params`)."""
    z, _ = self.encode_step(video, VAECache(None))
    return self.decode_step(z, VAECache(None))[0]


# ----------------------------------------------------------------------------- validation


def _check_encode_chunk(video, first, cfg):
  if video.ndim != 5 or video.shape[-1] != cfg.image_channels:
    raise ValueError(f'video: expected [B, T, H, W, {cfg.image_channels}] (channels last), '
                     f'got shape {tuple(video.shape)}')
  t, h, w = video.shape[1:4]
  f = spatial_factor(cfg)
  if h % f or w % f:
    raise ValueError(f'video: H and W must be multiples of {f}, got {h}x{w}')
  tf = temporal_factor(cfg)
  if first and (t - 1) % tf:
    raise ValueError(f'video: T must be {tf}k+1, got {t}')
  if not first and (t == 0 or t % tf):
    raise ValueError(f'video: a chunk after the first must have T a positive multiple of {tf}, '
                     f'got {t}')


def _check_cache_size(cache, x, field):
  if cache.feats is None:
    return
  want = tuple(cache.feats['conv_in'].shape[i] for i in (0, 2, 3))
  got = (x.shape[0],) + tuple(x.shape[2:4])
  if want != got:
    raise ValueError(f'{field}: batch, height, width {got} do not match the cache, made for '
                     f'{want}; start a new cache with init_encode_cache / init_decode_cache')


def _check_latents(latents, cfg):
  if latents.ndim != 5 or latents.shape[-1] != cfg.z_dim or latents.shape[1] == 0:
    raise ValueError(f'latents: expected [B, T>0, h, w, {cfg.z_dim}] (channels last), '
                     f'got shape {tuple(latents.shape)}')


def decoder_base_dim(cfg) -> int:
  """The decoder's base width: `cfg.decoder_base_dim`, or the encoder's `base_dim` when 0."""
  return cfg.get('decoder_base_dim', 0) or cfg.base_dim


def spatial_factor(cfg) -> int:
  return 2 ** (len(cfg.dim_mult) - 1)


def temporal_factor(cfg) -> int:
  return 2 ** sum(bool(f) for f in cfg.temporal_downsample)


def pixel_frames(cfg, latent_frames: int) -> int:
  """Pixel frames of a clip of `latent_frames` latents: the first latent is one frame, every
  later one `temporal_factor` frames (a clip is encoded 1 + t + t + ...)."""
  return 1 + temporal_factor(cfg) * (latent_frames - 1)


def latent_frames(cfg, pixel_frames_: int) -> int:
  """Latents of a clip of `pixel_frames_` frames (tk+1 frames -> k+1 latents)."""
  return (pixel_frames_ - 1) // temporal_factor(cfg) + 1


# ----------------------------------------------------------------------------- functional API


def init_params(cfg, key) -> dict:
  """Random params (torch-like default init) for every layer of the VAE of config `cfg`."""
  f = spatial_factor(cfg)
  video = jnp.zeros((1, temporal_factor(cfg) + 1, 2 * f, 2 * f, cfg.image_channels))
  return WanVAE(cfg).init(key, video)['params']


def param_shapes(cfg) -> dict:
  """ShapeDtypeStructs of the params, without computing anything."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


def count_params(cfg) -> int:
  return common.count(param_shapes(cfg))


_CACHE_SHAPES = {}  # (module repr, method, input shape) -> cache ShapeDtypeStructs


def _cache_shapes(vae, method, x):
  """Cache shapes from an abstract trace of one step (memoised: a trace costs ~1 s eagerly)."""
  key = (repr(vae), method.__name__, x.shape)
  if key not in _CACHE_SHAPES:
    def run(x):
      (_, cache), _ = vae.init_with_output(jax.random.PRNGKey(0), x, VAECache(None),
                                           method=method)
      return cache.feats
    _CACHE_SHAPES[key] = jax.eval_shape(run, x)
  return _CACHE_SHAPES[key]


def _zeros_cache(shapes):
  return VAECache(jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))


def init_encode_cache(vae: WanVAE, batch: int, height: int, width: int) -> VAECache:
  """Zero cache for `encode_step` on pixel frames of size height x width."""
  x = jax.ShapeDtypeStruct((batch, 1, height, width, vae.cfg.image_channels), jnp.float32)
  return _zeros_cache(_cache_shapes(vae, WanVAE.encode_step, x))


def init_decode_cache(vae: WanVAE, batch: int, height: int, width: int) -> VAECache:
  """Zero cache for `decode_step` on latents of size height x width (pixels / 8)."""
  z = jax.ShapeDtypeStruct((batch, 1, height, width, vae.cfg.z_dim), jnp.float32)
  return _zeros_cache(_cache_shapes(vae, WanVAE.decode_step, z))


def encode_step(vae: WanVAE, params, cache: VAECache, video):
  """(latents, cache) for the next pixel chunk: 4k+1 frames first, then multiples of 4."""
  return vae.apply({'params': params}, video, cache, method=WanVAE.encode_step)


def decode_step(vae: WanVAE, params, cache: VAECache, latents):
  """(frames, cache) for the next latent chunk: 1 + 4(n-1) frames first, then 4n each."""
  return vae.apply({'params': params}, latents, cache, method=WanVAE.decode_step)


def _scan_steps(step, cache, xs, per_step):
  """lax.scan `step` over xs [B, T, ...] in pieces of `per_step` frames; concat outputs on T."""
  b, t = xs.shape[:2]
  xs = xs.reshape((b, t // per_step, per_step) + xs.shape[2:]).swapaxes(0, 1)
  cache, ys = jax.lax.scan(lambda c, x: step(c, x)[::-1], cache, xs)
  ys = ys.swapaxes(0, 1)
  return ys.reshape((b, -1) + ys.shape[3:]), cache


def encode(vae: WanVAE, params, video, chunked: bool = True):
  """Video [B, 4k+1, H, W, 3] in [-1, 1] -> normalised latents [B, k+1, H/8, W/8, z].

  chunked=True runs the reference schedule (1, 4, 4, ... frames) in a lax.scan: memory of one
  chunk; chunked=False runs the clip in one pass (same numbers, more memory, more parallel).
  """
  _check_encode_chunk(video, True, vae.cfg)
  b, t, h, w, _ = video.shape
  cache = init_encode_cache(vae, b, h, w)
  if not chunked or t == 1:
    return encode_step(vae, params, cache, video)[0]
  step = lambda c, x: encode_step(vae, params, c, x)
  z0, cache = step(cache, video[:, :1])
  zs, _ = _scan_steps(step, cache, video[:, 1:], temporal_factor(vae.cfg))
  return jnp.concatenate([z0, zs], axis=1)


def decode(vae: WanVAE, params, latents, chunked: bool = True, latents_per_step: int = 1):
  """Normalised latents [B, n, h, w, z] -> frames [B, 1 + 4(n-1), 8h, 8w, 3] in [-1, 1].

  chunked=True decodes the first latent, then `latents_per_step` latents per lax.scan step
  (the reference uses 1); chunked=False decodes the clip in one pass.
  """
  _check_latents(latents, vae.cfg)
  b, n, h, w, _ = latents.shape
  if latents_per_step < 1 or (n - 1) % latents_per_step:
    raise ValueError(f'latents_per_step: must be >= 1 and divide T-1 = {n - 1}, '
                     f'got {latents_per_step}')
  cache = init_decode_cache(vae, b, h, w)
  if not chunked or n == 1:
    return decode_step(vae, params, cache, latents)[0]
  step = lambda c, z: decode_step(vae, params, c, z)
  x0, cache = step(cache, latents[:, :1])
  xs, _ = _scan_steps(step, cache, latents[:, 1:], latents_per_step)
  return jnp.concatenate([x0, xs], axis=1)


def encode_image(vae: WanVAE, params, image):
  """One frame [B, H, W, 3] encoded alone as a 1-frame clip -> [B, 1, H/8, W/8, z] (DESIGN 4.4)."""
  if image.ndim != 4:
    raise ValueError(f'image: expected [B, H, W, {vae.cfg.image_channels}], '
                     f'got shape {tuple(image.shape)}')
  return encode(vae, params, image[:, None])
