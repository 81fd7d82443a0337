"""Frozen ViT feature extractors for VBench-style metrics: DINO ViT-B/16 and CLIP ViT-B/32, in Flax.

    params, cfg = convert.vit.load_dino(path)    # dino_vitbase16_pretrain.pth, HF dino-vitb16
    feats = image_features(params, cfg, preprocess(frames, 'dino'))   # [T, 768]
    params, cfg = convert.vit.load_clip(path)    # ViT-B-32.pt, open_clip, HF clip-vit-base-patch32
    img = image_features(params, cfg, preprocess(frames, 'clip'))     # [T, 512]
    txt = text_features(params, cfg, token_ids)                        # [B, 512]

`frames` are uint8 [T, H, W, 3] video frames, `token_ids` OpenAI-tokenizer ids [B, L].

What they are for (VBench, Huang et al. 2024): subject consistency is the cosine similarity of each
frame's DINO feature to the first and the previous frame's; background consistency is the same with
CLIP image features; text-frame alignment (VBench's appearance_style) is exp(logit_scale) / 100
times the cosine of CLIP text and image features (`params['logit_scale']`; ~100 once exponentiated
for OpenAI's weights). Features come back unnormalised, as the reference models return them:
normalise before taking cosines.

One `ViT` module serves both image towers, which differ in config only: pre-norm blocks with one
fused qkv projection, a class token, a learned absolute position table, and a final LayerNorm on the
class token. DINO: exact GELU, patch conv with bias, no LayerNorm before the blocks, eps 1e-6, the
normed class token is the feature. CLIP: QuickGELU (x * sigmoid(1.702 x), what OpenAI trained with),
bias-free patch conv, a LayerNorm before the blocks (`ln_pre`), eps 1e-5, the normed class token
times a [width, 512] projection. The CLIP text tower is the same block with a causal mask, read out
at the end-of-text token (the largest id of each row: OpenAI's tokenizer gives EOT the last id)
and projected.

DINO accepts frames that are not 224x224 (VBench resizes the short side to 224 and does not crop):
like the facebookresearch/dino hub model VBench loads, the position table is then resampled
bicubically to the patch grid (`dino_position_table`). CLIP's tables are used at their own size
only.
Everything runs in float32; matmuls follow JAX's default precision (tests set it to 'highest').
"""

import dataclasses
import functools
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ACTIVATIONS = ('gelu', 'quick_gelu')
INPUT_SIZE = 224   # VBench's clip_transform(224) / dino_transform(224)

# Source: Vchitect/VBench @45e79ec, vbench/utils.py. clip_transform: Normalize((0.48145466,
# 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)), the statistics OpenAI CLIP was
# trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# dino_transform (same file): Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), the
# ImageNet statistics DINO was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torch's bicubic kernel (upsample_bicubic2d, used by torchvision's tensor Resize and by DINO's
# position resampling) is Keys' cubic convolution with a = -0.75 (PIL uses -0.5).
CUBIC_A = -0.75
# facebookresearch/dino vision_transformer.py interpolate_pos_encoding: it scales the table by
# (grid + 0.1) / old_grid so that torch's floor() of the output size lands on `grid`; the 0.1 also
# shifts the sampling positions, so it is kept here to reproduce the hub model.
DINO_GRID_OFFSET = 0.1


def _check_act(act, field):
  if act not in ACTIVATIONS:
    raise ValueError(f'{field}: unknown activation {act!r}; accepted: {", ".join(ACTIVATIONS)}')


def _check_heads(width, heads, field):
  if heads < 1 or width % heads:
    raise ValueError(f'{field}: {heads} heads do not divide the width {width}')


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """An image tower. `image_size` is the resolution its position table belongs to.

  `interpolate_pos`: resample the position table for other input sizes the way DINO's hub model
  does (CLIP rejects other sizes instead). `proj_dim`: width of the output projection (CLIP), or
  None for the normed class token itself (DINO).
  """
  image_size: int
  patch: int
  width: int
  layers: int
  heads: int
  mlp_ratio: float = 4.0
  act: str = 'gelu'
  ln_pre: bool = False
  final_norm: bool = True
  patch_bias: bool = True
  proj_dim: Optional[int] = None
  eps: float = 1e-6
  interpolate_pos: bool = False

  def __post_init__(self):
    _check_act(self.act, 'ViTConfig.act')
    _check_heads(self.width, self.heads, 'ViTConfig.heads')
    if self.image_size % self.patch:
      raise ValueError(f'ViTConfig.image_size: {self.image_size} is not a multiple of the patch '
                       f'{self.patch}')

  @property
  def grid(self) -> int:
    return self.image_size // self.patch

  @property
  def mlp_dim(self) -> int:
    return int(round(self.width * self.mlp_ratio))

  @property
  def out_dim(self) -> int:
    return self.proj_dim or self.width


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """CLIP's text tower: `context` is the length of its position table (77 for OpenAI's)."""
  vocab_size: int
  context: int
  width: int
  layers: int
  heads: int
  mlp_ratio: float = 4.0
  act: str = 'quick_gelu'
  eps: float = 1e-5
  proj_dim: int = 512

  def __post_init__(self):
    _check_act(self.act, 'CLIPTextConfig.act')
    _check_heads(self.width, self.heads, 'CLIPTextConfig.heads')

  @property
  def mlp_dim(self) -> int:
    return int(round(self.width * self.mlp_ratio))


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Both CLIP towers; their params live under 'visual' and 'text', next to 'logit_scale'."""
  vision: ViTConfig
  text: CLIPTextConfig

  def __post_init__(self):
    if self.vision.proj_dim != self.text.proj_dim:
      raise ValueError(f'CLIPConfig: image projection {self.vision.proj_dim} != text projection '
                       f'{self.text.proj_dim}; the towers must share one embedding space')


def dino_vitb16() -> ViTConfig:
  """facebookresearch/dino `vit_base(patch_size=16)` (dino_vitb16 on torch hub)."""
  return ViTConfig(image_size=224, patch=16, width=768, layers=12, heads=12, act='gelu',
                   ln_pre=False, patch_bias=True, proj_dim=None, eps=1e-6, interpolate_pos=True)


def clip_vitb32() -> CLIPConfig:
  """OpenAI CLIP ViT-B/32 (open_clip 'ViT-B-32-quickgelu', HF openai/clip-vit-base-patch32)."""
  vision = ViTConfig(image_size=224, patch=32, width=768, layers=12, heads=12, act='quick_gelu',
                     ln_pre=True, patch_bias=False, proj_dim=512, eps=1e-5)
  text = CLIPTextConfig(vocab_size=49408, context=77, width=512, layers=12, heads=8,
                        act='quick_gelu', eps=1e-5, proj_dim=512)
  return CLIPConfig(vision, text)


def tiny_dino() -> ViTConfig:
  """Test-sized DINO-style tower (32x32 images, 4x4 patches of 8)."""
  return dataclasses.replace(dino_vitb16(), image_size=32, patch=8, width=64, layers=2, heads=4)


def tiny_clip() -> CLIPConfig:
  """Test-sized CLIP (32x32 images, a 100-token vocabulary, 16 text positions)."""
  cfg = clip_vitb32()
  vision = dataclasses.replace(cfg.vision, image_size=32, patch=8, width=64, layers=2, heads=4,
                               proj_dim=32)
  text = dataclasses.replace(cfg.text, vocab_size=100, context=16, width=64, layers=2, heads=4,
                             proj_dim=32)
  return CLIPConfig(vision, text)


def _activation(name):
  if name == 'gelu':
    return functools.partial(jax.nn.gelu, approximate=False)
  return lambda x: x * jax.nn.sigmoid(1.702 * x)


def _layer_norm(eps, name):
  # Two-pass variance: the residual stream of trained ViTs has large outlier channels, where
  # E[x^2] - E[x]^2 in float32 loses most of its digits.
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


def _normal(std=0.02):
  return nn.initializers.normal(stddev=std)


class _Attention(nn.Module):
  """Multi-head self-attention with one fused [W, 3W] projection laid out [q | k | v]."""
  heads: int
  causal: bool

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    hd = d // self.heads
    qkv = nn.Dense(3 * d, name='qkv')(x).reshape(b, t, 3, self.heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) * hd**-0.5
    if self.causal:
      logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, t, d)
    return nn.Dense(d, name='out')(out)


class _Block(nn.Module):
  """Pre-norm transformer block; scanned over the layers (params stacked on a leading axis)."""
  cfg: object   # ViTConfig or CLIPTextConfig: width, heads, mlp_dim, act, eps
  causal: bool = False

  @nn.compact
  def __call__(self, x, _):
    cfg = self.cfg
    x = x + _Attention(cfg.heads, self.causal, name='attn')(_layer_norm(cfg.eps, 'norm1')(x))
    y = _layer_norm(cfg.eps, 'norm2')(x)
    y = _MLP(cfg.mlp_dim, cfg.act, name='mlp')(y)
    return x + y, None


class _MLP(nn.Module):
  hidden: int
  act: str

  @nn.compact
  def __call__(self, x):
    y = _activation(self.act)(nn.Dense(self.hidden, name='fc1')(x))
    return nn.Dense(x.shape[-1], name='fc2')(y)


def _blocks(cfg, causal=False):
  scan = nn.scan(_Block, variable_axes={'params': 0}, split_rngs={'params': True},
                 in_axes=nn.broadcast, length=cfg.layers)
  return scan(cfg, causal, name='blocks')


def _interp_matrix(in_size: int, out_size: int, method: str, scale: Optional[float] = None):
  """[out, in] float32 weights of torch's 1-D `interpolate(align_corners=False, antialias=False)`.

  Output pixel i samples input position (i + 0.5) / scale - 0.5, with scale = out / in unless the
  caller gave torch an explicit scale factor (DINO's position resampling does). Bilinear clamps
  that position at 0; bicubic takes 4 taps around it, clamped to the edge pixels. Positions and
  weights are computed in float32 as torch does for float32 images: in float64 the positions of
  a 373-wide row drift by ~1e-5 pixel from torch's, which on sharp frames moves outputs by ~1e-2.
  """
  f32 = np.float32
  step = f32(in_size / out_size) if scale is None else f32(1.0 / scale)
  src = (np.arange(out_size, dtype=f32) + f32(0.5)) * step - f32(0.5)
  rows = np.arange(out_size)
  m = np.zeros((out_size, in_size), f32)
  if method == 'bilinear':
    src = np.maximum(src, f32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    frac = np.clip(src - lo.astype(f32), f32(0.0), f32(1.0))
    np.add.at(m, (rows, lo), f32(1.0) - frac)
    np.add.at(m, (rows, np.minimum(lo + 1, in_size - 1)), frac)
  elif method == 'bicubic':
    lo = np.floor(src).astype(np.int64)
    frac = src - lo.astype(f32)
    for tap in (-1, 0, 1, 2):
      np.add.at(m, (rows, np.clip(lo + tap, 0, in_size - 1)), _cubic(frac - f32(tap)))
  else:
    raise ValueError(f'method: unknown interpolation {method!r}; accepted: bilinear, bicubic')
  return m


def _cubic(d):
  """Keys' cubic convolution kernel at distances d (float32)."""
  a, d = np.float32(CUBIC_A), np.abs(d)
  near = ((a + 2) * d - (a + 3)) * d * d + 1
  far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
  return np.where(d <= 1, near, np.where(d < 2, far, 0.0)).astype(np.float32)


def _resample_grid(x, mh, mw):
  """x [..., H, W, C] resampled by [h, H] and [w, W] matrices (full fp32 precision)."""
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum('oh,...hwc->...owc', jnp.asarray(mh, jnp.float32), x, precision=hi)
  return jnp.einsum('pw,...owc->...opc', jnp.asarray(mw, jnp.float32), x, precision=hi)


def dino_position_table(pos, grid: int, out_grid: Tuple[int, int]):
  """DINO's hub model's position table for a (gh, gw) patch grid: [1 + gh * gw, W].

  The class row is kept; the [grid, grid] patch rows are resampled bicubically with torch's
  scale factor (g + 0.1) / grid per axis (see DINO_GRID_OFFSET), so even a 14-patch axis of a
  non-square input moves slightly, exactly as in the reference.
  """
  gh, gw = out_grid
  table = pos[1:].reshape(grid, grid, -1)
  mh = _interp_matrix(grid, gh, 'bicubic', scale=(gh + DINO_GRID_OFFSET) / grid)
  mw = _interp_matrix(grid, gw, 'bicubic', scale=(gw + DINO_GRID_OFFSET) / grid)
  patches = _resample_grid(table, mh, mw).reshape(gh * gw, -1)
  return jnp.concatenate([pos[:1], patches], axis=0)


class _PatchEmbed(nn.Module):
  """Non-overlapping p x p patches -> width: the stride-p conv as one matmul.

  Rows and columns past the last whole patch are dropped, as the strided conv does.
  """
  cfg: ViTConfig

  @nn.compact
  def __call__(self, images):
    cfg, p = self.cfg, self.cfg.patch
    b, h, w, c = images.shape
    gh, gw = h // p, w // p
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (p, p, c, cfg.width))
    x = images[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = jnp.dot(x.reshape(b, gh * gw, p * p * c), kernel.reshape(p * p * c, cfg.width))
    if cfg.patch_bias:
      x = x + self.param('bias', nn.initializers.zeros, (cfg.width,))
    return x


class ViT(nn.Module):
  """Images [B, H, W, 3] (preprocessed floats) -> features [B, cfg.out_dim]."""
  cfg: ViTConfig

  @nn.compact
  def __call__(self, images):
    cfg = self.cfg
    b, h, w, _ = images.shape
    gh, gw = h // cfg.patch, w // cfg.patch
    x = _PatchEmbed(cfg, name='patch_embed')(images)
    cls = self.param('cls', _normal(), (cfg.width,))
    pos = self.param('pos', _normal(), (cfg.grid * cfg.grid + 1, cfg.width))
    # DINO's hub model keeps its table only for square inputs of the trained grid.
    if cfg.interpolate_pos and not (h == w and gh == cfg.grid):
      pos = dino_position_table(pos, cfg.grid, (gh, gw))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, cfg.width)), x], axis=1) + pos
    if cfg.ln_pre:
      x = _layer_norm(cfg.eps, 'ln_pre')(x)
    x, _ = _blocks(cfg)(x, None)
    x = x[:, 0]
    if cfg.final_norm:
      x = _layer_norm(cfg.eps, 'norm')(x)
    if cfg.proj_dim:
      x = x @ self.param('proj', _normal(cfg.width**-0.5), (cfg.width, cfg.proj_dim))
    return x


class CLIPText(nn.Module):
  """Token ids [B, L] (L <= context) -> features [B, proj_dim], read at each row's largest id."""
  cfg: CLIPTextConfig

  @nn.compact
  def __call__(self, token_ids):
    cfg = self.cfg
    b, length = token_ids.shape
    emb = self.param('token_embedding', _normal(), (cfg.vocab_size, cfg.width))
    pos = self.param('pos', _normal(0.01), (cfg.context, cfg.width))
    x = jnp.take(emb, token_ids, axis=0) + pos[:length]
    x, _ = _blocks(cfg, causal=True)(x, None)
    x = x[jnp.arange(b), jnp.argmax(token_ids, axis=-1)]
    x = _layer_norm(cfg.eps, 'norm')(x)
    return x @ self.param('proj', _normal(cfg.width**-0.5), (cfg.width, cfg.proj_dim))


def _vision_part(params, cfg):
  if isinstance(cfg, CLIPConfig):
    return params['visual'], cfg.vision
  if isinstance(cfg, ViTConfig):
    return params, cfg
  raise ValueError(f'cfg: expected a ViTConfig or CLIPConfig, got {type(cfg).__name__}')


def _text_part(params, cfg):
  if isinstance(cfg, CLIPConfig):
    return params['text'], cfg.text
  if isinstance(cfg, CLIPTextConfig):
    return params, cfg
  raise ValueError(f'cfg: expected a CLIPTextConfig or CLIPConfig, got {type(cfg).__name__}')


@functools.partial(jax.jit, static_argnums=(1,))
def _apply_vit(params, cfg, images):
  return ViT(cfg).apply({'params': params}, images)


@functools.partial(jax.jit, static_argnums=(1,))
def _apply_text(params, cfg, token_ids):
  return CLIPText(cfg).apply({'params': params}, token_ids)


def image_features(params, cfg, images):
  """[B, D] float32 features of preprocessed images [B, H, W, 3] (see `preprocess`).

  `cfg` is a ViTConfig with that tower's params, or a CLIPConfig with the whole CLIP tree.
  """
  params, cfg = _vision_part(params, cfg)
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images: expected [B, H, W, 3], got shape {tuple(images.shape)}')
  grid = (images.shape[1] // cfg.patch, images.shape[2] // cfg.patch)
  if min(grid) < 1:
    raise ValueError(f'images: {images.shape[1]}x{images.shape[2]} is smaller than one '
                     f'{cfg.patch}x{cfg.patch} patch')
  if not cfg.interpolate_pos and grid != (cfg.grid, cfg.grid):
    raise ValueError(f'images: this model takes {cfg.image_size}x{cfg.image_size} inputs (a '
                     f'{cfg.grid}x{cfg.grid} patch grid), got {images.shape[1]}x{images.shape[2]}')
  return _apply_vit(params, cfg, images)


def text_features(params, cfg, token_ids):
  """[B, D] float32 CLIP text features of token ids [B, L] (L <= context, EOT = the largest id).

  Rows padded past their EOT give the same features as unpadded ones (the mask is causal).
  """
  params, cfg = _text_part(params, cfg)
  token_ids = jnp.asarray(token_ids, jnp.int32)
  if token_ids.ndim != 2:
    raise ValueError(f'token_ids: expected [B, L], got shape {tuple(token_ids.shape)}')
  if token_ids.shape[1] > cfg.context:
    raise ValueError(f'token_ids: {token_ids.shape[1]} tokens exceed the context length '
                     f'{cfg.context}')
  return _apply_text(params, cfg, token_ids)


def init_params(cfg, key):
  """Random params (float32) for a ViTConfig, CLIPTextConfig or CLIPConfig."""
  if isinstance(cfg, CLIPConfig):
    kv, kt = jax.random.split(key)
    return {'visual': init_params(cfg.vision, kv), 'text': init_params(cfg.text, kt),
            'logit_scale': jnp.asarray(np.log(1 / 0.07), jnp.float32)}
  if isinstance(cfg, ViTConfig):
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    return ViT(cfg).init(key, images)['params']
  if isinstance(cfg, CLIPTextConfig):
    return CLIPText(cfg).init(key, jnp.zeros((1, cfg.context), jnp.int32))['params']
  raise ValueError(f'cfg: expected a ViTConfig, CLIPTextConfig or CLIPConfig, got '
                   f'{type(cfg).__name__}')


def param_shapes(cfg):
  """ShapeDtypeStructs of `init_params(cfg, ...)` without allocating anything."""
  return jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))


def resized_short_side(height: int, width: int, size: int = INPUT_SIZE) -> Tuple[int, int]:
  """torchvision Resize(size)'s output (h, w): short side `size`, long side truncated."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


def resize_short_side(frames, size: int = INPUT_SIZE, method: str = 'bilinear', quantize=True):
  """uint8 frames [T, H, W, 3] -> float32 [T, h, w, 3], short side resized to `size`.

  This is torchvision's `Resize(size, interpolation, antialias=False)` on a uint8 tensor, what
  VBench applies to decoded videos: torch's interpolate in float32 without antialiasing, then
  (`quantize`) clamped to [0, 255] and rounded half-to-even back to uint8 values.
  """
  t, h, w, _ = frames.shape
  oh, ow = resized_short_side(h, w, size)
  x = jnp.asarray(frames, jnp.float32)
  if (oh, ow) == (h, w):
    return x
  x = _resample_grid(x, _interp_matrix(h, oh, method), _interp_matrix(w, ow, method))
  return jnp.round(jnp.clip(x, 0.0, 255.0)) if quantize else x


def center_crop(x, size: int = INPUT_SIZE):
  """torchvision CenterCrop(size) of [T, H, W, C] with H, W >= size (offsets rounded half-even)."""
  h, w = x.shape[1:3]
  if h < size or w < size:
    raise ValueError(f'center_crop: {h}x{w} is smaller than {size}x{size}')
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return x[:, top:top + size, left:left + size]


def preprocess(frames, kind: str = 'clip'):
  """uint8 video frames [T, H, W, 3] -> the float32 model input VBench builds for `kind`.

    'clip'  vbench/utils.py clip_transform(224) (background consistency): bicubic short-side
            resize to 224, center crop 224x224, /255, CLIP mean / std. -> [T, 224, 224, 3]
    'dino'  vbench/utils.py dino_transform(224) (subject consistency): bilinear short-side resize
            to 224, no crop, /255, ImageNet mean / std. -> [T, 224, 224 * W / H, 3]

  Both are VBench's decoded-video path (uint8 tensors, antialias=False; see `resize_short_side`).
  VBench's text-alignment dimension (appearance_style) resizes PIL images instead (antialiased):
  that path is not reproduced here.
  """
  if kind not in ('clip', 'dino'):
    raise ValueError(f'kind: unknown preprocessing {kind!r}; accepted: clip, dino')
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f'frames: expected [T, H, W, 3], got shape {tuple(frames.shape)}')
  if np.dtype(frames.dtype) != np.uint8:
    raise ValueError(f'frames: expected uint8 RGB frames, got {np.dtype(frames.dtype)}')
  if kind == 'clip':
    x = center_crop(resize_short_side(frames, INPUT_SIZE, 'bicubic'), INPUT_SIZE)
    mean, std = CLIP_MEAN, CLIP_STD
  else:
    x = resize_short_side(frames, INPUT_SIZE, 'bilinear')
    mean, std = IMAGENET_MEAN, IMAGENET_STD
  return (x / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
