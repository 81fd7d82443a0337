"""A thin, stage-agnostic training loop: sharded jitted steps, resumable, logged.

    state = train(config, workdir)        # config: configs/train/<stage>.py:get_config(preset)

A *stage* (training/stage.py: `Stage`) supplies the networks, their init, the data and the
loss; the loop owns everything else: mesh and shardings, the stage's optimizer (AdamW per trained
network, training/optim.py), the `TrainState` pytree (params, opt_state, step, rng, EMA)
checkpointed with the data position, automatic resume, non-finite guards, jsonl + TensorBoard
metrics and a progress bar.
"""

import contextlib
import functools
import importlib
import logging
import os
import time
from typing import Any, Callable, Dict, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from shotstream_jax import checkpoints
from shotstream_jax.training import metrics as metrics_lib
from shotstream_jax.training import optim as optim_lib
from shotstream_jax.training import sharding as sharding_lib

# config.stage -> 'module:Class' (imported lazily, so stages are independent files).
STAGES = {
    'vae': 'shotstream_jax.training.vae_stage:VaeStage',
    'teacher': 'shotstream_jax.training.teacher_stage:TeacherStage',
    'ode_init': 'shotstream_jax.training.ode_stage:OdeInitStage',
    'dmd_intra': 'shotstream_jax.training.dmd_stage:DmdStage',
    'dmd_inter': 'shotstream_jax.training.dmd_stage:DmdStage',
}
CONFIG_FILE = 'config.json'   # the run's config, written into its workdir


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: completed steps (skipped non-finite steps included)
  params: Any            # {network: params}, fp32 master weights
  opt_state: Any
  rng: jax.Array         # uint32 raw key data (checkpoint-friendly), split once per step
  # {network: params}: exponential moving averages of the networks with `optim.<net>.ema_decay`
  # > 0 (empty otherwise). Held-out metrics and every loader read these, not the raw params.
  ema: Any = flax.struct.field(default_factory=dict)


class NonFiniteError(FloatingPointError):
  """A loss or gradient was NaN/Inf and `train.skip_nonfinite` is False."""


def get_stage(config, workdir: str):
  if config.stage not in STAGES:
    raise ValueError(f'stage: unknown {config.stage!r}; accepted: {", ".join(STAGES)}')
  module, cls = STAGES[config.stage].split(':')
  return getattr(importlib.import_module(module), cls)(config, workdir)


# ----------------------------------------------------------------------------- step


def _tree_where(ok, new, old):
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def with_ema(step_fn: Callable, decays: Dict[str, float]) -> Callable:
  """step_fn that also moves `state.ema[net]` towards the updated params of each network.

  Why: a from-scratch diffusion model trained at a high learning rate with small batches has
  noisy weights; its samples are blurred averages of where the weights wander, and the EMA of
  the weights samples far sharper (as every DiT / EDM recipe does). The rate warms up as
  min(decay, (1 + n) / (10 + n)) after n updates, so a young EMA is not stuck at the init.
  """
  if not decays:
    return step_fn

  def step(state: TrainState, batch):
    new, metrics = step_fn(state, batch)
    n = state.step.astype(jnp.float32)
    ema = dict(state.ema)
    for net, decay in decays.items():
      rate = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
      ema[net] = jax.tree.map(lambda e, p, r=rate: r * e + (1.0 - r) * p, state.ema[net],
                              new.params[net])
    return new.replace(ema=ema), metrics
  return step


def eval_params(state: TrainState) -> dict:
  """The params a trained state is judged and loaded by: each network's EMA if it keeps one."""
  return dict(state.params, **state.ema)


def guarded(step_fn: Callable) -> Callable:
  """Keeps params and opt state unchanged when the loss or a grad norm is NaN/Inf.

  The decision is made on device (jnp.where on scalars the step has already reduced), so a
  skipped step costs no host round trip and adds no collective; step and rng still advance
  (the batch was consumed). metrics['finite'] tells the host. A finite gradient can still give
  a non-finite update (AdamW with eps=0 divides 0 by 0; lr=nan): `train` checks the updated
  state outside this program (`checkpoints.finite_flags`, per device, collective-free).
  """
  def step(state: TrainState, batch):
    new, metrics = step_fn(state, batch)
    checks = [v for k, v in metrics.items() if _guarded_key(k)]
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in checks]))
    new = new.replace(params=_tree_where(ok, new.params, state.params),
                      opt_state=_tree_where(ok, new.opt_state, state.opt_state),
                      ema=_tree_where(ok, new.ema, state.ema), step=state.step + 1)
    return new, dict(metrics, finite=ok.astype(jnp.float32))
  return step


def _guarded_key(name: str) -> bool:
  return name == 'loss' or name.startswith('grad_norm/')


def window_means(window) -> Dict[str, float]:
  """Each metric's mean over the steps since the last log line. A step reports NaN for a
  metric it did not measure (DMD's generator metrics on critic-only steps); those steps are
  left out of that metric's mean (a metric no step measured is not logged)."""
  out = {}
  for key in window[-1]:
    values = np.asarray([m[key] for m in window if key in m], np.float64)
    if _guarded_key(key) or not np.all(np.isnan(values)):
      out[key] = float(np.mean(values) if _guarded_key(key) else np.nanmean(values))
  return out


def stage_step(config, stage):
  """(optimizer, {network: EMA decay}, step(state, batch) -> (state, metrics)) of a stage:
  its `optimizer()` and `train_step()` with the EMA and the non-finite guard around them. What `train` runs and what
  `launch/aot.py` compiles for a chip it does not have (shotstream_jax/aot_train.py)."""
  tx = stage.optimizer()
  decays = optim_lib.ema_decays(config.optim, stage.networks)
  return tx, decays, guarded(with_ema(stage.train_step(tx), decays))


def jit_step(step_fn, shardings, batch_shardings, mesh, donate: bool):
  """The jitted step: state and batch laid out by their shardings, metrics replicated.
  donate=False when skipping non-finite steps keeps the previous state to fall back on."""
  return jax.jit(step_fn, in_shardings=(shardings, batch_shardings),
                 out_shardings=(shardings, sharding_lib.replicated(mesh)),
                 donate_argnums=(0,) if donate else ())


# ----------------------------------------------------------------------------- setup


def _key_data(seed: int):
  return jax.random.key_data(jax.random.key(seed))


def fresh_state(tx, ema_nets, params, rng_key) -> TrainState:
  """The state at step 0 around `params`: the one definition behind both the abstract state
  (`eval_shape`, for shardings and restore) and the concrete one (`init_state`). EMAs start as
  copies, not aliases: the state is donated to the step, and a buffer cannot be donated twice."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(rng_key),
                    ema={n: jax.tree.map(jnp.copy, params[n]) for n in ema_nets})


def state_shardings(stage, tx, mesh, rules, ema_nets=()):
  """(abstract TrainState, TrainState of NamedShardings), the whole state from one `eval_shape`
  of `fresh_state`. Params are laid out by their logical axes (`stage.boxed_shapes()`), the
  optimizer moments and EMAs like their params, scalars and the key replicated."""
  boxed = stage.boxed_shapes()
  param_sh = {n: sharding_lib.shardings_from_boxed(boxed[n], mesh, rules) for n in boxed}
  params = {n: flax.linen.meta.unbox(boxed[n]) for n in boxed}
  shapes = jax.eval_shape(functools.partial(fresh_state, tx, tuple(ema_nets)), params,
                          jax.random.key(0))
  repl = sharding_lib.replicated(mesh)
  shardings = TrainState(step=repl, params=param_sh,
                         opt_state=_like_params(shapes.opt_state, params, param_sh, repl),
                         rng=repl, ema={n: param_sh[n] for n in ema_nets})
  return shapes, shardings


def _path_names(path):
  return tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def _like_params(opt_shapes, params, param_sh, default):
  """Shardings for an optimizer state: a leaf whose key path ends with a param's path (and has
  its shape), e.g. mu/teacher/blocks/.../kernel, gets that param's sharding; counts and
  other scalars get `default`. Works through masked / multi_transform states."""
  table = {}
  for (path, x), (_, sh) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                jax.tree_util.tree_flatten_with_path(param_sh)[0]):
    table[_path_names(path)] = (x.shape, sh)

  def pick(path, x):
    names = _path_names(path)
    for n in range(len(names), 0, -1):
      hit = table.get(names[-n:])
      if hit is not None and hit[0] == x.shape:
        return hit[1]
    return default
  return jax.tree_util.tree_map_with_path(pick, opt_shapes)


def init_state(stage, tx, shardings, seed: int) -> TrainState:
  """A fresh TrainState, created directly with its shardings."""
  init_key, rng = jax.random.split(jax.random.key(seed))
  params = stage.init_params(init_key, shardings.params)
  return jax.jit(functools.partial(fresh_state, tx, tuple(shardings.ema)),
                 out_shardings=shardings)(params, rng)


# ----------------------------------------------------------------------------- loop


def _local_batch(config, mesh) -> int:
  """This process's share of `data.batch_size`, which must split over the batch axes."""
  global_batch = config.data.batch_size
  if global_batch % sharding_lib.batch_size_multiple(mesh):
    raise ValueError(f'data.batch_size: {global_batch} is not divisible by the data x fsdp '
                     f'mesh size {sharding_lib.batch_size_multiple(mesh)}')
  if global_batch % jax.process_count():
    raise ValueError(f'data.batch_size: {global_batch} not divisible by {jax.process_count()} '
                     'processes')
  return global_batch // jax.process_count()


def _restore_or_init(checkpointer, iterator, stage, tx, shapes, shardings, seed: int):
  """(state, first step): the newest loadable checkpoint with its data position, or a fresh
  state at step 0."""
  restored = checkpointer.restore_latest(checkpoints.abstract_like(shapes, shardings))
  if restored is None:
    return init_state(stage, tx, shardings, seed), 0
  start, state, data_state = restored
  iterator.set_state(data_state)
  if jax.process_index() == 0:
    print(f'train: resumed from step {start} in {checkpointer.directory}', flush=True)
  return state, start


def _evaluator(stage, config, mesh, param_shardings, local_batch: int, writer):
  """evaluate(step, state) -> {eval/<name>: mean over the held-out batches} (written), or {}
  for stages without held-out metrics; compiled on first use."""
  tc = config.train
  batches = stage.eval_batches(local_batch) if tc.eval_every else []
  repl = sharding_lib.replicated(mesh)
  jitted = []

  def evaluate(step: int, state: TrainState) -> Dict[str, float]:
    if not batches:
      return {}
    if not jitted:
      jitted.append(jax.jit(stage.eval_metrics, in_shardings=(
          param_shardings, sharding_lib.batch_shardings(batches[0], mesh), repl),
          out_shardings=repl))
    sums = {}
    for i, b in enumerate(batches):
      key = jax.device_put(_key_data(tc.eval_seed + i), repl)
      m = jax.device_get(jitted[0](eval_params(state), sharding_lib.shard_batch(b, mesh), key))
      for k, v in m.items():
        sums[k] = sums.get(k, 0.0) + float(v)
    out = {f'eval/{k}': v / len(batches) for k, v in sums.items()}
    writer.write(step, out)
    return out
  return evaluate


def _nonfinite(rows, first_step: int, state: TrainState):
  """(step, what, in the update?) of the first non-finite thing among the steps first_step.. whose metrics are
  `rows`, checking the state first: a non-finite update (from finite loss and gradients: eps 0,
  lr NaN) makes every later loss non-finite too, and is the cause to name."""
  bad_update = checkpoints.nonfinite_paths({'params': state.params,
                                            'opt_state': state.opt_state, 'ema': state.ema})
  if bad_update:
    last = first_step + len(rows) - 1
    when = str(last) if last == first_step else f'{first_step}-{last}'
    return when, (f'update (params or optimizer state at {bad_update}, from a finite loss and '
                  'gradients: check the learning rate and eps)'), True
  for i, m in enumerate(rows):
    bad = [k for k, v in m.items() if _guarded_key(k) and not np.isfinite(v)]
    if bad:
      return str(first_step + i), ', '.join(bad), False
  return None


def _host_check(pending, step: int, state, previous, skipped: int, skip: bool):
  """(state, metric rows, skipped count) after the steps since the last host check, whose
  device metrics are `pending`; raises NonFiniteError on anything non-finite unless `skip`
  (then a non-finite update is undone from `previous`, the state before this one step)."""
  rows = [{k: float(v) for k, v in m.items()} for m in jax.device_get(pending)]
  found = _nonfinite(rows, step - len(rows) + 1, state)
  if found is not None:
    when, what, in_update = found
    if not skip:
      raise NonFiniteError(f'train: non-finite {what} at step {when}; the run stopped before '
                           'saving it, nothing non-finite was saved; set '
                           'train.skip_nonfinite=True to skip such steps')
    if in_update:   # the guard only stops non-finite losses and gradients: undo it here
      state = previous.replace(step=state.step, rng=state.rng)
      rows[-1]['finite'] = 0.0
    skipped += 1
    logging.warning('train: skipped step %s: non-finite %s', when, what)
  for m in rows:
    m['skipped_steps'] = skipped
  return state, rows, skipped


def _log(writer, bar, window, step: int, skipped: int, steps_per_sec: float):
  logged = window_means(window)
  logged['skipped_steps'] = skipped
  logged['steps_per_sec'] = steps_per_sec
  writer.write(step, logged)
  bar.set_postfix(loss=f'{logged["loss"]:.4f}')


def train(config, workdir: str, *, stage=None,
          batch_hook: Optional[Callable[[int, Dict[str, np.ndarray]], Dict]] = None,
          step_hook: Optional[Callable[[int, TrainState, Dict[str, float]], None]] = None,
          devices=None) -> TrainState:
  """Trains `config.train.num_steps` steps in `workdir`, resuming from its last checkpoint.

  Metrics stay on the device between host checks, which come on logging, evaluation and
  checkpoint steps (nothing is saved unchecked), and after every step when
  `train.skip_nonfinite` (a skipped step is undone at once) or a `step_hook` is given.
  batch_hook(step, host_batch) -> host_batch and step_hook(step, state, metrics) are for tests
  and debugging (fault injection, probes); `step` is the 1-based number of the step.
  """
  tc = config.train
  if tc.num_steps < 1:
    raise ValueError(f'train.num_steps: must be >= 1, got {tc.num_steps}')
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:   # what generation needs to run this workdir's networks
    with open(os.path.join(workdir, CONFIG_FILE), 'w') as f:
      f.write(config.to_json_best_effort(indent=1))
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  stage = stage or get_stage(config, workdir)
  local_batch = _local_batch(config, mesh)
  tx, decays, step_fn = stage_step(config, stage)
  rules = sharding_lib.logical_rules(config)
  shapes, shardings = state_shardings(stage, tx, mesh, rules, tuple(decays))
  # Every exit, errors included, closes the checkpointer: an open async orbax manager keeps
  # the interpreter from exiting (a hang instead of an error).
  with contextlib.ExitStack() as cleanup:
    cleanup.enter_context(sharding_lib.activation_sharding(mesh, rules))
    checkpointer = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                         keep=tc.keep_checkpoints, interval=tc.checkpoint_every)
    cleanup.callback(checkpointer.close)
    iterator = stage.train_iterator(jax.process_index(), jax.process_count(), local_batch)
    state, start = _restore_or_init(checkpointer, iterator, stage, tx, shapes, shardings,
                                    tc.seed)
    writer = metrics_lib.MetricWriter(workdir, resume_step=start, tensorboard=tc.tensorboard)
    cleanup.callback(writer.close)
    evaluate = _evaluator(stage, config, mesh, shardings.params, local_batch, writer)
    if start == 0:
      evaluate(0, state)
    bar = tqdm.tqdm(total=tc.num_steps, initial=start, desc=f'train {config.stage}',
                    disable=not tc.progress or jax.process_index() != 0, dynamic_ncols=True)
    cleanup.callback(bar.close)
    jitted, skipped, t0, window, pending, previous = None, 0, time.time(), [], [], None
    step = start
    while step < tc.num_steps:
      host_batch = next(iterator)
      step += 1
      if batch_hook is not None:
        host_batch = batch_hook(step, host_batch)
      batch = sharding_lib.shard_batch(host_batch, mesh)
      if jitted is None:
        jitted = jit_step(step_fn, shardings, sharding_lib.batch_shardings(host_batch, mesh),
                          mesh, donate=not tc.skip_nonfinite)
      if tc.skip_nonfinite:
        previous = state
      state, metrics = jitted(state, batch)
      pending.append(metrics)
      last = step == tc.num_steps
      logs = step % tc.log_every == 0 or last
      evals = bool(tc.eval_every) and (step % tc.eval_every == 0 or last)
      if not (logs or evals or last or step % tc.checkpoint_every == 0 or tc.skip_nonfinite
              or step_hook is not None):
        bar.update(1)
        continue
      state, rows, skipped = _host_check(pending, step, state, previous, skipped,
                                         tc.skip_nonfinite)
      pending, previous = [], None
      if step_hook is not None:
        step_hook(step, state, rows[-1])
      window.extend(rows)
      if logs:
        _log(writer, bar, window, step, skipped, (step - start) / max(time.time() - t0, 1e-9))
        window = []
      if evals:
        ev = evaluate(step, state)
        bar.write(f'step {step}: ' + ', '.join(f'{k}={v:.4f}' for k, v in ev.items()))
      checkpointer.save(step, state, iterator.get_state(), force=last)
      bar.update(1)
  if step > start and skipped == step - start:
    raise NonFiniteError(f'train: all {skipped} steps of this run were non-finite and skipped; '
                         'nothing was trained (check the learning rate, eps and the data)')
  return state
