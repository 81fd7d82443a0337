"""Checkpoints a run can trust: nothing non-finite is saved, a damaged newest step is skipped
for the one before it (resume, and reading networks out of a workdir), failed writes end
promptly. Tiny teacher on one CPU device; damage from tests/checkpoint_faults.py."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from shotstream_jax import checkpoints
from shotstream_jax import loading
from shotstream_jax.training import train_loop

sys.path.insert(0, os.path.dirname(__file__))
import checkpoint_faults  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return train_fixtures.shared_data_dir(tmp_path_factory)


def _config(data_dir, **overrides):
  return train_fixtures.tiny_config(data_dir, **{'train.checkpoint_every': 2, **overrides})


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


def _saved_params_finite(workdir):
  for step in _steps(workdir):
    params = loading.restore_networks(os.path.join(workdir, 'checkpoints', str(step)),
                                      ['teacher'])
    assert not checkpoints.nonfinite_paths(params), (workdir, step)


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state))]


@pytest.fixture(scope='module')
def base_run(data_dir, tmp_path_factory):
  """A 4-step run (checkpoints 2, 4) and the reference: resumed from step 2 to step 6."""
  root = tmp_path_factory.mktemp('damage')
  base = str(root / 'base')
  train_loop.train(_config(data_dir, **{'train.num_steps': 4}), base)
  ref = str(root / 'ref')
  shutil.copytree(base, ref)
  shutil.rmtree(os.path.join(ref, 'checkpoints', '4'))     # undamaged, resumed from step 2
  ref_state = train_loop.train(_config(data_dir, **{'train.num_steps': 6}), ref)
  return base, _leaves(ref_state)


@pytest.mark.parametrize('how', checkpoint_faults.WAYS)
def test_resume_skips_damaged_newest_step(base_run, data_dir, tmp_path, capfd, how):
  base, ref = base_run
  work = str(tmp_path / how)
  shutil.copytree(base, work)
  checkpoint_faults.damage(os.path.join(work, 'checkpoints', '4'), how)
  state = train_loop.train(_config(data_dir, **{'train.num_steps': 6}), work)
  cap = capfd.readouterr()
  assert 'skipping step 4' in cap.err and 'resumed from step 2' in cap.out, cap
  for a, b in zip(_leaves(state), ref):
    np.testing.assert_array_equal(a, b)          # bitwise: the same steps 3-6 were run
  damaged = os.path.join(work, 'checkpoints', checkpoints.DAMAGED)
  assert os.listdir(damaged) == ['4']            # kept for inspection, not deleted
  assert _steps(work)[-2:] == [4, 6]             # step 4 saved again by the resumed run
  _saved_params_finite(work)


@pytest.mark.parametrize('how', ['truncate', 'nan'])
def test_networks_from_workdir_skip_damaged_step(base_run, data_dir, tmp_path, how):
  base, _ = base_run
  work = str(tmp_path / how)
  shutil.copytree(base, work)
  want = loading.restore_networks(os.path.join(base, 'checkpoints', '2'), ['teacher'])
  checkpoint_faults.damage(os.path.join(work, 'checkpoints', '4'), how)
  got = loading.restore_networks(work, ['teacher'])
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = _config(data_dir)
  via_init = loading.load_network_params(work, 'teacher', c.model)
  for a, b in zip(jax.tree.leaves(via_init), jax.tree.leaves(want['teacher'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_every_step_damaged_is_an_error_not_a_fresh_start(base_run, data_dir, tmp_path):
  base, _ = base_run
  work = str(tmp_path / 'all')
  shutil.copytree(base, work)
  for step in (2, 4):
    checkpoint_faults.damage(os.path.join(work, 'checkpoints', str(step)), 'delete')
  with pytest.raises(ValueError, match=r'no loadable step .*step 4: .*step 2: '):
    train_loop.train(_config(data_dir, **{'train.num_steps': 6}), work)
  assert _steps(work) == [2, 4]                  # nothing moved, nothing overwritten


def test_nonfinite_update_is_never_applied_or_saved(data_dir, tmp_path):
  # AdamW with eps=0: a parameter whose gradient is exactly 0 gets 0/0 = NaN, while the loss and
  # gradient norms stay finite (the old guard let that state through into checkpoints/1).
  c = _config(data_dir, **{'train.num_steps': 3, 'train.checkpoint_every': 1,
                           'optim.teacher.eps': 0.0})
  with pytest.raises(train_loop.NonFiniteError, match='update'):
    train_loop.train(c, str(tmp_path / 'eps0'))
  if os.path.isdir(tmp_path / 'eps0' / 'checkpoints'):
    _saved_params_finite(str(tmp_path / 'eps0'))


def test_skipping_every_step_fails(data_dir, tmp_path):
  c = _config(data_dir, **{'train.num_steps': 2, 'train.skip_nonfinite': True,
                           'optim.teacher.lr': float('nan')})
  with pytest.raises(train_loop.NonFiniteError, match='nothing was trained'):
    train_loop.train(c, str(tmp_path / 'nan'))
  _saved_params_finite(str(tmp_path / 'nan'))


def test_num_steps_must_be_positive(data_dir, tmp_path):
  with pytest.raises(ValueError, match='train.num_steps: must be >= 1, got -5'):
    train_loop.train(_config(data_dir, **{'train.num_steps': -5}), str(tmp_path / 'neg'))


def test_nonfinite_params_are_not_saved_or_loaded(tmp_path):
  with pytest.raises(ValueError,
                     match=r"--dst: refusing .* non-finite params \(NaN/Inf at \['w'\]"):
    checkpoints.save_params(str(tmp_path / 'bad'), {'w': np.array([1.0, np.nan], np.float32)})
  assert not os.path.exists(tmp_path / 'bad')


@pytest.mark.parametrize('dst', ['file/sub', 'ro/x', 'exists'])
def test_save_to_bad_path_fails_promptly(tmp_path, dst):
  (tmp_path / 'file').write_text('x')
  (tmp_path / 'ro').mkdir()
  (tmp_path / 'exists').mkdir()
  os.chmod(tmp_path / 'ro', 0o555)
  if dst == 'ro/x' and os.access(tmp_path / 'ro', os.W_OK):
    pytest.skip('running as a user that can write into a read-only directory (root)')
  code = ('import sys, numpy as np\n'
          'from shotstream_jax import checkpoints, cli\n'
          'cli.exit_on_user_error(checkpoints.save_params, sys.argv[1], {"w": np.ones(3)})\n')
  res = subprocess.run([sys.executable, '-c', code, str(tmp_path / dst)], capture_output=True,
                       text=True, timeout=120, cwd=train_fixtures.REPO)
  assert res.returncode == 2, res.stderr
  assert res.stderr.strip().splitlines()[-1].startswith('error: --dst: ')
  assert 'Traceback' not in res.stderr


def test_nonfinite_weights_refused_for_generation(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from configs import shotstream  # pylint: disable=g-import-not-at-top
  from shotstream_jax.models import random_init  # pylint: disable=g-import-not-at-top
  cfg = shotstream.get_config('tiny')
  params = jax.tree.map(np.asarray, random_init.embedded_dit(cfg.model, 0))
  params['head']['head']['bias'] = np.full_like(params['head']['head']['bias'], np.nan)
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:   # as an old version saved
    ckptr.save(str(tmp_path / 'nan_dit'), args=ocp.args.StandardSave(params))
  with pytest.raises(ValueError,
                     match=r"--ckpt: .*non-finite params \(NaN/Inf at \['head'\]\['head'\]"):
    loading.load_dit(str(tmp_path / 'nan_dit'), cfg)
