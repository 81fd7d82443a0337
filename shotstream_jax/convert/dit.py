"""Import Wan / ShotStream / diffusers DiT weights into `WanDiT` params (DESIGN 4.1, 4.7).

Accepted layouts (detected from the keys):
  original   Wan's `diffusion_pytorch_model.safetensors`: `blocks.N.self_attn.q.weight`, ...
  shotstream ShotStream `.pt`: `{'generator': {'model.<original name>': ...}}` (wrapper and
             prefix optional)
  diffusers  `WanTransformer3DModel`: `blocks.N.attn1.to_q.weight`, `condition_embedder.*`, ...

Everything is mapped to the original names first (diffusers renames 1:1, no reshapes), checked
against the shapes the config implies, then copied tensor by tensor into stacked numpy arrays.
"""

import re
from typing import Any, Iterator, Mapping, Tuple

import numpy as np

from shotstream_jax.convert import common

_DIFFUSERS_RENAMES = (
    (r'^condition_embedder\.time_embedder\.linear_1\.', 'time_embedding.0.'),
    (r'^condition_embedder\.time_embedder\.linear_2\.', 'time_embedding.2.'),
    (r'^condition_embedder\.time_proj\.', 'time_projection.1.'),
    (r'^condition_embedder\.text_embedder\.linear_1\.', 'text_embedding.0.'),
    (r'^condition_embedder\.text_embedder\.linear_2\.', 'text_embedding.2.'),
    (r'^blocks\.(\d+)\.attn1\.to_out\.0\.', r'blocks.\1.self_attn.o.'),
    (r'^blocks\.(\d+)\.attn1\.to_([qkv])\.', r'blocks.\1.self_attn.\2.'),
    (r'^blocks\.(\d+)\.attn1\.norm_([qk])\.', r'blocks.\1.self_attn.norm_\2.'),
    (r'^blocks\.(\d+)\.attn2\.to_out\.0\.', r'blocks.\1.cross_attn.o.'),
    (r'^blocks\.(\d+)\.attn2\.to_([qkv])\.', r'blocks.\1.cross_attn.\2.'),
    (r'^blocks\.(\d+)\.attn2\.norm_([qk])\.', r'blocks.\1.cross_attn.norm_\2.'),
    (r'^blocks\.(\d+)\.norm2\.', r'blocks.\1.norm3.'),
    (r'^blocks\.(\d+)\.ffn\.net\.0\.proj\.', r'blocks.\1.ffn.0.'),
    (r'^blocks\.(\d+)\.ffn\.net\.2\.', r'blocks.\1.ffn.2.'),
    (r'^blocks\.(\d+)\.scale_shift_table$', r'blocks.\1.modulation'),
    (r'^scale_shift_table$', 'head.modulation'),
    (r'^proj_out\.', 'head.head.'),
)

# Per-block tensors: original suffix -> (path under params['blocks'], kind).
_BLOCK_TENSORS = {
    'modulation': (('modulation',), 'copy'),
    'norm3.weight': (('norm3', 'scale'), 'copy'),
    'norm3.bias': (('norm3', 'bias'), 'copy'),
    'ffn.0.weight': (('ffn_0', 'kernel'), 'linear'),
    'ffn.0.bias': (('ffn_0', 'bias'), 'copy'),
    'ffn.2.weight': (('ffn_2', 'kernel'), 'linear'),
    'ffn.2.bias': (('ffn_2', 'bias'), 'copy'),
}
for _attn in ('self_attn', 'cross_attn'):
  for _p in 'qkvo':
    _BLOCK_TENSORS[f'{_attn}.{_p}.weight'] = ((_attn, _p, 'kernel'), 'linear')
    _BLOCK_TENSORS[f'{_attn}.{_p}.bias'] = ((_attn, _p, 'bias'), 'copy')
  for _p in 'qk':
    _BLOCK_TENSORS[f'{_attn}.norm_{_p}.weight'] = ((_attn, f'norm_{_p}', 'scale'), 'copy')

# Top-level tensors: original name -> (param path, kind).
_TOP_TENSORS = {
    'patch_embedding.weight': (('patch_embedding', 'kernel'), 'conv'),
    'patch_embedding.bias': (('patch_embedding', 'bias'), 'copy'),
    'head.modulation': (('head', 'modulation'), 'copy'),
    'head.head.weight': (('head', 'head', 'kernel'), 'linear'),
    'head.head.bias': (('head', 'head', 'bias'), 'copy'),
}
for _torch, _ours in (('text_embedding.0', 'text_embedding_0'), ('text_embedding.2', 'text_embedding_2'),
                      ('time_embedding.0', 'time_embedding_0'), ('time_embedding.2', 'time_embedding_2'),
                      ('time_projection.1', 'time_projection')):
  _TOP_TENSORS[f'{_torch}.weight'] = ((_ours, 'kernel'), 'linear')
  _TOP_TENSORS[f'{_torch}.bias'] = ((_ours, 'bias'), 'copy')


def detect_layout(keys) -> str:
  keys = list(keys)
  if any(k.startswith('condition_embedder.') or '.attn1.' in k for k in keys):
    return 'diffusers'
  if any(k.startswith('blocks.') or k.startswith('patch_embedding.') for k in keys):
    return 'original'
  raise common.CheckpointError(
      'checkpoint: not a Wan / ShotStream / diffusers DiT state dict (no `blocks.*`, '
      f'`patch_embedding.*` or `condition_embedder.*` keys; first keys: {keys[:5]})')


def unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
  """Strip ShotStream's `{'generator': ...}` wrapper and `model.` prefix, if present."""
  if 'generator' in state_dict and isinstance(state_dict['generator'], Mapping):
    state_dict = state_dict['generator']
  non_tensor = [k for k, v in state_dict.items() if not hasattr(v, 'shape')]
  if non_tensor:
    raise common.CheckpointError(
        'checkpoint: not a ShotStream/Wan state dict: entries without tensors '
        f'{non_tensor[:5]} (a ShotStream .pt holds {{"generator": {{"model.<name>": tensor}}}})')
  if state_dict and all(k.startswith('model.') for k in state_dict):
    state_dict = common.strip_prefix(state_dict, ('model.',))
  return state_dict


def to_original_names(state_dict: Mapping[str, Any]) -> dict:
  """Any accepted layout -> {original Wan name: tensor} (values are not copied)."""
  state_dict = unwrap(state_dict)
  if detect_layout(state_dict.keys()) == 'original':
    return dict(state_dict)
  out = {}
  for key, value in state_dict.items():
    for pattern, repl in _DIFFUSERS_RENAMES:
      new, n = re.subn(pattern, repl, key)
      if n:
        key = new
        break
    out[key] = value
  return out


def expected_shapes(cfg) -> dict:
  """{original name: PyTorch shape} that a checkpoint of `cfg` must have."""
  d, f, pt, ph, pw = cfg.dim, cfg.ffn_dim, *cfg.patch_size
  shapes = {
      'patch_embedding.weight': (d, cfg.in_channels, pt, ph, pw), 'patch_embedding.bias': (d,),
      'text_embedding.0.weight': (d, cfg.text_dim), 'text_embedding.0.bias': (d,),
      'text_embedding.2.weight': (d, d), 'text_embedding.2.bias': (d,),
      'time_embedding.0.weight': (d, cfg.freq_dim), 'time_embedding.0.bias': (d,),
      'time_embedding.2.weight': (d, d), 'time_embedding.2.bias': (d,),
      'time_projection.1.weight': (6 * d, d), 'time_projection.1.bias': (6 * d,),
      'head.modulation': (1, 2, d),
      'head.head.weight': (cfg.out_channels * pt * ph * pw, d),
      'head.head.bias': (cfg.out_channels * pt * ph * pw,),
  }
  block = {'modulation': (1, 6, d), 'norm3.weight': (d,), 'norm3.bias': (d,),
           'ffn.0.weight': (f, d), 'ffn.0.bias': (f,), 'ffn.2.weight': (d, f), 'ffn.2.bias': (d,)}
  for attn in ('self_attn', 'cross_attn'):
    for p in 'qkvo':
      block[f'{attn}.{p}.weight'] = (d, d)
      block[f'{attn}.{p}.bias'] = (d,)
    for p in 'qk':
      block[f'{attn}.norm_{p}.weight'] = (d,)
  for i in range(cfg.num_layers):
    shapes.update({f'blocks.{i}.{k}': v for k, v in block.items()})
  return shapes


def _to_ours(value, kind: str) -> np.ndarray:
  x = common.to_numpy(value, np.float32)
  if kind == 'linear':  # PyTorch Linear [out, in] -> Dense kernel [in, out]
    return x.T
  if kind == 'conv':  # Conv3d [D, C, kt, kh, kw] -> patch Dense [(kt, kh, kw, C), D]
    return x.transpose(2, 3, 4, 1, 0).reshape(-1, x.shape[0])
  return x


def _items(cfg) -> Iterator[Tuple[str, tuple, str, Any]]:
  """(original name, param path, kind, layer index or None) for every tensor."""
  for name, (path, kind) in _TOP_TENSORS.items():
    yield name, path, kind, None
  for i in range(cfg.num_layers):
    for suffix, (path, kind) in _BLOCK_TENSORS.items():
      yield f'blocks.{i}.{suffix}', ('blocks',) + path, kind, i


def dit_from_torch(state_dict: Mapping[str, Any], model_cfg) -> dict:
  """WanDiT params (float32 numpy pytree) from a state dict in any accepted layout.

  Raises:
    CheckpointError (a ValueError) listing missing / unexpected keys and wrong shapes.
  """
  sd = to_original_names(state_dict)
  common.check_keys(expected_shapes(model_cfg), sd, 'DiT checkpoint')
  params: dict = {}
  for name, path, kind, layer in _items(model_cfg):
    value = _to_ours(sd[name], kind)
    if layer is None:
      common.set_in(params, path, value)
      continue
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    if path[-1] not in node:
      node[path[-1]] = np.empty((model_cfg.num_layers,) + value.shape, np.float32)
    node[path[-1]][layer] = value
  return params


def dit_to_torch(params, model_cfg) -> dict:
  """The inverse of `dit_from_torch`: original Wan names -> float32 numpy in PyTorch layout."""
  out = {}
  for name, path, kind, layer in _items(model_cfg):
    value = np.asarray(common.get_in(params, path), np.float32)
    value = value if layer is None else value[layer]
    if kind == 'linear':
      value = value.T
    elif kind == 'conv':  # patch Dense [(kt, kh, kw, C), D] -> Conv3d [D, C, kt, kh, kw]
      pt, ph, pw = model_cfg.patch_size
      value = value.reshape(pt, ph, pw, -1, value.shape[-1]).transpose(4, 3, 0, 1, 2)
    out[name] = np.ascontiguousarray(value)
  return out


def shotstream_state_dict(params, model_cfg) -> dict:
  """DiT params as a ShotStream checkpoint's state dict (`model.<original name>` -> contiguous
  float32 numpy): what the exports and the shipped model write; `dit_from_torch` reads it."""
  return {'model.' + k: np.ascontiguousarray(v) for k, v in dit_to_torch(params, model_cfg).items()}


def load_dit(path: str, model_cfg) -> dict:
  """WanDiT params from a `.safetensors` / `.pt` / `.pth` file in any accepted layout."""
  return dit_from_torch(common.load_state_dict(path), model_cfg)
