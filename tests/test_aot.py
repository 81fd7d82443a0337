"""Ahead-of-time analysis (shotstream_jax/aot.py, launch/aot.py): the layer-scan correction
against a fully unrolled compile, shot totals, a TPU target where libtpu is installed, and
bad flags as one line."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from configs import shotstream
from shotstream_jax import aot
from shotstream_jax import mesh_axes
from shotstream_jax.models import dit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(layers=4):
  c = shotstream.get_config('tiny')
  c.model.num_layers = layers
  return c


def test_scan_correction_counts_every_block():
  """XLA counts a scanned body once; corrected, the compiler's count of every DiT piece is
  the independent matmul count (aot.dit_flops) plus elementwise work: 0-8% above it, where
  the uncorrected count is below half of it."""
  config = _tiny(4)
  reports = {p: aot.analyse(config, p) for p in ('text_kv', 'prefill', 'chunk', 'decode')}
  for piece in ('text_kv', 'prefill', 'chunk'):
    r = reports[piece]
    assert 1.0 <= r['flops'] / r['analytic_flops'] <= 1.08, (piece, r)
    assert r['flops_scan_body_once'] < 0.5 * r['analytic_flops'], (piece, r)
    assert r['memory']['total'] > 0 and 'fits' not in r     # no HBM figure for a CPU
  chunk = reports['chunk']
  assert 1.0 <= chunk['shot_mean_flops'] / chunk['analytic_shot_mean_flops'] <= 1.08, chunk
  assert chunk['analytic_shot_mean_flops'] < chunk['analytic_full_capacity_flops']
  assert reports['decode']['flops'] == reports['decode']['flops_scan_body_once'] > 0
  totals = aot.shot_totals(config, reports)
  chunks = config.sampling.shot_latent_frames // config.model.chunk_frames
  expect = sum(reports[p]['flops'] for p in ('text_kv', 'prefill')) + chunks * (
      chunk['shot_mean_flops'] + reports['decode']['flops'])
  assert totals['flops'] == pytest.approx(expect) and totals['implied_fps'] is None  # CPU: no
  shot = aot.analyse(config, 'shot')                                             # cost model
  assert shot['flops'] is None and shot['memory']['total'] > 0


def test_chunk_cost_grows_with_the_filled_local_cache_only():
  """Compiled at every fill of a 3-chunk shot, the chunk's count rises by the same step per
  filled chunk (linear: what `shot_mean_flops` interpolates), by the analytic attention cost
  of one chunk's keys (plus its softmax), and the fullest equals the traced program's (the switch's max branch)."""
  config = _tiny(2)
  config.sampling.shot_latent_frames = config.sampling.local_frames = 9
  device = jax.local_devices()[0]
  counts = [aot.compiled_costs(aot.compile_piece(config, 'chunk', device, f))['flops'] for f in range(3)]
  steps = np.diff(counts)
  np.testing.assert_allclose(steps, steps[0], rtol=1e-6)
  analytic = [aot.piece_flops(config, 'chunk', f) for f in range(3)]
  # the compiled counts have the scanned block once: one step is one layer's attention
  np.testing.assert_allclose(np.diff(analytic), steps[0] * config.model.num_layers, rtol=0.06)
  traced = aot.compiled_costs(aot.compile_piece(config, 'chunk', device))['flops']
  assert traced == pytest.approx(counts[-1] + steps[0], rel=1e-3)   # capacity 3 chunks: fill 3


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason='needs the libtpu wheel (a TPU compiler; README: Speed)')
def test_compiles_for_a_tpu_topology_without_a_tpu():
  r = aot.analyse(_tiny(2), 'chunk', 'v5p:2x2x1')
  assert r['device'].startswith('TPU') and r['fits'] is True
  assert r['optimal_seconds'] > 0 and r['optimal_seconds_per_block'] > 0
  # a chunk's rate is at a shot's mean fill (the compiled switch alone is its fullest branch)
  assert r['implied_fps'] == pytest.approx(r['frames_per_call'] / r['shot_mean_optimal_seconds'])
  assert r['shot_mean_optimal_seconds'] <= r['optimal_seconds']


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason='needs the libtpu wheel (a TPU compiler; README: Speed)')
def test_splash_kernel_compiles_for_a_tpu_target():
  """model.attention=splash lowers to Mosaic kernels in the TPU program (tests/
  test_attention_kernels.py checks the same kernel's numbers through the interpreter); the
  report says the compiler's count leaves them out and gives their analytic work."""
  config = _tiny(2)
  config.model.attention = 'splash'
  device = aot.target_devices('v5p:2x2x1')[0]
  assert 'tpu_custom_call' in aot.compile_piece(config, 'prefill', device).as_text()
  r = aot.analyse(config, 'prefill', 'v5p:2x2x1')
  assert r['note'] == aot.KERNEL_NOTE and r['fits'] is True
  assert r['analytic_attention_flops'] == aot.piece_flops(config, 'prefill', attention_only=True)
  assert r['flops'] < r['analytic_flops'] - 0.5 * r['analytic_attention_flops']


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason='needs the libtpu wheel (a TPU compiler; README: Speed)')
def test_splash_training_step_compiles_sharded_over_a_tpu_mesh():
  """A DiT gradient with model.attention=splash and the batch split over a 4-chip v5p mesh:
  XLA cannot partition the Mosaic kernel by itself (the error below); under the ambient mesh
  (jax.sharding.use_abstract_mesh, as the training loop sets it) the kernel runs in a
  shard_map and compiles."""
  config = _tiny(2)
  config.model.attention = 'splash'
  m = config.model
  mesh = Mesh(np.array(aot.target_devices('v5p:2x2x1')).reshape(4, 1, 1), mesh_axes.AXES)
  batch, repl = NamedSharding(mesh, P(mesh_axes.BATCH_AXES)), NamedSharding(mesh, P())
  model = dit.WanDiT(m)
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
                        jax.eval_shape(lambda: dit.init_params(m, jax.random.key(0))))
  b, f = 4, 3
  lat = jax.ShapeDtypeStruct((b, f, 4, 4, m.in_channels), jnp.float32, sharding=batch)
  t = jax.ShapeDtypeStruct((b, f), jnp.float32, sharding=batch)
  text = jax.ShapeDtypeStruct((b, 5, m.text_dim), jnp.float32, sharding=batch)

  def loss(p, x, t, c):
    return jnp.mean(jnp.square(model.apply({'params': p}, x, t, c, attention='bidirectional')))
  grad = jax.jit(jax.grad(loss), out_shardings=repl)
  with pytest.raises(NotImplementedError, match='shard_map'):
    grad.lower(params, lat, t, text).compile()
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    compiled = grad.lower(params, lat, t, text).compile()
  assert 'tpu_custom_call' in compiled.as_text()


def test_implausible_compiler_times_are_dropped():
  # v5p, the measured prefill (README): 40.8 TFLOP in 0.308 s is 29% of the chip's peak.
  assert aot.implausible_seconds(40.8e12, 0.308, 'v5p:2x2x1') is None
  assert 'gave -352' in aot.implausible_seconds(23.5e12, -351.9, 'v6e:2x2')
  assert '0.00%' in aot.implausible_seconds(1.08e12, 29.0, 'v6e:2x2')     # 37 GFLOP/s
  assert 'peak' in aot.implausible_seconds(1e15, 0.1, 'v5p:2x2x1')       # faster than peak
  assert aot.implausible_seconds(2e6, 1e-5, 'v5p:2x2x1') is None          # tiny: latency-bound
  assert aot.implausible_seconds(1e12, 29.0, 'local') is None             # no chip to judge by
  report = {'flops': 1.08e12, 'optimal_seconds': 29.0, 'optimal_seconds_per_block': 1.0,
            'by_fill': {'0': {'flops': 1e12, 'optimal_seconds': 0.01}}}
  aot.drop_implausible_seconds(report, 'v6e:2x2')
  assert report['optimal_seconds'] is None and report['optimal_seconds_per_block'] is None
  assert report['by_fill']['0']['optimal_seconds'] is None and 'times omitted' in report['cost_model']
  good = {'flops': 40.8e12, 'optimal_seconds': 0.308}
  aot.drop_implausible_seconds(good, 'v5p:2x2x1')
  assert good == {'flops': 40.8e12, 'optimal_seconds': 0.308}


def test_attention_only_flops_are_the_attention_products():
  """dit_flops' attention part == the whole minus a call with no keys and no caption."""
  m = _tiny(2).model
  whole, bare = aot.dit_flops(m, 12, 40, 7), aot.dit_flops(m, 12, 0, 0)
  assert aot.dit_flops(m, 12, 40, 7, attention_only=True) == pytest.approx(whole - bare)
  assert aot.dit_flops(m, 0, 0, 7, text_kv=True, attention_only=True) == 0.0


def test_cli_prints_json_and_rejects_bad_flags():
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  run = lambda *flags: subprocess.run(
      [sys.executable, 'launch/aot.py', '--config=configs/shotstream.py:tiny',
       '--compilation_cache=', *flags], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=600)
  ok = run('--pieces=decode')
  assert ok.returncode == 0, ok.stderr[-3000:]
  (line,) = [l for l in ok.stdout.splitlines() if l.startswith('{')]
  assert json.loads(line)['piece'] == 'decode'
  for flag, message in (('--topology=v9x:2x2', '--topology: expected local or <chip>:<shape>'),
                        ('--pieces=chunk,warp', "--pieces: unknown ['warp']")):
    bad = run(flag)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith(f'error: {message}')


def test_out_of_memory_reports_the_refusal_and_reraises_the_rest():
  """A TPU compiler's refusal for lack of HBM becomes a report line (`fits: false`), naming the
  temporaries it needed; any other compile error is raised again."""
  refusal = jax.errors.JaxRuntimeError(
      'RESOURCE_EXHAUSTED: XLA:TPU compile permanent error.\nRan out of memory on HBM, the '
      'total memory required for HLO temporaries (22.71G) exceeds available HBM (15.75G).')
  assert aot.out_of_memory(refusal).endswith('exceeds available HBM (15.75G).')
  other = jax.errors.JaxRuntimeError('INTERNAL: something else')
  with pytest.raises(jax.errors.JaxRuntimeError, match='something else'):
    aot.out_of_memory(other)
