"""Training on a simulated 8-device CPU mesh: sharded == single device, kill -9 and resume.

Each check runs tests/train_worker.py in a subprocess with 8 host devices (the pytest process
keeps one); the tiny StoryWorld is built once here and shared.
"""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import train_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return train_fixtures.shared_data_dir(tmp_path_factory)


def test_sharded_steps_equal_single_device(data_dir, tmp_path):
  out = train_fixtures.last_json(train_fixtures.run_worker(
      'equivalence', {'data_dir': data_dir, 'workdir': str(tmp_path)}).stdout)
  print(out)
  assert out['devices'] == 8
  # The q kernel [layers, dim, dim] is FSDP-sharded on its input width and tensor-parallel on
  # its output (heads) width: each device holds a quarter of it.
  assert out['q_spec'] == "P(None, 'fsdp', 'tensor')", out['q_spec']
  assert out['q_shard'][1] * 2 == out['q_shard_single'][1]
  assert out['q_shard'][2] * 2 == out['q_shard_single'][2]
  # The DiT's activation layouts (residual, q / k / v, FFN hidden; dit.ACT_*) are sharding
  # constraints in the training context (in the scanned layer body: counted once) and nothing
  # outside it.
  assert out['constraints'] >= 5 and out['constraints_without_rules'] == 0, out
  # Same math, different reduction order (batch over 4 devices, matmuls split over 2 + 2): fp32
  # round-off only. Losses ~1; relative 1e-5 is ~100 ulps after 3 AdamW steps at lr 1e-3.
  assert out['loss_err'] < 1e-5 * max(out['losses_single']), out
  assert out['grad_norm_rel_err'] < 1e-4, out
  # AdamW divides each gradient entry by its own magnitude (+ eps 1e-8): for entries near eps
  # round-off in g is amplified up to lr * dg / eps; measured 0.9e-5..1.5e-5 (lr 1e-3, so ~1%
  # of one step's move). Bound: 10% of one step's move.
  assert out['param_err_step1'] < 1e-4, out
  assert out['param_err_step3'] < 1e-4, out


def test_kill_and_resume_is_bitwise_identical(data_dir, tmp_path):
  """SIGKILL after step 7 (last complete checkpoint: 6), resume to 10 == an unbroken run of 10."""
  cache = str(tmp_path / 'xla_cache')
  overrides = {'train.num_steps': 10, 'train.checkpoint_every': 3, 'train.keep_checkpoints': 2,
               'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}
  args = dict(data_dir=data_dir, overrides=overrides)
  killed = train_fixtures.run_worker(
      'train', dict(args, workdir=str(tmp_path / 'a'), kill_at=7), check=False, cache_dir=cache)
  assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
  assert not os.path.exists(tmp_path / 'a' / 'final_params.npz')
  # Finalized steps only (orbax writes into a temporary name and renames when complete). 7 is
  # never checkpointed; 6 is, unless its asynchronous write was still running at the kill.
  steps = sorted(int(s) for s in os.listdir(tmp_path / 'a' / 'checkpoints') if s.isdigit())
  assert steps and steps[-1] in (3, 6), steps
  resumed = train_fixtures.last_json(train_fixtures.run_worker(
      'train', dict(args, workdir=str(tmp_path / 'a')), cache_dir=cache).stdout)
  assert resumed == {'resume_from': steps[-1], 'step': 10}
  straight = train_fixtures.last_json(train_fixtures.run_worker(
      'train', dict(args, workdir=str(tmp_path / 'b')), cache_dir=cache).stdout)
  assert straight == {'resume_from': None, 'step': 10}
  a = np.load(tmp_path / 'a' / 'final_params.npz')
  b = np.load(tmp_path / 'b' / 'final_params.npz')
  assert sorted(a.files) == sorted(b.files) and len(a.files) > 10
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # The metrics of the resumed run read as one run: steps 1..10 once each.
  from shotstream_jax.training import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  logged = [r['step'] for r in metrics_lib.read_jsonl(str(tmp_path / 'a')) if 'loss' in r]
  assert logged == list(range(1, 11)), logged


def test_every_stage_runs_sharded(data_dir, tmp_path):
  """Stages 1-4 at `tiny`, 2 steps each on the 2x2x2 mesh, each started from the previous
  stage's workdir: finite non-zero losses, params really sharded."""
  out = train_fixtures.last_json(train_fixtures.run_worker('stages', {
      'data_dir': data_dir, 'workdir': str(tmp_path), 'steps': 2,
      'stages': list(train_fixtures.STAGE_CONFIGS)}, timeout=900).stdout)
  print(out)
  assert sorted(out) == sorted(train_fixtures.STAGE_CONFIGS)
  for name, r in out.items():
    assert r['step'] == 2 and len(r['losses']) == 2, (name, r)
    assert all(np.isfinite(r['losses'])) and r['finite'] == [1.0, 1.0], (name, r)
    assert min(r['losses']) > 0, (name, r)     # a zero loss would mean untrained zero heads
    assert r['params_finite'], name
    # Every DiT kernel is split over fsdp and/or tensor; only norms/biases/tables replicate.
    assert r['num_sharded'] > r['num_params'] // 3, (name, r)
