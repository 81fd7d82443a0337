"""Subprocess side of the training tests (run with simulated CPU devices; see train_fixtures).

  python tests/train_worker.py equivalence '{"data_dir": ..., "workdir": ...}'
  python tests/train_worker.py train '{"data_dir": ..., "workdir": ..., "overrides": {...},
                                       "kill_at": 7}'

Prints one JSON line of results last.
"""

import json
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position

from shotstream_jax.models import dit  # pylint: disable=g-import-not-at-top,wrong-import-position
from shotstream_jax.models import random_init  # pylint: disable=wrong-import-position
from shotstream_jax import checkpoints  # pylint: disable=wrong-import-position
from shotstream_jax.training import metrics as metrics_lib  # pylint: disable=wrong-import-position
from shotstream_jax.training import sharding  # pylint: disable=wrong-import-position
from shotstream_jax.training import teacher_stage  # pylint: disable=wrong-import-position
from shotstream_jax.training import train_loop  # pylint: disable=wrong-import-position


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def equivalence(args):
  """One (and three) teacher steps on mesh 2x2x2 vs one device, same params and batch."""
  c = train_fixtures.tiny_config(args['data_dir'])
  stage = teacher_stage.TeacherStage(c, args['workdir'])
  tx = stage.optimizer()
  rules = sharding.logical_rules(c)
  # Random weights everywhere (Wan's zero-initialised head would leave most grads at zero).
  params0 = {'teacher': random_init.random_params(dit.param_shapes(c.model), 0)}
  it = stage.train_iterator(0, 1, c.data.batch_size)
  batches = [next(it) for _ in range(3)]
  meshes = {
      'sharded': sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2}),
      'single': sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1]),
  }
  out = {}
  for name, mesh in meshes.items():
    _, sh = train_loop.state_shardings(stage, tx, mesh, rules)
    params = jax.device_put(params0, sh.params)
    state = train_loop.TrainState(
        step=jax.device_put(jnp.int32(0), sh.step), params=params,
        opt_state=jax.jit(tx.init, out_shardings=sh.opt_state)(params),
        rng=jax.device_put(jax.random.key_data(jax.random.key(0)), sh.rng))
    bsh = sharding.batch_shardings(batches[0], mesh)
    repl = sharding.replicated(mesh)
    step = jax.jit(train_loop.guarded(stage.train_step(tx)),
                   in_shardings=(sh, bsh), out_shardings=(sh, repl))
    first = sharding.shard_batch(batches[0], mesh)
    # Activation layouts become constraints in the training context only (traced by lower()).
    bare = step.lower(state, first).as_text().count('sharding_constraint')
    with sharding.activation_sharding(mesh, rules):
      constraints = step.lower(state, first).as_text().count('sharding_constraint')
    losses, gnorms, snapshots = [], [], []
    for b in batches:
      with sharding.activation_sharding(mesh, rules):
        state, m = step(state, sharding.shard_batch(b, mesh))
      losses.append(float(m['loss']))
      gnorms.append(float(m['grad_norm/teacher']))
      snapshots.append(_flat(state.params))
    q = state.params['teacher']['blocks']['self_attn']['q']['kernel']
    out[name] = dict(losses=losses, gnorms=gnorms, params=snapshots, constraints=constraints,
                     constraints_without_rules=bare,
                     q_spec=str(q.sharding.spec), q_shard=list(q.addressable_shards[0].data.shape))
  a, b = out['sharded'], out['single']
  def max_err(x, y):
    return max(float(np.max(np.abs(x[k] - y[k]))) for k in x)
  print(json.dumps(dict(
      devices=jax.device_count(), losses_sharded=a['losses'], losses_single=b['losses'],
      loss_err=max(abs(x - y) for x, y in zip(a['losses'], b['losses'])),
      grad_norms_sharded=a['gnorms'], grad_norms_single=b['gnorms'],
      grad_norm_rel_err=max(abs(x - y) / y for x, y in zip(a['gnorms'], b['gnorms'])),
      param_err_step1=max_err(a['params'][0], b['params'][0]),
      param_err_step3=max_err(a['params'][2], b['params'][2]),
      q_spec=a['q_spec'], q_shard=a['q_shard'], q_shard_single=b['q_shard'],
      constraints=a['constraints'], constraints_without_rules=a['constraints_without_rules'])))


def stages(args):
  """A few steps of stages 1-4 in order on the 2x2x2 mesh, each initialised from the last."""
  out = {}
  run = lambda name: os.path.join(args['workdir'], name)
  # Chained as in the reference: each stage starts from the previous one's workdir (a random
  # Wan init has a zero head, so an unchained student and teacher would both predict 0).
  chain = {'ode_init': {'ode.init_from': run('teacher')},
           'dmd_intra': {'dmd.teacher_init': run('teacher'), 'dmd.generator_init': run('ode_init')},
           'dmd_inter': {'dmd.teacher_init': run('teacher'), 'dmd.generator_init': run('dmd_intra'),
                         'dmd.critic_init': run('dmd_intra')}}
  for name in args['stages']:
    c = train_fixtures.tiny_config(args['data_dir'], name, **{
        'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2, 'data.batch_size': 4,
        'train.num_steps': args['steps'], 'train.checkpoint_every': args['steps'],
        **chain.get(name, {})})
    state = train_loop.train(c, os.path.join(args['workdir'], name))
    records = metrics_lib.read_jsonl(os.path.join(args['workdir'], name))
    leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
    sharded = [jax.tree_util.keystr(p) for p, x in leaves
               if len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated]
    out[name] = dict(
        step=int(state.step), networks=sorted(state.params),
        losses=[r['loss'] for r in records if 'loss' in r],
        finite=[r['finite'] for r in records if 'finite' in r],
        params_finite=bool(all(np.all(np.isfinite(np.asarray(x))) for _, x in leaves)),
        num_sharded=len(sharded), num_params=len(leaves))
  print(json.dumps(out))


def train(args):
  c = train_fixtures.tiny_config(args['data_dir'], **args.get('overrides', {}))
  workdir = args['workdir']
  start = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints')).latest_step()
  print(json.dumps({'resume_from': start}), flush=True)
  kill_at = args.get('kill_at')

  def hook(step, state, metrics):
    del state, metrics
    if kill_at and step == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
  state = train_loop.train(c, workdir, step_hook=hook)
  np.savez(os.path.join(workdir, 'final_params.npz'), **_flat(state.params))
  print(json.dumps({'resume_from': start, 'step': int(state.step)}))


if __name__ == '__main__':
  {'equivalence': equivalence, 'stages': stages, 'train': train}[sys.argv[1]](json.loads(sys.argv[2]))
