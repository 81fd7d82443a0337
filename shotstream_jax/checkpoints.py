"""Our own parameter checkpoints: orbax directories holding a plain params pytree."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def save_params(directory: str, params) -> str:
  """Write `params` (numpy or jax arrays) to a new orbax directory; returns its absolute path."""
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    raise FileExistsError(f'checkpoint: {directory} already exists; choose a new --dst')
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory, jax.tree.map(np.asarray, params))
    ckptr.wait_until_finished()
  return directory


def restore_params(directory: str, target=None):
  """Params from an orbax directory written by `save_params` (as numpy-backed jax arrays).

  `target` (a pytree of arrays or ShapeDtypeStructs, e.g. `dit.param_shapes(cfg)`) checks the
  structure and shapes and fixes shardings; without it the saved layout is returned as is.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'checkpoint: no orbax checkpoint directory at {directory}')
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(directory, target) if target is not None else ckptr.restore(directory)
