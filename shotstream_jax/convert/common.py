"""Shared pieces of the PyTorch-checkpoint importers: file loading, tensor conversion, key checks.

State dicts are read lazily where the format allows it (safetensors via `safe_open`, `.pt/.pth`
via `torch.load(mmap=True)`), and converters turn one tensor at a time into numpy so that a large
checkpoint (umT5-XXL, ~11 GiB in bf16) never exists twice in memory.
"""

import os
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np

MAX_LISTED = 8


class CheckpointError(ValueError):
  """A checkpoint file that is missing, unreadable, or does not match the model."""


def load_state_dict(path: str) -> Mapping[str, Any]:
  """name -> tensor mapping of a `.safetensors` (no torch needed) or `.pt/.pth` file.

  Values are numpy arrays (safetensors) or torch tensors (pickles); convert them with
  `to_numpy` one at a time.
  """
  if not os.path.exists(path):
    raise CheckpointError(f'checkpoint: file not found: {path}')
  if os.path.isdir(path):
    raise CheckpointError(f'checkpoint: {path} is a directory; pass the weights file itself')
  ext = os.path.splitext(path)[1].lower()
  if ext == '.safetensors':
    return _SafetensorsDict(path)
  if ext in ('.pt', '.pth', '.bin', '.ckpt'):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise CheckpointError(f'checkpoint: reading {path} needs torch (pip install -r '
                            'requirements-test.txt); safetensors files do not') from e
    import zipfile  # pylint: disable=g-import-not-at-top
    # mmap needs torch's zip format (torch >= 1.6); the legacy format of older saves is read
    # into memory instead, still with weights_only (no code from the file runs).
    try:
      sd = torch.load(path, map_location='cpu', mmap=zipfile.is_zipfile(path), weights_only=True)
    except Exception as e:  # truncated zip, not a pickle, ...
      first = (str(e).strip().splitlines() or [''])[0]   # torch's messages run to many lines
      raise CheckpointError(f'checkpoint: cannot read {path} as a PyTorch file '
                            f'({type(e).__name__}: {first})') from e
    if not isinstance(sd, Mapping):
      raise CheckpointError(f'checkpoint: {path} holds a {type(sd).__name__}, not a state dict')
    return sd
  raise CheckpointError(f'checkpoint: unknown file type {ext!r} for {path}; accepted: '
                        '.safetensors, .pt, .pth, .bin, .ckpt')


class _SafetensorsDict(Mapping):
  """Lazy read-only mapping over a safetensors file (numpy, no torch)."""

  def __init__(self, path):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    try:
      self._file = safe_open(path, framework='numpy')
      self._keys = list(self._file.keys())
    except Exception as e:
      raise CheckpointError(f'checkpoint: cannot read {path} as safetensors '
                            f'({type(e).__name__}: {e})') from e
    self._path = path

  def __getitem__(self, key):
    if key not in self._keys:
      raise KeyError(key)
    try:
      return self._file.get_tensor(key)
    except Exception as e:
      raise CheckpointError(f'checkpoint: tensor {key!r} of {self._path} is unreadable '
                            f'(truncated file?): {e}') from e

  def __iter__(self):
    return iter(self._keys)

  def __len__(self):
    return len(self._keys)


def to_numpy(value, dtype=None) -> np.ndarray:
  """A numpy array from a numpy array or torch tensor (bf16 kept exact via ml_dtypes)."""
  if isinstance(value, np.ndarray):
    arr = value
  elif hasattr(value, 'detach'):  # torch.Tensor
    t = value.detach().cpu()
    if str(t.dtype) == 'torch.bfloat16':
      import torch  # pylint: disable=g-import-not-at-top
      arr = t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      arr = t.numpy()
  else:
    arr = np.asarray(value)
  return arr if dtype is None else arr.astype(dtype)


def shape_of(value) -> tuple:
  return tuple(int(d) for d in value.shape)


def check_keys(expected: Mapping[str, tuple], got: Mapping[str, Any], what: str) -> None:
  """Raise CheckpointError listing missing / unexpected keys and shape mismatches (first few)."""
  missing = [k for k in expected if k not in got]
  unexpected = [k for k in got if k not in expected]
  wrong = [f'{k}: expected {expected[k]}, got {shape_of(got[k])}'
           for k in expected if k in got and shape_of(got[k]) != tuple(expected[k])]
  if not (missing or unexpected or wrong):
    return
  parts = []
  for label, items in (('missing keys', missing), ('unexpected keys', unexpected),
                       ('wrong shapes', wrong)):
    if items:
      more = f' ... (+{len(items) - MAX_LISTED} more)' if len(items) > MAX_LISTED else ''
      parts.append(f'{len(items)} {label}: {", ".join(items[:MAX_LISTED])}{more}')
  raise CheckpointError(f'{what} does not match the model config: ' + '; '.join(parts))


def strip_prefix(state_dict: Mapping[str, Any], prefixes: Iterable[str]) -> dict:
  """Drop the first matching prefix from every key that has one."""
  out = {}
  for k, v in state_dict.items():
    for p in prefixes:
      if k.startswith(p):
        k = k[len(p):]
        break
    out[k] = v
  return out


def set_in(tree: dict, path: tuple, value) -> None:
  """tree[path[0]][path[1]]... = value, creating dicts on the way."""
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def get_in(tree: Mapping, path: tuple):
  """tree[path[0]][path[1]]..."""
  for p in path:
    tree = tree[p]
  return tree


def flatten(tree: Mapping, prefix: tuple = ()) -> dict:
  """{path tuple: leaf} of a nested dict."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out
