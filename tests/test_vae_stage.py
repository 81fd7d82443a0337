"""Stage 0: the VAE trained through the training loop on StoryWorld pixels (tiny), resumable;
latent statistics folded into the quant convs exactly; the export reads back as a Wan VAE."""

import os

import jax
import numpy as np
import pytest

from configs.train import vae as vae_config
from shotstream_jax.convert import vae as convert_vae
from shotstream_jax.io.video import to_unit
from shotstream_jax import loading
from shotstream_jax.models import vae as vae_lib
from shotstream_jax.training import chain as chain_lib
from shotstream_jax.training import metrics as metrics_lib
from shotstream_jax.training import train_loop
from shotstream_jax.training import vae_stage


def _config(data_dir, **overrides):
  c = vae_config.get_config('tiny')
  c.data.dir = data_dir
  c.data.storyworld.num_train, c.data.storyworld.num_heldout = 12, 4
  c.data.batch_size = 2
  c.vae.base_dim = 4          # a narrower VAE: compiles and steps faster, same code paths
  c.vae_train.full_shots = 1
  c.vae_train.eval_batches = 1
  c.train.progress = c.train.tensorboard = False
  c.train.eval_every = 3
  c.train.checkpoint_every = 3
  c.train.num_steps = 6
  return chain_lib.apply_overrides(c, overrides)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('vae_storyworld'))


@pytest.fixture(scope='module')
def run(data_dir, tmp_path_factory):
  """(workdir, final state) of an uninterrupted 6-step run."""
  workdir = str(tmp_path_factory.mktemp('vae_run'))
  return workdir, train_loop.train(_config(data_dir), workdir)


class _Killed(Exception):
  pass


# Stage-0 training in a test peaks at ~7 GB and takes minutes on 2 cores: opt-in (--runhuge).
# CI still trains and exports stage 0 through tests/test_chain.py (2 steps, base-4 VAE).
@pytest.mark.huge
def test_trains_resumes_and_logs(data_dir, run, tmp_path):
  workdir, whole = run

  def kill(step, state, metrics):
    if step == 5:   # after checkpoint 3, before checkpoint 6
      raise _Killed()
  with pytest.raises(_Killed):
    train_loop.train(_config(data_dir), str(tmp_path), step_hook=kill)
  resumed = train_loop.train(_config(data_dir), str(tmp_path))   # steps 4-6 from checkpoint 3
  for x, y in zip(jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  rows = metrics_lib.read_jsonl(workdir)
  train_rows = [r for r in rows if 'loss' in r]
  assert [r['step'] for r in train_rows] == [1, 2, 3, 4, 5, 6]
  assert train_rows[-1]['loss'] < train_rows[0]['loss']
  evals = [r for r in rows if 'eval/psnr' in r]
  assert [r['step'] for r in evals] == [0, 3, 6] and all(np.isfinite(r['eval/psnr']) for r in evals)


def test_fold_latent_stats_is_exact(data_dir, tmp_path):
  c = _config(data_dir)
  vae = vae_lib.WanVAE(c.vae)
  params = jax.tree.map(np.asarray, vae_lib.init_params(c.vae, jax.random.key(0)))
  z = c.vae.z_dim
  mean = np.linspace(-1, 1, z).astype(np.float32)
  std = np.linspace(0.5, 2, z).astype(np.float32)
  folded = vae_stage.fold_latent_stats(params, mean, std)
  video = jax.random.uniform(jax.random.key(1), (1, 5, 16, 16, 3), minval=-1, maxval=1)
  raw = vae_lib.encode(vae, params, video)
  np.testing.assert_allclose(vae_lib.encode(vae, folded, video), (raw - mean) / std,
                             atol=1e-5, rtol=1e-5)
  lat = jax.random.normal(jax.random.key(2), raw.shape)
  np.testing.assert_allclose(vae_lib.decode(vae, folded, lat),
                             vae_lib.decode(vae, params, lat * std + mean), atol=1e-5)


@pytest.mark.huge
def test_export_writes_a_wan_vae_with_normalised_latents(data_dir, run, tmp_path):
  workdir, _ = run
  c = _config(data_dir)
  out = str(tmp_path / 'vae.safetensors')
  stats = vae_stage.export_vae(c, workdir, out, num_clips=4)
  assert os.path.exists(out[:-len('.safetensors')] + '.stats.json')
  trained = loading.restore_networks(workdir, ['vae'])['vae']
  exported = convert_vae.load_vae(out, c.vae)
  vae = vae_lib.WanVAE(c.vae)
  video = jax.random.uniform(jax.random.key(3), (1, 9, 32, 32, 3), minval=-1, maxval=1)
  raw = np.asarray(vae_lib.encode(vae, trained, video))
  want = (raw - np.asarray(stats['mean'])) / np.asarray(stats['std'])
  np.testing.assert_allclose(vae_lib.encode(vae, exported, video), want, atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match='safetensors'):
    vae_stage.export_vae(c, workdir, str(tmp_path / 'vae.pth'))


@pytest.mark.parametrize('field,value,match', [
    ('vae_train.l1', -1.0, 'vae_train.l1'),
    ('vae_train.temporal_consistency', -0.5, 'vae_train.temporal_consistency'),
    ('vae_train.init_gain', 0.0, 'vae_train.init_gain'),
    ('vae_train.edge', -1.0, 'vae_train.edge'),
    ('vae_train.latent_mix', -1.0, 'vae_train.latent_mix'),
    ('data.source', 'precomputed', 'data.source'),
    ('vae_train.clip_frames', 4, 'vae_train.clip_frames'),
    ('vae_train.full_shots', 3, 'vae_train.full_shots'),
])
def test_bad_config(data_dir, tmp_path, field, value, match):
  with pytest.raises(ValueError, match=match):
    vae_stage.VaeStage(_config(data_dir, **{field: value}), str(tmp_path))


def test_latent_drift_matches_images_encoded_alone(data_dir):
  """latent_drift against its definition through the public encode path: latent k >= 1 of a
  clip vs `encode_image` of pixel frame k t; and the loss adds weight x drift exactly."""
  c = _config(data_dir)
  vae = vae_lib.WanVAE(c.vae)
  params = vae_lib.init_params(c.vae, jax.random.key(0))
  t = vae_lib.temporal_factor(c.vae)
  x = jax.random.uniform(jax.random.key(1), (2, 1 + 2 * t, 16, 16, 3), minval=-1, maxval=1)
  mu = np.asarray(vae_lib.encode(vae, params, x))            # identity latent stats (tiny)
  alone = np.stack([np.asarray(vae_lib.encode_image(vae, params, x[:, k * t]))[:, 0]
                    for k in (1, 2)], 1)
  want = np.mean((mu[:, 1:] - alone) ** 2) / np.mean(alone ** 2)
  got = float(vae_stage.latent_drift(vae, params, x, jax.numpy.asarray(mu)))
  assert want > 0.01   # a random causal encoder does carry time: the check can fail
  np.testing.assert_allclose(got, want, rtol=1e-4)
  static = np.repeat(np.asarray(x[:, :1]), x.shape[1], axis=1)
  batch = {'clip': ((static + 1) * 127.5).astype(np.uint8), 'shot': None}
  kw = dict(l1=1.0, mse=1.0, latent_l2=0.0, full_shots=0)
  base, _ = vae_stage.reconstruction_loss(vae, params, batch, None, **kw)
  with_term, m = vae_stage.reconstruction_loss(vae, params, batch, None, **kw,
                                               temporal_consistency=2.0)
  assert float(m['latent_drift']) > 0
  np.testing.assert_allclose(float(with_term), float(base) + 2.0 * float(m['latent_drift']),
                             rtol=1e-5)


def test_stage_0b_gives_an_exported_vae_a_wider_decoder(data_dir, tmp_path):
  """Stage 0b from an exported VAE file with `fresh_decoder` and a wider `vae.decoder_base_dim`:
  the encoder and quant conv are the file's bit for bit (so every latent stays what the DiT
  stages trained on), the decoder is new and of the configured width; without `fresh_decoder`
  the narrow file does not load into the wide config."""
  from safetensors import numpy as st_numpy   # pylint: disable=g-import-not-at-top
  c = _config(data_dir)
  vae = vae_lib.WanVAE(c.vae)
  params = jax.tree.map(np.asarray, vae_lib.init_params(c.vae, jax.random.key(0)))
  path = str(tmp_path / 'vae.safetensors')
  st_numpy.save_file(convert_vae.vae_to_torch(params, c.vae), path)
  wide_fields = {'vae_train.init_from': path, 'vae.decoder_base_dim': 8}
  wide = _config(data_dir, **wide_fields, **{'vae_train.fresh_decoder': True})
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  got = vae_stage.VaeStage(wide, str(tmp_path / 'w')).init_params(jax.random.key(1),
                                                                  {'vae': device})['vae']
  for name in ('encoder', 'quant_conv'):
    jax.tree.map(np.testing.assert_array_equal, got[name], params[name])
  assert got['decoder']['conv_in']['kernel'].shape[-1] == 8 * c.vae.dim_mult[-1]
  assert params['decoder']['conv_in']['kernel'].shape[-1] == 4 * c.vae.dim_mult[-1]
  wide_vae = vae_lib.WanVAE(wide.vae)
  video = jax.random.uniform(jax.random.key(2), (1, 5, 16, 16, 3), minval=-1, maxval=1)
  lat = vae_lib.encode(wide_vae, got, video)
  np.testing.assert_array_equal(lat, vae_lib.encode(vae, params, video))
  assert vae_lib.decode(wide_vae, got, lat).shape == video.shape
  with pytest.raises(ValueError, match=r'wrong shapes: decoder\.'):
    vae_stage.VaeStage(_config(data_dir, **wide_fields), str(tmp_path / 'x')).init_params(
        jax.random.key(1), {'vae': device})


def test_edge_error_is_the_l1_of_gradient_differences(data_dir):
  """edge_error against a loop over neighbouring pixels; the loss adds weight x edge exactly; a
  square rounded at its corners costs more edge error than the same error spread evenly."""
  rng = np.random.default_rng(0)
  y, x = rng.normal(size=(2, 2, 3, 6, 5, 3)).astype(np.float32)
  err = y - x
  want = 0.0
  for axis in (2, 3):
    a = np.moveaxis(err, axis, 0)
    want += np.mean([np.abs(a[i + 1] - a[i]) for i in range(a.shape[0] - 1)])
  np.testing.assert_allclose(float(vae_stage.edge_error(err)), want, rtol=1e-5)
  corner = np.zeros((1, 1, 8, 8, 1), np.float32)
  corner[0, 0, 2, 2] = corner[0, 0, 2, 5] = corner[0, 0, 5, 2] = corner[0, 0, 5, 5] = -1.0
  spread = np.full_like(corner, float(np.mean(np.abs(corner))))   # same L1, no structure
  assert float(vae_stage.edge_error(corner)) > float(vae_stage.edge_error(spread)) + 0.1
  c = _config(data_dir)
  vae = vae_lib.WanVAE(c.vae)
  params = vae_lib.init_params(c.vae, jax.random.key(0))
  clip = rng.integers(0, 256, size=(2, 5, 16, 16, 3), dtype=np.uint8)
  batch = {'clip': clip, 'shot': None}
  kw = dict(l1=1.0, mse=1.0, latent_l2=0.0, full_shots=0)
  base, _ = vae_stage.reconstruction_loss(vae, params, batch, None, **kw)
  with_term, m = vae_stage.reconstruction_loss(vae, params, batch, None, **kw, edge=0.5)
  assert float(m['edge']) > 0
  np.testing.assert_allclose(float(with_term), float(base) + 0.5 * float(m['edge']), rtol=1e-5)


def test_latent_mix_error(data_dir):
  """latent_mix_error: with a batch of one clip repeated, every mix is that clip, so the term is
  the clip's own weighted reconstruction error (the loss' l1 / mse metrics); on distinct clips
  it trains the decoder only (no gradient reaches the encoder) and the loss adds weight x it."""
  c = _config(data_dir)
  vae = vae_lib.WanVAE(c.vae)
  params = vae_lib.init_params(c.vae, jax.random.key(0))
  rng = np.random.default_rng(1)
  clip = rng.integers(0, 256, size=(1, 5, 16, 16, 3), dtype=np.uint8)
  kw = dict(l1=1.0, mse=0.5, latent_l2=0.0, full_shots=0)
  same = {'clip': np.repeat(clip, 3, axis=0), 'shot': None}
  _, m = vae_stage.reconstruction_loss(vae, params, same, jax.random.key(2), **kw,
                                       latent_mix=1.0)
  np.testing.assert_allclose(float(m['latent_mix']), float(m['l1']) + 0.5 * float(m['mse']),
                             rtol=1e-4)
  batch = {'clip': rng.integers(0, 256, size=(3, 5, 16, 16, 3), dtype=np.uint8), 'shot': None}
  base, _ = vae_stage.reconstruction_loss(vae, params, batch, jax.random.key(2), **kw)
  with_term, m = vae_stage.reconstruction_loss(vae, params, batch, jax.random.key(2), **kw,
                                               latent_mix=2.0)
  np.testing.assert_allclose(float(with_term), float(base) + 2.0 * float(m['latent_mix']),
                             rtol=1e-5)
  x = to_unit(batch['clip'])
  mu = vae.apply({'params': params}, x, method=vae_stage._mu)  # pylint: disable=protected-access
  grads = jax.grad(lambda p: vae_stage.latent_mix_error(vae, p, x, mu, jax.random.key(3),
                                                        l1=1.0, mse=1.0))(params)
  assert all(float(np.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads['encoder']))
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads['decoder'])) > 0
