"""The attention kernels behind `model.attention`, each against the XLA path: the splash
kernel through the Pallas interpreter ('splash_interpret', the same kernel code a TPU runs),
alone and inside whole DiT calls (bidirectional, block-causal, cached, filled), values and
gradients; cuDNN where a GPU is present."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shotstream
from shotstream_jax.models import attention
from shotstream_jax.models import dit

ATOL = 2e-5   # fp32; attention outputs are convex combinations of O(1) values


def _qkv(b, t, s, h=2, d=16, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32) for n in (t, s, s))


@pytest.mark.parametrize('t,s', [(20, 20), (130, 300)])   # under one tile; over two, unaligned
def test_splash_equals_xla_with_static_mask_and_key_validity(t, s):
  q, k, v = _qkv(2, t, s)
  key_valid = jnp.asarray(np.arange(s)[None] < np.array([[s - 7], [s]]))
  pattern = np.random.default_rng(1).random((t, s)) < 0.7
  pattern[:, 0] = True                                   # every query keeps a key
  for mask, valid in ((None, None), (None, key_valid), (pattern[None, None], key_valid)):
    ref = attention.dot_product_attention(q, k, v, mask, 'xla', key_valid=valid)
    out = attention.dot_product_attention(q, k, v, mask, 'splash_interpret', key_valid=valid)
    np.testing.assert_allclose(out, ref, atol=ATOL)


def test_splash_gradients_equal_xla():
  q, k, v = _qkv(1, 40, 70)
  key_valid = jnp.asarray(np.arange(70)[None] < 50)

  def loss(impl):
    return lambda q, k, v: jnp.sum(jnp.sin(attention.dot_product_attention(
        q, k, v, None, impl, key_valid=key_valid)))

  ref = jax.grad(loss('xla'), argnums=(0, 1, 2))(q, k, v)
  out = jax.grad(loss('splash_interpret'), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(out, ref):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_splash_rejects_a_traced_mask_in_one_line():
  q, k, v = _qkv(1, 8, 8)
  mask = jnp.ones((1, 1, 8, 8), bool)
  with pytest.raises(ValueError, match='static numpy mask'):
    attention.dot_product_attention(q, k, v, mask, 'splash_interpret')
  with pytest.raises(ValueError, match="model.attention: unknown implementation 'flash'"):
    attention.dot_product_attention(q, k, v, None, 'flash')


@pytest.fixture(scope='module')
def dit_pair():
  """The tiny DiT with randomised params (its head is zero at init) under both kernels."""
  cfg = shotstream.get_config('tiny').model
  params = dit.init_params(cfg, jax.random.key(0))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(key, x.shape)
                                     for x, key in zip(leaves, keys)])
  splash_cfg = cfg.copy_and_resolve_references()
  splash_cfg.attention = 'splash_interpret'
  remat_cfg = splash_cfg.copy_and_resolve_references()
  remat_cfg.remat = True      # jax.checkpoint traces every array it is handed (the mask too)
  static = ('attention', 'chunk_frames', 'context_frames', 'return_kv')
  apply = {name: jax.jit(dit.WanDiT(c).apply, static_argnames=static)
           for name, c in (('xla', cfg), ('splash', splash_cfg), ('splash_remat', remat_cfg))}
  return cfg, params, apply


def test_dit_forward_and_cached_chunk_equal_xla(dit_pair):
  """Bidirectional and block-causal passes with per-frame captions, then a chunk over a cache
  with invalid slots (masked) and over a filled segment (the streaming sampler's two paths)."""
  cfg, params, apply = dit_pair
  rng = np.random.default_rng(0)
  f, b = 6, 2
  lat = jnp.asarray(rng.standard_normal((b, f, 4, 4, cfg.in_channels)), jnp.float32)
  caps = jnp.asarray(rng.standard_normal((3, 5, cfg.text_dim)), jnp.float32)
  t = jnp.asarray(rng.uniform(0, 1000, (b, f)), jnp.float32)
  kw = dict(frame_pos=jnp.broadcast_to(jnp.arange(f), (b, f)),
            frame_shot=jnp.asarray([[0, 0, 1, 1, 1, 1]] * b),
            frame_caption=jnp.asarray([[0, 0, 1, 1, 2, 2], [1, 1, 2, 2, 0, 0]]))
  run = lambda impl, **extra: apply[impl]({'params': params}, lat, t, caps, **kw, **extra)
  for extra in (dict(attention='bidirectional'),
                dict(attention='block_causal', chunk_frames=2, context_frames=2)):
    np.testing.assert_allclose(run('splash', **extra), run('xla', **extra), atol=ATOL)
  causal = dict(attention='block_causal', chunk_frames=2, context_frames=2)
  np.testing.assert_allclose(run('splash_remat', **causal), run('xla', **causal), atol=ATOL)

  _, (k, v) = run('xla', return_kv=True)
  garbage = 3.0 * jnp.ones_like(k)
  pk, pv = jnp.concatenate([k, garbage], axis=2), jnp.concatenate([v, garbage], axis=2)
  n = k.shape[2]                                      # cached tokens [L, B, N, H, D]
  valid = jnp.broadcast_to(jnp.arange(2 * n) < n, (b, 2 * n))
  chunk = dict(frame_pos=kw['frame_pos'][:, :2] + f, frame_shot=kw['frame_shot'][:, :2],
               frame_caption=kw['frame_caption'][:, :2])
  tokens = 16 // np.prod(cfg.patch_size[1:])          # latent tokens a frame (4x4 latents)
  for prefix in ([(pk, pv, valid)],
                 [(k, v, None), (pk, pv, attention.Filled(jnp.int32(2 * tokens), tokens))]):
    outs = {impl: apply[impl]({'params': params}, lat[:, :2], t[:, :2], caps, prefix_kv=prefix,
                              **chunk) for impl in ('xla', 'splash')}
    np.testing.assert_allclose(outs['splash'], outs['xla'], atol=ATOL)


@pytest.mark.skipif(not any(d.platform == 'gpu' for d in jax.devices()),
                    reason='cuDNN attention needs a GPU')
def test_cudnn_equals_xla_on_a_gpu():
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(2, 300, 300, h=4, d=64))
  ref = attention.dot_product_attention(q, k, v, None, 'xla')
  out = attention.dot_product_attention(q, k, v, None, 'cudnn')
  np.testing.assert_allclose(np.float32(out), np.float32(ref), atol=2e-2)


MESH_WORKER = r'''
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from shotstream_jax import mesh_axes
from shotstream_jax.models import attention
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((4, n, 2, 16)), jnp.float32) for n in (20, 40, 40))
valid = jnp.asarray(np.arange(40)[None] < np.array([[33], [40], [12], [27]]))
mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), mesh_axes.AXES)
batch = NamedSharding(mesh, P(mesh_axes.BATCH_AXES))
q, k, v, valid = (jax.device_put(a, batch) for a in (q, k, v, valid))
ref = attention.dot_product_attention(q, k, v, None, 'xla', key_valid=valid)
f = jax.jit(lambda *a: attention.dot_product_attention(*a[:3], None, 'splash_interpret',
                                                       key_valid=a[3]))
out = {}
for name, b in (('split', 4), ('replicated', 3)):   # 3 examples do not divide data x fsdp = 4
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    text = f.lower(q[:b], k[:b], v[:b], valid[:b]).as_text()
    got = f(q[:b], k[:b], v[:b], valid[:b])
  out[name] = dict(err=float(jnp.max(jnp.abs(got - ref[:b]))), shard_map='shard_map' in text
                   or 'sdy.manual_computation' in text)
print(json.dumps(out))
'''


def test_splash_runs_per_device_under_an_ambient_mesh():
  """Under an ambient mesh the splash call runs in a shard_map (batch over data x fsdp, heads over
  tensor of a 2x2x2 mesh of 8 simulated devices; replicated where the batch does not divide)
  and still equals the XLA path."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu', PYTHONPATH=repo + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run([sys.executable, '-c', MESH_WORKER], env=env, cwd=repo,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads([l for l in proc.stdout.splitlines() if l.startswith('{')][-1])
  for case in ('split', 'replicated'):
    assert out[case]['shard_map'], out
    assert out[case]['err'] < ATOL, out
