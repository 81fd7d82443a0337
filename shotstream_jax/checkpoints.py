"""Our own parameter checkpoints: orbax directories holding a plain params pytree."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


def save_params(directory: str, params, field: str = '--dst') -> str:
  """Write `params` (numpy or jax arrays) to a new orbax directory; returns its absolute path.

  Synchronous on purpose: a failed write of orbax's asynchronous checkpointer leaves background
  threads that keep the interpreter from exiting; this one raises and is done. Non-finite
  arrays are refused (they would load as a broken model).
  """
  from shotstream_jax import cli  # pylint: disable=g-import-not-at-top
  directory = cli.check_new_path(directory, field)
  params = jax.tree.map(np.asarray, params)
  bad = nonfinite_paths(params)
  if bad:
    raise NonFiniteParamsError(f'{field}: refusing to save non-finite params (NaN/Inf at {bad})')
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
    ckptr.save(directory, args=ocp.args.StandardSave(params))
  return directory


class NonFiniteParamsError(ValueError):
  """Weights with NaN/Inf: refused on save and on load (they make black or noise videos)."""


def nonfinite_paths(tree, limit: int = 3):
  """Key paths (one string, e.g. "['head']['bias']") of up to `limit` floating leaves holding
  NaN or Inf; empty when all are finite."""
  flat = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if jnp.issubdtype(x.dtype, jnp.inexact)]   # bfloat16 included
  flags = finite_flags([x for _, x in flat])
  return ', '.join([jax.tree_util.keystr(p) for (p, _), ok in zip(flat, flags) if not ok][:limit])


def finite_flags(arrays) -> list:
  """For each array (jax or numpy), whether it is free of NaN and Inf.

  A jax array is checked where its shards live, with no collective at all: the shards held by
  each device go through one single-device jitted program and only one bool per shard comes
  back. A reduction over sharded arrays needs all-reduces, and several independent ones in a
  program (or a stream of small programs) deadlocked XLA:CPU's in-process collectives on a
  simulated 8-device mesh on 2 cores. Replicated shards are checked once (replica 0); with
  several processes the flags are combined across them, so every process decides alike.
  """
  flags = [True] * len(arrays)
  by_device = {}
  for i, x in enumerate(arrays):
    if isinstance(x, jax.Array):
      for shard in x.addressable_shards:
        if shard.replica_id == 0:
          by_device.setdefault(shard.device, []).append((i, shard.data))
    else:
      flags[i] = bool(np.all(np.isfinite(x)))
  # Dispatch every device's program before reading any result, so devices run concurrently.
  pending = [(items, _all_finite_each([d for _, d in items])) for items in by_device.values()]
  for items, result in pending:
    for (i, _), ok in zip(items, jax.device_get(result)):
      flags[i] = flags[i] and bool(ok)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = [bool(f) for f in np.all(multihost_utils.process_allgather(np.array(flags)), 0)]
  return flags


@jax.jit
def _all_finite_each(arrays):
  return [jnp.all(jnp.isfinite(x)) for x in arrays]


def restore_params(directory: str, target=None):
  """Params from an orbax directory written by `save_params` (as numpy-backed jax arrays).

  `target` (a pytree of arrays or ShapeDtypeStructs, e.g. `dit.param_shapes(cfg)`) checks the
  structure and shapes and fixes shardings; without it the saved layout is returned as is.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'checkpoint: no orbax checkpoint directory at {directory}')
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(directory, target) if target is not None else ckptr.restore(directory)
  bad = nonfinite_paths(params)
  if bad:
    raise NonFiniteParamsError(f'checkpoint: {directory} holds non-finite params (NaN/Inf at '
                               f'{bad})')
  return params
