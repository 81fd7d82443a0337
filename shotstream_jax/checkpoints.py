"""Every orbax checkpoint of the project, in one module.

Parameter checkpoints (`save_params` / `restore_params`): an orbax directory holding a plain
params pytree (exports, converted weights, the embedded encoders).

Training checkpoints (`Checkpointer`): train state + data-iterator state in one orbax step
directory.

    ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=3, interval=1000)
    restored = ckpt.restore_latest(abstract_state)        # None on a fresh workdir
    if restored: state, data_state = restored; iterator.set_state(data_state)
    ckpt.save(step, state, iterator.get_state())          # every `interval` steps (async write)
    ckpt.close()                                          # waits for the last write

A step is written to a temporary directory and renamed (or, on object stores, marked with a
commit file) only when every process has finished it: orbax's atomic finalize. `latest_step`
only sees finalized steps, so a run killed in the middle of a save resumes from the previous
complete checkpoint and never reads a partial one.

The data state is the grain iterator's `get_state()` (a small JSON dict, the position in the
deterministic order). Every process reads its own slice of the data at the same position, so
one copy, written by the primary process, restores all of them.
"""

import os
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

DAMAGED = 'damaged'   # <checkpoints>/damaged/<step>[.<n>]: skipped step directories


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

class Checkpointer:
  """A CheckpointManager holding items 'state' (arrays, sharded) and 'data' (JSON)."""

  def __init__(self, directory: str, keep: int = 3, interval: int = 1000,
               async_save: bool = True):
    if keep is not None and keep < 1:
      raise ValueError(f'train.keep_checkpoints: must be >= 1 (or None for all), got {keep}')
    if interval < 1:
      raise ValueError(f'train.checkpoint_every: must be >= 1, got {interval}')
    self.directory = os.path.abspath(directory)
    self.interval = interval
    # Every `interval` steps exactly (orbax alone would also save the first step); the final
    # step is saved with force=True.
    options = ocp.CheckpointManagerOptions(
        should_save_fn=lambda step, _: step % interval == 0, max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'data'))

  def latest_step(self) -> Optional[int]:
    """The newest complete (finalized) step, or None."""
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: Optional[dict] = None, force: bool = False) -> bool:
    """Save if `step` is on the interval (or `force`); returns whether a save started."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {})), force=force)

  def restore(self, step: int, abstract_state) -> Tuple[Any, dict]:
    """(state, data_state) of `step`; `abstract_state` holds ShapeDtypeStructs with shardings."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out.state, dict(out.data or {})

  def restore_latest(self, abstract_state) -> Optional[Tuple[int, Any, dict]]:
    """(step, state, data_state) of the newest loadable checkpoint, or None if there is none.

    A newest step that fails to load (files deleted or truncated by a full disk or an
    interrupted copy) or holds non-finite arrays is skipped for the one before it, with a
    warning naming it and why; skipped step directories are moved to `damaged/` (kept for
    inspection, out of the way of the steps this run saves again). If no step loads, raises
    ValueError listing each and why rather than silently starting from scratch.
    """
    found = newest_loadable(self.directory, self.all_steps(),
                            lambda step: self.restore(step, abstract_state),
                            lambda out: out[0].params)
    if found is None:
      return None
    step, (state, data), skipped = found
    if skipped:
      quarantine(self.directory, skipped)
      self.manager.reload()
    return step, state, data

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or shapes) carrying `shardings`, for restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _reason(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return f'{type(e).__name__}: {lines[0][:200] if lines else ""}'.rstrip(': ')


def newest_loadable(directory: str, steps: Sequence[int], load: Callable[[int], Any],
                    params_of: Callable[[Any], Any] = lambda x: x):
  """(step, load(step), skipped steps) for the newest step of `steps` that loads and whose
  `params_of(loaded)` is finite; None when `steps` is empty. Each skipped step is reported on
  stderr with its reason; ValueError when none loads. The one walk-back rule for resume
  (Checkpointer.restore_latest) and for reading networks out of a workdir (loading.py).
  """
  skipped, reasons = [], []
  for step in sorted(steps, reverse=True):
    try:
      out = load(step)
      bad = nonfinite_paths(params_of(out))
      if bad:
        raise ValueError(f'non-finite params (NaN/Inf at {bad})')
    except Exception as e:  # pylint: disable=broad-except  # any damage: try the step before
      reasons.append(f'step {step}: {_reason(e)}')
      print(f'checkpoint: skipping step {step} in {directory}: {_reason(e)}', file=sys.stderr,
            flush=True)
      skipped.append(step)
      continue
    return step, out, skipped
  if skipped:
    raise ValueError(f'checkpoint: no loadable step in {directory} ({"; ".join(reasons)})')
  return None


def quarantine(directory: str, steps: List[int]):
  """Move step directories to <directory>/damaged/ (never deleted: nothing is lost)."""
  dest_root = os.path.join(directory, DAMAGED)
  os.makedirs(dest_root, exist_ok=True)
  for step in steps:
    src = os.path.join(directory, str(step))
    if not os.path.exists(src):
      continue
    dest, n = os.path.join(dest_root, str(step)), 1
    while os.path.exists(dest):
      dest, n = os.path.join(dest_root, f'{step}.{n}'), n + 1
    os.replace(src, dest)
    print(f'checkpoint: moved damaged step {step} to {dest}', file=sys.stderr, flush=True)
