"""LoRA adapters over WanDiT params as pure tree functions (DESIGN 4.5, stage 4).

The model definition never changes: an adapter is a separate pytree that mirrors the paths of
the Dense layers it targets,

    lora = {'blocks': {'self_attn': {'q': {'lora_a': [L, in, r], 'lora_b': [L, r, out]}}, ...}}

and `merge(params, lora, cfg)` returns `kernel + (alpha / rank) * lora_a @ lora_b` for every
targeted kernel (our Dense kernels are [in, out], stacked on a leading layer axis; PyTorch's
`lora_A.weight` [r, in] and `lora_B.weight` [out, r] are the transposes). Training only the
adapter is `jax.grad(lambda a: loss(merge(base, a, cfg)))(lora)`: the base is a constant.

As in PEFT, `lora_a` starts random (Kaiming-uniform, bound 1/sqrt(in)) and `lora_b` at zero, so
a fresh adapter leaves the model unchanged. The reference (ShotStream stage 4) adapts every
Linear of every block -- `DEFAULT_TARGETS` -- with rank 256 and alpha 256.
"""

import dataclasses
import re
from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from shotstream_jax.convert import common

# Every Linear inside a Wan block: self/cross-attention q, k, v, o and the two FFN layers.
DEFAULT_TARGETS = r'blocks/(self_attn|cross_attn)/(q|k|v|o)|blocks/ffn_(0|2)'

PEFT_PREFIX = 'base_model.model.'


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank r, alpha (scale = alpha / r) and a regex (full match) over Dense paths like
  'blocks/self_attn/q' (the kernel's path without '/kernel')."""
  rank: int = 256
  alpha: float = 256.0
  targets: str = DEFAULT_TARGETS


def as_config(cfg) -> LoraConfig:
  """A LoraConfig from a LoraConfig, a ConfigDict / mapping with rank, alpha, targets."""
  if isinstance(cfg, LoraConfig):
    out = cfg
  else:
    get = cfg.get if hasattr(cfg, 'get') else lambda k, d=None: getattr(cfg, k, d)
    rank = int(get('rank', 256))
    out = LoraConfig(rank, float(get('alpha', None) or rank), get('targets', None) or DEFAULT_TARGETS)
  if out.rank < 1:
    raise ValueError(f'lora.rank: must be a positive integer, got {out.rank}')
  try:
    re.compile(out.targets)
  except re.error as e:
    raise ValueError(f'lora.targets: not a valid regex ({e}): {out.targets!r}') from None
  return out


def scale(cfg) -> float:
  cfg = as_config(cfg)
  return cfg.alpha / cfg.rank


def _nest(flat: Mapping[Tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    common.set_in(out, path, v)
  return out


def target_paths(params, cfg) -> Tuple[Tuple[str, ...], ...]:
  """Paths (without 'kernel') of the Dense layers `cfg.targets` selects, sorted."""
  cfg = as_config(cfg)
  dense = sorted(p[:-1] for p, v in common.flatten(params).items()
                 if p[-1] == 'kernel' and v.ndim >= 2)
  chosen = tuple(p for p in dense if re.fullmatch(cfg.targets, '/'.join(p)))
  if not chosen:
    names = ', '.join('/'.join(p) for p in dense[:12])
    raise ValueError(f'lora.targets: {cfg.targets!r} matches no Dense kernel; paths look like: '
                     f'{names}')
  return chosen


def init_lora(params, cfg, key) -> dict:
  """A fresh adapter for `params`: lora_a ~ U(+-1/sqrt(in)) [..., in, r], lora_b = 0 [..., r, out]."""
  cfg = as_config(cfg)
  flat = common.flatten(params)
  paths = target_paths(params, cfg)
  out = {}
  for path, k in zip(paths, jax.random.split(key, len(paths))):
    kernel = flat[path + ('kernel',)]
    *lead, d_in, d_out = kernel.shape
    bound = 1.0 / np.sqrt(d_in)
    out[path + ('lora_a',)] = jax.random.uniform(k, (*lead, d_in, cfg.rank), jnp.float32,
                                                 -bound, bound)
    out[path + ('lora_b',)] = jnp.zeros((*lead, cfg.rank, d_out), jnp.float32)
  return _nest(out)


def delta(lora_a, lora_b, s):
  """The weight update s * A @ B of one (possibly layer-stacked) kernel."""
  return s * jnp.einsum('...ir,...ro->...io', lora_a, lora_b)


def merge(params, lora, cfg) -> dict:
  """params with every adapted kernel replaced by kernel + (alpha / r) * lora_a @ lora_b."""
  s = scale(cfg)
  flat = dict(common.flatten(params))
  for path, ab in _adapters(lora).items():
    key = path + ('kernel',)
    if key not in flat:
      raise ValueError(f'lora: adapter {"/".join(path)} has no kernel in the params')
    kernel = flat[key]
    d = delta(ab['lora_a'], ab['lora_b'], s)
    if d.shape != kernel.shape:
      raise ValueError(f'lora: adapter {"/".join(path)} gives shape {tuple(d.shape)}, kernel is '
                       f'{tuple(kernel.shape)}')
    flat[key] = (kernel + d).astype(kernel.dtype)
  return _nest(flat)


def _adapters(lora) -> Dict[Tuple[str, ...], dict]:
  flat = common.flatten(lora)
  out: Dict[Tuple[str, ...], dict] = {}
  for path, v in flat.items():
    if path[-1] not in ('lora_a', 'lora_b'):
      raise ValueError(f'lora: unexpected leaf {"/".join(path)}; accepted: lora_a, lora_b')
    out.setdefault(path[:-1], {})[path[-1]] = v
  for path, ab in out.items():
    if len(ab) != 2:
      raise ValueError(f'lora: adapter {"/".join(path)} needs both lora_a and lora_b')
  return out


# ------------------------------------------------------------------ PEFT state dicts

def _torch_linear(path: Tuple[str, ...]) -> Tuple[str, bool]:
  """Our Dense path -> (PEFT/Wan module name with '{i}' for the layer, stacked?)."""
  if path[0] == 'blocks':
    rest = list(path[1:])
    if len(rest) == 1 and rest[0].startswith('ffn_'):  # ffn_0 -> ffn.0
      rest = ['ffn', rest[0][4:]]
    return 'blocks.{i}.' + '.'.join(rest), True
  if path[0] == 'patch_embedding':
    raise ValueError('lora.targets: patch_embedding is a Conv3d in PyTorch; PEFT names cover '
                     'Linear layers only')
  name = '.'.join(path)
  for ours, theirs in (('text_embedding_', 'text_embedding.'), ('time_embedding_', 'time_embedding.'),
                       ('time_projection', 'time_projection.1')):
    if path[0].startswith(ours):
      name = theirs + path[0][len(ours):] + ''.join('.' + p for p in path[1:])
  return name, False


def to_peft(lora) -> Dict[str, np.ndarray]:
  """PEFT names `base_model.model.blocks.N.<linear>.lora_{A,B}.weight` (lora_A [r, in],
  lora_B [out, r]) as float32 numpy, the layout of the reference's `generator_lora`."""
  out = {}
  for path, ab in _adapters(lora).items():
    name, stacked = _torch_linear(path)
    a = np.asarray(ab['lora_a'], np.float32)
    b = np.asarray(ab['lora_b'], np.float32)
    layers = range(a.shape[0]) if stacked else [None]
    for i in layers:
      ai, bi = (a, b) if i is None else (a[i], b[i])
      base = PEFT_PREFIX + name.format(i=i)
      out[base + '.lora_A.weight'] = np.ascontiguousarray(ai.T)
      out[base + '.lora_B.weight'] = np.ascontiguousarray(bi.T)
  return out


def from_peft(state_dict: Mapping[str, Any], params, cfg) -> dict:
  """An adapter pytree from a PEFT state dict (torch tensors or arrays) for the targets of
  `cfg` in `params`. Raises ValueError naming missing / unexpected keys or wrong shapes."""
  cfg = as_config(cfg)
  flat = common.flatten(params)
  expected, where = {}, {}
  for path in target_paths(params, cfg):
    kernel = flat[path + ('kernel',)]
    name, stacked = _torch_linear(path)
    d_in, d_out = kernel.shape[-2:]
    for i in (range(kernel.shape[0]) if stacked else [None]):
      base = PEFT_PREFIX + name.format(i=i)
      expected[base + '.lora_A.weight'] = (cfg.rank, d_in)
      expected[base + '.lora_B.weight'] = (d_out, cfg.rank)
      where[base] = (path, i)
  common.check_keys(expected, state_dict, 'LoRA state dict')
  out: Dict[Tuple[str, ...], Any] = {}
  for base, (path, i) in where.items():
    a = common.to_numpy(state_dict[base + '.lora_A.weight'], np.float32).T
    b = common.to_numpy(state_dict[base + '.lora_B.weight'], np.float32).T
    if i is None:
      out[path + ('lora_a',)], out[path + ('lora_b',)] = a, b
      continue
    n = flat[path + ('kernel',)].shape[0]
    for leaf, value in (('lora_a', a), ('lora_b', b)):
      buf = out.setdefault(path + (leaf,), np.empty((n,) + value.shape, np.float32))
      buf[i] = value
  return jax.tree.map(jnp.asarray, _nest(out))
