"""A thin, stage-agnostic training loop: sharded jitted steps, resumable, logged.

    state = train(config, workdir)        # config: configs/train/<stage>.py:get_config(preset)

A *stage* (training/stage.py: `Stage`) supplies the networks, their init, the data and the
loss; the loop owns everything else: mesh and shardings, the stage's optimizer (AdamW per trained
network, training/optim.py), the `TrainState` pytree (params, opt_state, step, rng, EMA)
checkpointed with the data position, automatic resume, non-finite guards, jsonl + TensorBoard
metrics and a progress bar.
"""

import contextlib
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
from shotstream_jax.training import checkpoint as ckpt_lib
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


def state_shardings(stage, tx, mesh, rules, ema_nets=()):
  """(abstract TrainState with shapes, TrainState of NamedShardings); `ema_nets` keep an EMA
  laid out like their params."""
  boxed = stage.boxed_shapes()
  param_sh = {n: sharding_lib.shardings_from_boxed(boxed[n], mesh, rules) for n in boxed}
  params = {n: flax.linen.meta.unbox(boxed[n]) for n in boxed}
  opt_shapes = jax.eval_shape(tx.init, params)
  repl = sharding_lib.replicated(mesh)
  opt_sh = _like_params(opt_shapes, params, param_sh, repl)
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                      opt_state=opt_shapes, rng=jax.eval_shape(lambda: _key_data(0)),
                      ema={n: params[n] for n in ema_nets})
  shardings = TrainState(step=repl, params=param_sh, opt_state=opt_sh, rng=repl,
                         ema={n: param_sh[n] for n in ema_nets})
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
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  # Copies, not aliases: the state is donated to the step, and a buffer cannot be donated twice.
  ema = {n: jax.tree.map(lambda x: jnp.array(x, copy=True), params[n]) for n in shardings.ema}
  return TrainState(step=jax.device_put(jnp.int32(0), shardings.step), params=params,
                    opt_state=opt_state,
                    rng=jax.device_put(jax.random.key_data(rng), shardings.rng), ema=ema)


# ----------------------------------------------------------------------------- loop


def train(config, workdir: str, *, stage=None,
          batch_hook: Optional[Callable[[int, Dict[str, np.ndarray]], Dict]] = None,
          step_hook: Optional[Callable[[int, TrainState, Dict[str, float]], None]] = None,
          devices=None) -> TrainState:
  """Trains `config.train.num_steps` steps in `workdir`, resuming from its last checkpoint.

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
  rules = sharding_lib.logical_rules(config)
  stage = stage or get_stage(config, workdir)
  global_batch = config.data.batch_size
  if global_batch % sharding_lib.batch_size_multiple(mesh):
    raise ValueError(f'data.batch_size: {global_batch} is not divisible by the data x fsdp '
                     f'mesh size {sharding_lib.batch_size_multiple(mesh)}')
  if global_batch % jax.process_count():
    raise ValueError(f'data.batch_size: {global_batch} not divisible by {jax.process_count()} '
                     'processes')
  local_batch = global_batch // jax.process_count()

  tx, decays, step_fn = stage_step(config, stage)
  shapes, shardings = state_shardings(stage, tx, mesh, rules, tuple(decays))
  # Every exit, errors included, closes the checkpointer: an open async orbax manager keeps
  # the interpreter from exiting (a hang instead of an error).
  with contextlib.ExitStack() as cleanup:
    # The ambient mesh: kernels XLA cannot partition (models/attention.py: splash) read it.
    cleanup.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                         keep=tc.keep_checkpoints, interval=tc.checkpoint_every)
    cleanup.callback(checkpointer.close)
    iterator = stage.train_iterator(jax.process_index(), jax.process_count(), local_batch)
    restored = checkpointer.restore_latest(ckpt_lib.abstract_like(shapes, shardings))
    if restored is None:
      state, start = init_state(stage, tx, shardings, tc.seed), 0
    else:
      start, state, data_state = restored
      iterator.set_state(data_state)
      if jax.process_index() == 0:
        print(f'train: resumed from step {start} in {checkpointer.directory}', flush=True)
    writer = metrics_lib.MetricWriter(workdir, resume_step=start, tensorboard=tc.tensorboard)
    cleanup.callback(writer.close)

    jitted, eval_jitted = None, None
    eval_batches = stage.eval_batches(local_batch) if tc.eval_every else []
    repl = sharding_lib.replicated(mesh)

    def evaluate(step):
      nonlocal eval_jitted
      if not eval_batches:
        return {}
      if eval_jitted is None:
        eval_jitted = jax.jit(stage.eval_metrics, in_shardings=(
            shardings.params, sharding_lib.batch_shardings(eval_batches[0], mesh), repl),
            out_shardings=repl)
      sums = {}
      for i, b in enumerate(eval_batches):
        key = jax.device_put(_key_data(tc.eval_seed + i), repl)
        m = jax.device_get(eval_jitted(eval_params(state), sharding_lib.shard_batch(b, mesh),
                                       key))
        for k, v in m.items():
          sums[k] = sums.get(k, 0.0) + float(v)
      out = {f'eval/{k}': v / len(eval_batches) for k, v in sums.items()}
      writer.write(step, out)
      return out

    if start == 0 and eval_batches:
      evaluate(0)
    bar = tqdm.tqdm(total=tc.num_steps, initial=start, desc=f'train {config.stage}',
                    disable=not tc.progress or jax.process_index() != 0, dynamic_ncols=True)
    skipped, t0, window = 0, time.time(), []
    step = start
    cleanup.callback(bar.close)
    while step < tc.num_steps:
      host_batch = next(iterator)
      step += 1
      if batch_hook is not None:
        host_batch = batch_hook(step, host_batch)
      batch = sharding_lib.shard_batch(host_batch, mesh)
      if jitted is None:
        jitted = jit_step(step_fn, shardings, sharding_lib.batch_shardings(host_batch, mesh),
                          mesh, donate=not tc.skip_nonfinite)
      previous = state
      state, metrics = jitted(state, batch)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      bad = [k for k, v in metrics.items() if not np.isfinite(v) and _guarded_key(k)]
      if not bad:
        bad_update = checkpoints.nonfinite_paths({'params': state.params,
                                                  'opt_state': state.opt_state,
                                                  'ema': state.ema})
        if bad_update:
          bad = [f'update (params or optimizer state at {bad_update}, from a finite loss and '
                 'gradients: check the learning rate and eps)']
          if tc.skip_nonfinite:
            state = previous.replace(step=state.step, rng=state.rng)
          metrics['finite'] = 0.0
      if bad:
        if not tc.skip_nonfinite:
          raise NonFiniteError(f'train: non-finite {", ".join(bad)} at step {step}; the run '
                               'stopped before saving it, nothing non-finite was saved; set '
                               'train.skip_nonfinite=True to skip such steps')
        skipped += 1
        logging.warning('train: skipped step %d: non-finite %s', step, ', '.join(bad))
      previous = None
      metrics['skipped_steps'] = skipped
      if step_hook is not None:
        step_hook(step, state, metrics)
      window.append(metrics)
      if step % tc.log_every == 0 or step == tc.num_steps:
        logged = window_means(window)
        logged['skipped_steps'] = skipped
        logged['steps_per_sec'] = (step - start) / max(time.time() - t0, 1e-9)
        writer.write(step, logged)
        bar.set_postfix(loss=f'{logged["loss"]:.4f}')
        window = []
      if tc.eval_every and (step % tc.eval_every == 0 or step == tc.num_steps):
        ev = evaluate(step)
        bar.write(f'step {step}: ' + ', '.join(f'{k}={v:.4f}' for k, v in ev.items()))
      checkpointer.save(step, state, iterator.get_state(), force=step == tc.num_steps)
      bar.update(1)
  if step > start and skipped == step - start:
    raise NonFiniteError(f'train: all {skipped} steps of this run were non-finite and skipped; '
                         'nothing was trained (check the learning rate, eps and the data)')
  return state
