"""umT5 encoder weights (PyTorch) -> our params (models/umt5.py).

Two layouts are accepted and told apart by their keys:
  original     Wan's `models_t5_umt5-xxl-enc-bf16.pth`: `token_embedding`, `blocks.N.{norm1,
               attn.{q,k,v,o}, norm2, ffn.gate.0, ffn.fc1, ffn.fc2, pos_embedding.embedding}`,
               `norm`
  transformers `UMT5EncoderModel`: `shared` / `encoder.embed_tokens`, `encoder.block.N.layer.0.
               {SelfAttention.{q,k,v,o,relative_attention_bias}, layer_norm}`,
               `encoder.block.N.layer.1.{DenseReluDense.{wi_0,wi_1,wo}, layer_norm}`,
               `encoder.final_layer_norm`
The umT5-XXL file is 11 GiB in bf16: tensors are converted one at a time into preallocated
stacked arrays in the target dtype, and each finished leaf goes to the device before the next
is built, so the host never holds the weights twice (measured: 12.6 GiB peak for the 10.6 GiB
XXL, tests/test_umt5.py). Shapes are checked before any conversion; for safetensors that reads
each tensor once.
"""

import types
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from shotstream_jax.convert import common

# our block leaf path -> (original name, transformers name, is a Linear weight to transpose)
_BLOCK = {
    ('norm1', 'scale'): ('norm1.weight', 'layer.0.layer_norm.weight', False),
    ('attn', 'q', 'kernel'): ('attn.q.weight', 'layer.0.SelfAttention.q.weight', True),
    ('attn', 'k', 'kernel'): ('attn.k.weight', 'layer.0.SelfAttention.k.weight', True),
    ('attn', 'v', 'kernel'): ('attn.v.weight', 'layer.0.SelfAttention.v.weight', True),
    ('attn', 'o', 'kernel'): ('attn.o.weight', 'layer.0.SelfAttention.o.weight', True),
    ('pos_embedding',): ('pos_embedding.embedding.weight',
                         'layer.0.SelfAttention.relative_attention_bias.weight', False),
    ('norm2', 'scale'): ('norm2.weight', 'layer.1.layer_norm.weight', False),
    ('ffn', 'gate', 'kernel'): ('ffn.gate.0.weight', 'layer.1.DenseReluDense.wi_0.weight', True),
    ('ffn', 'fc1', 'kernel'): ('ffn.fc1.weight', 'layer.1.DenseReluDense.wi_1.weight', True),
    ('ffn', 'fc2', 'kernel'): ('ffn.fc2.weight', 'layer.1.DenseReluDense.wo.weight', True),
}
# our top-level leaf path -> (original name, transformers name)
_TOP = {
    ('token_embedding',): ('token_embedding.weight', 'shared.weight'),
    ('norm', 'scale'): ('norm.weight', 'encoder.final_layer_norm.weight'),
}
LAYOUTS = ('original', 'transformers')
_DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16}


def detect_layout(keys) -> str:
  """'original' or 'transformers' from a state dict's key names."""
  keys = list(keys)
  if any(k.startswith(('encoder.block.', 'shared.', 'encoder.embed_tokens.')) for k in keys):
    return 'transformers'
  if any(k.startswith(('blocks.', 'token_embedding.')) for k in keys):
    return 'original'
  raise common.CheckpointError(
      'umT5 checkpoint: not a umT5 encoder state dict (expected keys like token_embedding.weight '
      f'or encoder.block.0...; got {", ".join(keys[:4]) or "no keys"})')


def _torch_shapes(cfg) -> dict:
  """Our leaf path -> the PyTorch tensor shape (Linear weights are [out, in])."""
  d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
  return {
      ('norm1', 'scale'): (d,), ('norm2', 'scale'): (d,),
      ('attn', 'q', 'kernel'): (inner, d), ('attn', 'k', 'kernel'): (inner, d),
      ('attn', 'v', 'kernel'): (inner, d), ('attn', 'o', 'kernel'): (d, inner),
      ('pos_embedding',): (cfg.relative_buckets, cfg.num_heads),
      ('ffn', 'gate', 'kernel'): (cfg.d_ff, d), ('ffn', 'fc1', 'kernel'): (cfg.d_ff, d),
      ('ffn', 'fc2', 'kernel'): (d, cfg.d_ff),
      ('token_embedding',): (cfg.vocab_size, d), ('norm', 'scale'): (d,),
  }


def _names(cfg, layout):
  """{checkpoint key: (our top path or None, layer index or None, block path or None)}."""
  col = LAYOUTS.index(layout)
  names = {}
  for path, keys in _TOP.items():
    names[keys[col]] = (path, None, None)
  prefix = 'blocks.{}.' if layout == 'original' else 'encoder.block.{}.'
  for i in range(cfg.num_layers):
    for path, keys in _BLOCK.items():
      names[prefix.format(i) + keys[col]] = (None, i, path)
  return names


def checkpoint_shapes(text_cfg, layout: str) -> dict:
  """{checkpoint key: PyTorch shape} that a `layout` state dict for `text_cfg` must have."""
  if layout not in LAYOUTS:
    raise ValueError(f'layout: unknown layout {layout!r}; accepted: {", ".join(LAYOUTS)}')
  shapes = _torch_shapes(text_cfg)
  return {k: shapes[top or blk] for k, (top, _, blk) in _names(text_cfg, layout).items()}


def umt5_from_torch(state_dict: Mapping[str, Any], text_cfg, dtype=None) -> dict:
  """Our umT5 params from a PyTorch umT5 encoder state dict (numpy arrays or torch tensors).

  Args:
    state_dict: name -> tensor, in either layout (see module docstring); read lazily.
    text_cfg: the `text` config section the params are for.
    dtype: param dtype, 'float32' or 'bfloat16' (default: bf16 if `text_cfg.dtype` is bf16).

  Raises:
    CheckpointError: the keys or shapes do not match `text_cfg` (the first few are listed).
  """
  dtype = dtype or ('bfloat16' if text_cfg.dtype == 'bfloat16' else 'float32')
  name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
  if name not in _DTYPES:
    raise ValueError(f'dtype: unknown param dtype {dtype!r}; accepted: {", ".join(_DTYPES)}')
  np_dtype = _DTYPES[name]
  layout = detect_layout(state_dict.keys())
  # Our key -> the checkpoint's key. Values stay in `state_dict` (lazy for safetensors / mmap).
  src = {k: k for k in state_dict.keys()}
  if layout == 'transformers':  # tied copies of one embedding: either or both may be present
    alias = src.pop('encoder.embed_tokens.weight', None)
    if 'shared.weight' not in src and alias is not None:
      src['shared.weight'] = alias
  shapes = _torch_shapes(text_cfg)
  names = _names(text_cfg, layout)
  expected = checkpoint_shapes(text_cfg, layout)
  got = {k: types.SimpleNamespace(shape=common.shape_of(state_dict[v])) for k, v in src.items()}
  common.check_keys(expected, got, f'umT5 checkpoint ({layout} layout)')

  params = {}
  for path in _BLOCK:  # one stacked leaf at a time, filled layer by layer
    shape = shapes[path]
    leaf_shape = shape[::-1] if _BLOCK[path][2] else shape
    leaf = np.empty((text_cfg.num_layers,) + leaf_shape, np_dtype)
    for key, (_, i, blk) in names.items():
      if blk == path:
        arr = common.to_numpy(state_dict[src[key]])
        leaf[i] = arr.T if _BLOCK[path][2] else arr
        del arr
    common.set_in(params, ('blocks',) + path, _to_device(leaf))
    del leaf
  for path, keys in _TOP.items():
    arr = common.to_numpy(state_dict[src[keys[LAYOUTS.index(layout)]]])
    common.set_in(params, path, _to_device(arr.astype(np_dtype, copy=False)))
    del arr
  return params


def umt5_to_torch(params, text_cfg, layout: str = 'original') -> dict:
  """The inverse of `umt5_from_torch`: checkpoint names of `layout` -> float32 numpy."""
  out = {}
  for key, (top, layer, blk) in _names(text_cfg, layout).items():
    if top is not None:
      out[key] = np.asarray(common.get_in(params, top), np.float32)
      continue
    arr = np.asarray(common.get_in(params, ('blocks',) + blk)[layer], np.float32)
    out[key] = np.ascontiguousarray(arr.T if _BLOCK[blk][2] else arr)
  return out


def _to_device(arr: np.ndarray) -> jax.Array:
  out = jnp.asarray(arr)
  out.block_until_ready()
  return out


def load_umt5(path: str, text_cfg, dtype=None) -> dict:
  """Our umT5 params from a `.pth` / `.safetensors` file in either layout (see umt5_from_torch).

  Files saved as a {'state_dict' | 'model': {...}} wrapper are unwrapped.
  """
  sd = common.load_state_dict(path)
  for wrapper in ('state_dict', 'model'):
    if wrapper in sd and isinstance(sd[wrapper], Mapping):
      sd = sd[wrapper]
  return umt5_from_torch(sd, text_cfg, dtype)
