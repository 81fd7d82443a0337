"""Stage 2 ODE init: training through the loop from a stage-1 workdir, a frozen teacher without
optimizer state, the ODE loss falling on a fixed batch, config errors. One CPU device."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.train import common
from configs.train import ode_init
from shotstream_jax import checkpoints
from shotstream_jax.models import dit
from shotstream_jax.models import random_init
from shotstream_jax.training import metrics as metrics_lib
from shotstream_jax.training import ode_stage
from shotstream_jax.training import sharding
from shotstream_jax.training import train_loop

sys.path.insert(0, os.path.dirname(__file__))
import train_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return train_fixtures.shared_data_dir(tmp_path_factory)


def ode_config(data_dir, **overrides):
  """ode_init:tiny on the test StoryWorld, with a short (inexact) teacher sampler for speed."""
  return train_fixtures.tiny_config(data_dir, 'ode_init', **{
      'data.batch_size': 2, 'train.tensorboard': False, 'ode.num_steps': 4,
      'ode.save_steps': (0, 1, 2, 3), 'ode.exact_steps': False, **overrides})


def _assert_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_trains_from_stage1_workdir_with_frozen_teacher(data_dir, tmp_path):
  c1 = train_fixtures.tiny_config(data_dir, **{'train.num_steps': 2, 'train.checkpoint_every': 2,
                                               'train.tensorboard': False})
  stage1 = str(tmp_path / 'teacher')
  teacher = jax.device_get(train_loop.train(c1, stage1).params['teacher'])

  c = ode_config(data_dir, **{'ode.init_from': stage1, 'train.num_steps': 3,
                              'train.checkpoint_every': 3})
  workdir = str(tmp_path / 'ode')
  stage = ode_stage.OdeInitStage(c, workdir)
  tx = stage.optimizer()
  _, sh = train_loop.state_shardings(stage, tx, sharding.make_mesh(c.mesh),
                                     sharding.logical_rules(c))
  init = stage.init_params(jax.random.key(0), sh.params)
  _assert_equal(init['generator'], teacher)          # the student starts as the teacher
  _assert_equal(init['teacher'], teacher)

  state = train_loop.train(c, workdir, stage=stage)
  _assert_equal(state.params['teacher'], teacher)    # frozen
  assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(
      jax.tree.leaves(state.params['generator']), jax.tree.leaves(teacher)))
  # Adam moments for the generator only: the frozen teacher holds no optimizer state.
  n_params = sum(x.size for x in jax.tree.leaves(teacher))
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
  assert 2 * n_params <= n_opt < 2 * n_params + 16, (n_opt, n_params)

  records = [r for r in metrics_lib.read_jsonl(workdir) if 'loss' in r]
  assert [r['step'] for r in records] == [1, 2, 3]
  # A chunk drawn at the clean endpoint (t = 0) is input only: a step whose every chunk drew
  # it (a 1-chunk shot, 1 in 5 here) has loss and gradient exactly 0.
  assert any(r['ode_frames_with_loss'] > 0 for r in records)
  for r in records:
    trained = r['ode_frames_with_loss'] > 0
    assert np.isfinite(r['loss']) and (r['loss'] > 0) == trained
    assert (r['grad_norm/generator'] > 0) == trained
    assert r['grad_norm/teacher'] == 0 and r['finite'] == 1
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '3'))


def test_ode_loss_falls_on_a_fixed_batch(data_dir, tmp_path):
  c = ode_config(data_dir)
  model_cfg = c.model
  # A random teacher with non-zero output heads (Wan's init zeroes them: v = 0, loss 0).
  c.ode.init_from = checkpoints.save_params(
      str(tmp_path / 'random_teacher'), random_init.random_params(dit.param_shapes(model_cfg), 0))
  stage = ode_stage.OdeInitStage(c, str(tmp_path / 'w'))
  tx = stage.optimizer()
  _, sh = train_loop.state_shardings(stage, tx, sharding.make_mesh(c.mesh),
                                     sharding.logical_rules(c))
  params = stage.init_params(jax.random.key(0), sh.params)
  state = train_loop.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                                rng=jax.random.key_data(jax.random.key(1)))
  batch = jax.tree.map(jnp.asarray, next(stage.train_iterator(0, 1, 2)))
  step = jax.jit(train_loop.guarded(stage.train_step(tx)))
  key = state.rng
  losses = []
  for _ in range(16):   # the same key every step: 'loss' is the fixed probe before the update
    state, m = step(state.replace(rng=key), batch)
    losses.append(float(m['loss']))
  assert np.all(np.isfinite(losses))
  print('ODE loss on a fixed batch and key:', np.round(losses, 4))
  assert losses[0] > 0 and np.mean(losses[-4:]) < 0.6 * losses[0], losses


@pytest.mark.parametrize('field, value, message', [
    ('ode.target_frames', 4, r'ode.target_frames: must be a positive multiple of '
                             r'model.chunk_frames \(3\), got 4'),
    ('optim.teacher', common.adamw(lr=0.0, clip=0.0, trainable=''),
     r"optim.teacher.trainable: must match no param .*got ''"),
    ('ode.exact_steps', True, r"ode.save_steps: timesteps .* are not the student's"),
    ('ode.save_steps', (0, 5), r'ode.save_steps: must be increasing and in \[0, 4\)'),
    ('ode.num_steps', 0, r'ode.num_steps: must be >= 1, got 0'),
    ('ode.init_network', 'critic', r"ode.init_network: unknown 'critic'"),
])
def test_bad_config_values(tmp_path, field, value, message):
  c = ode_config(str(tmp_path / 'unused'), **{field: value})
  with pytest.raises(ValueError, match=message):
    ode_stage.OdeInitStage(c, str(tmp_path))


def test_reference_config_passes_the_step_check():
  c = ode_init.get_config('wan_1_3b')
  assert 'teacher' not in c.optim   # frozen by the stage (trained() leaves it out)
  from shotstream_jax.sampling import teacher as teacher_lib  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(
      teacher_lib.check_save_steps(c.ode.save_steps, c.sampling, c.ode.num_steps),
      [1000.0, 957.93, 888.89, 737.59], atol=0.01)
  assert c.optim.generator.lr == 1e-6 and c.optim.generator.clip == 1.0
  assert (c.optim.generator.b1, c.optim.generator.b2) == (0.0, 0.999)
