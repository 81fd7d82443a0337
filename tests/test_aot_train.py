"""Training steps ahead of time (shotstream_jax/aot_train.py, launch/aot.py with a training
config): the layer-scan correction of a step's FLOPs against a compile with the scan unrolled,
FSDP sharding visible in the per-device memory, a TPU slice where libtpu is installed, and
bad flags as one line."""

import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from shotstream_jax import aot
from shotstream_jax import aot_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_config(stage, layers=aot.PROBE_LAYERS):
  c = importlib.import_module(f'configs.train.{stage}').get_config('tiny')
  c.model.num_layers = layers
  return c


def test_step_flops_count_every_layer_forward_and_backward():
  """Stage 1's step compiled with its layer scans (forward and backward) counted once and
  corrected by the 4-layer probes equals the same step with the scan fully unrolled (every
  block counted by the compiler itself)."""
  config = _train_config('teacher')
  report = aot_train.analyse(config, 'local')
  unrolled = config.copy_and_resolve_references()
  unrolled.model.scan_unroll = config.model.num_layers
  compiled = aot_train.compile_step(unrolled, aot.target_devices('local'), (1, 1, 1))
  direct = aot.compiled_costs(compiled)['flops']
  assert report['flops_scan_body_once'] < 0.8 * direct            # the uncorrected undercount
  assert report['flops'] == pytest.approx(direct, rel=0.02)
  assert report['memory']['total'] > 0 and report['memory']['alias'] > 0   # state donated


def _cli(*flags, devices=1):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return subprocess.run([sys.executable, 'launch/aot.py', '--compilation_cache=', *flags],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_cli_shards_a_dmd_step_over_eight_devices_and_rejects_bad_flags():
  """Stage 3 over 8 simulated devices: with the state FSDP-sharded (1,8,1) each device holds
  about an eighth of what it holds data-parallel (8,1,1, state replicated)."""
  args = {}
  for mesh in ('1,8,1', '8,1,1'):
    out = _cli('--config=configs/train/dmd_intra.py:tiny', '--config.data.batch_size=8',
               f'--mesh={mesh}', '--nocosts', devices=8)
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [l for l in out.stdout.splitlines() if l.startswith('{')]
    report = json.loads(line)
    assert report['stage'] == 'dmd_intra' and report['chips'] == 8
    assert report['flops'] is None and report['note'] == aot_train.LOOP_NOTE
    args[mesh] = report['memory']['argument']
  assert args['1,8,1'] < args['8,1,1'] / 4
  for flag, message in (('--mesh=1,x,1', '--mesh: expected three positive sizes'),
                        ('--mesh=1,3,1', '--mesh: 1x3x1 needs 3 devices')):
    bad = _cli('--config=configs/train/teacher.py:tiny', flag)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith(f'error: {message}')


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason='needs the libtpu wheel (a TPU compiler; README: Speed)')
def test_training_step_compiles_for_a_tpu_slice():
  """Stage 1 sharded FSDP x tensor over a 4-chip v5p slice fits; with a batch far beyond the
  chips' HBM the TPU compiler refuses it, and the report says so instead of failing."""
  config = _train_config('teacher', layers=2)
  report = aot_train.analyse(config, 'v5p:2x2x1', (1, 2, 2), costs=False)
  assert report['chips'] == 4 and report['fits'] is True
  assert report['mesh'] == {'data': 1, 'fsdp': 2, 'tensor': 2}
  assert 0 < report['memory']['total'] < report['memory']['hbm']
  config.data.batch_size = 2 ** 15
  report = aot_train.analyse(config, 'v5p:2x2x1', (1, 2, 2), costs=False)
  assert report['fits'] is False and 'exceeds available HBM' in report['compile_error']
