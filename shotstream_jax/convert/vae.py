"""Wan2.1 VAE weights from PyTorch: the original `Wan2.1_VAE.pth` or diffusers `AutoencoderKLWan`.

    params = load_vae('Wan2.1-T2V-1.3B/Wan2.1_VAE.pth', config.vae)
    params = vae_from_torch(AutoencoderKLWan(...).state_dict(), config.vae)
    state_dict = vae_to_torch(params, config.vae)     # the original layout, e.g. to ship ours

The layout is detected from the keys. The two layouts differ only in names (diffusers regroups
the original flat `downsamples.N` / `upsamples.N` lists into blocks); tensors are re-laid out
the same way for both: Conv3d [O, I, t, h, w] -> [t, h, w, I, O], Conv2d [O, I, h, w] ->
[h, w, I, O], the attention's 1x1 Conv2d [O, I, 1, 1] -> dense [I, O], RMS gammas -> [C].
"""

from typing import Any, Mapping

import numpy as np

from shotstream_jax.convert import common
from shotstream_jax.models import vae as vae_lib

ORIGINAL, DIFFUSERS = 'original', 'diffusers'

_RES = {  # our ResBlock param -> (original, diffusers) torch module name
    'norm1': ('residual.0', 'norm1'), 'conv1': ('residual.2', 'conv1'),
    'norm2': ('residual.3', 'norm2'), 'conv2': ('residual.6', 'conv2'),
    'shortcut': ('shortcut', 'conv_shortcut'),
}
_TOP = {  # our top-level / head names -> (original, diffusers)
    'quant_conv': ('conv1', 'quant_conv'), 'post_quant_conv': ('conv2', 'post_quant_conv'),
    'conv_in': ('conv1', 'conv_in'), 'norm_out': ('head.0', 'norm_out'),
    'conv_out': ('head.2', 'conv_out'),
}


def detect_layout(keys) -> str:
  keys = set(keys)
  if 'encoder.conv1.weight' in keys or 'decoder.conv1.weight' in keys:
    return ORIGINAL
  if 'encoder.conv_in.weight' in keys or 'decoder.conv_in.weight' in keys:
    return DIFFUSERS
  sample = ', '.join(sorted(keys)[:5])
  raise common.CheckpointError(
      'VAE checkpoint: not a Wan2.1 VAE state dict (expected original names like '
      f'encoder.conv1.weight or diffusers names like encoder.conv_in.weight); first keys: {sample}')


def _module_name(path: tuple, layout: str, cfg) -> str:
  """Torch module name (without .weight/.bias/.gamma) of our param path (minus the leaf)."""
  li = 0 if layout == ORIGINAL else 1
  nres = cfg.num_res_blocks
  if len(path) == 1:
    return _TOP[path[0]][li]
  part, name, rest = path[0], path[1], path[2:]
  if name in ('conv_in', 'norm_out', 'conv_out'):
    return f'{part}.{_TOP[name][li]}'
  if name == 'mid':  # res_0, attn, res_1
    sub = rest[0]
    idx = {'res_0': 0, 'attn': 1, 'res_1': 2}[sub]
    if sub == 'attn':
      base = f'{part}.middle.1' if li == 0 else f'{part}.mid_block.attentions.0'
      return f'{base}.{rest[1]}'
    base = f'{part}.middle.{idx}' if li == 0 else f'{part}.mid_block.resnets.{idx // 2}'
    return f'{base}.{_RES[rest[1]][li]}'
  level = int(name.split('_')[1])
  sub = rest[0]
  if part == 'encoder':  # flat list in both layouts: nres res blocks, then the resample
    n = level * (nres + 1) + (nres if sub == 'downsample' else int(sub.split('_')[1]))
    base = f'encoder.{"downsamples" if li == 0 else "down_blocks"}.{n}'
    if sub == 'downsample':
      return f'{base}.{"resample.1" if rest[1] == "conv" else "time_conv"}'
    return f'{base}.{_RES[rest[1]][li]}'
  # decoder: original is a flat list (nres+1 res blocks, then the resample); diffusers nests.
  if li == 0:
    n = level * (nres + 2) + (nres + 1 if sub == 'upsample' else int(sub.split('_')[1]))
    base = f'decoder.upsamples.{n}'
  elif sub == 'upsample':
    base = f'decoder.up_blocks.{level}.upsamplers.0'
  else:
    base = f'decoder.up_blocks.{level}.resnets.{int(sub.split("_")[1])}'
  if sub == 'upsample':
    return f'{base}.{"resample.1" if rest[1] == "conv" else "time_conv"}'
  return f'{base}.{_RES[rest[1]][li]}'


def _torch_shape(path: tuple, shape: tuple) -> tuple:
  leaf = path[-1]
  if leaf == 'scale':  # RMS gamma: [C, 1, 1] for the (image) attention norm, else [C, 1, 1, 1]
    return shape + ((1, 1) if 'attn' in path else (1, 1, 1))
  if leaf == 'bias':
    return shape
  if len(shape) == 2:  # dense <- 1x1 Conv2d
    return (shape[1], shape[0], 1, 1)
  return (shape[-1], shape[-2]) + shape[:-2]


def _to_ours(path: tuple, arr: np.ndarray) -> np.ndarray:
  leaf = path[-1]
  if leaf == 'scale':
    return arr.reshape(-1)
  if leaf == 'bias':
    return arr
  if arr.ndim == 4 and arr.shape[2:] == (1, 1) and 'attn' in path:
    return arr[:, :, 0, 0].T
  return arr.transpose(tuple(range(2, arr.ndim)) + (1, 0))


def key_map(vae_cfg, layout: str) -> dict:
  """{our param path: (torch key, torch shape)} for a layout."""
  shapes = common.flatten(vae_lib.param_shapes(vae_cfg))
  out = {}
  for path, s in shapes.items():
    leaf = {'kernel': 'weight', 'bias': 'bias', 'scale': 'gamma'}[path[-1]]
    key = f'{_module_name(path[:-1], layout, vae_cfg)}.{leaf}'
    out[path] = (key, _torch_shape(path, tuple(s.shape)))
  return out


def vae_from_torch(state_dict: Mapping[str, Any], vae_cfg) -> dict:
  """Our VAE params (nested dict of fp32 numpy) from a torch state dict in either layout."""
  layout = detect_layout(state_dict.keys())
  kmap = key_map(vae_cfg, layout)
  common.check_keys({k: s for k, s in kmap.values()}, state_dict,
                    f'VAE checkpoint ({layout} Wan2.1 names)')
  params = {}
  for path, (key, _) in kmap.items():
    common.set_in(params, path, _to_ours(path, common.to_numpy(state_dict[key], np.float32)))
  return params


def vae_to_torch(params, vae_cfg) -> dict:
  """The inverse of `vae_from_torch`: original Wan2.1 names -> float32 numpy, PyTorch layout."""
  flat = common.flatten(params)
  out = {}
  for path, (key, shape) in key_map(vae_cfg, ORIGINAL).items():
    arr = np.asarray(flat[path], np.float32)
    if path[-1] != 'bias':
      if arr.ndim == 2:        # dense -> 1x1 Conv2d
        arr = arr.T
      elif arr.ndim > 2:       # [*k, I, O] -> [O, I, *k]
        arr = arr.transpose((arr.ndim - 1, arr.ndim - 2) + tuple(range(arr.ndim - 2)))
    out[key] = np.ascontiguousarray(arr.reshape(shape))
  return out


def load_vae(path: str, vae_cfg) -> dict:
  """Our VAE params from a `.pth` / `.safetensors` file (e.g. `Wan2.1_VAE.pth`)."""
  return vae_from_torch(common.load_state_dict(path), vae_cfg)
