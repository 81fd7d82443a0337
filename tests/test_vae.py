"""Wan2.1 VAE: parity with diffusers.AutoencoderKLWan, both checkpoint layouts, streaming decode.

Tolerances (fp32, random weights): outputs are O(1) (latents ~1, frames clamped to [-1, 1]), so
the absolute bounds below are also relative to the output scale. Measured on CPU (2 cores):
encode <= 1.3e-6 (latent scale ~1.3), decode <= 2.6e-6 (frame scale ~0.7, nothing clipped),
streaming vs whole-clip decode ~1e-6.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import shotstream
from shotstream_jax.convert import common
from shotstream_jax.convert import vae as convert_vae
from shotstream_jax.models import vae as vae_lib

diffusers = pytest.importorskip('diffusers')

ENC_TOL = 1e-5   # max |ours - diffusers| of normalised latents (scale ~1)
DEC_TOL = 2e-5   # max |ours - diffusers| of frames (scale 1)
STREAM_TOL = 1e-5


def _torch_vae(cfg):
  return diffusers.AutoencoderKLWan(
      base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
      num_res_blocks=cfg.num_res_blocks, temperal_downsample=list(cfg.temporal_downsample),
      latents_mean=list(cfg.latent_mean), latents_std=list(cfg.latent_std)).eval()


def _randomise(model, seed=0):
  """Every param random (Wan zero-inits some); output conv damped so few frames clip at +-1."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('gamma'):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif name.endswith('bias'):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(np.prod(p.shape[1:])))
      if name.startswith('decoder.conv_out'):
        p.mul_(0.3)
  return model


def _to_torch(x):  # [B, T, H, W, C] -> [B, C, T, H, W]
  return torch.from_numpy(np.asarray(x)).permute(0, 4, 1, 2, 3).contiguous()


def _from_torch(x):
  return x.permute(0, 2, 3, 4, 1).numpy()


def _torch_encode_mu(model, video):
  with torch.no_grad():
    return _from_torch(model.encode(_to_torch(video)).latent_dist.mean)


def _torch_decode(model, mu):
  with torch.no_grad():
    return _from_torch(model.decode(_to_torch(mu)).sample)


def _normalise(cfg, mu):
  return (mu - np.asarray(cfg.latent_mean, np.float32)) / np.asarray(cfg.latent_std, np.float32)


def diffusers_to_original(key: str, num_res_blocks: int) -> str:
  """Test-side rename, diffusers -> original Wan2.1_VAE.pth names (written from the Wan code)."""
  top = {'quant_conv.': 'conv1.', 'post_quant_conv.': 'conv2.'}
  for a, b in top.items():
    if key.startswith(a):
      return b + key[len(a):]
  part, rest = key.split('.', 1)
  rest = re.sub(r'^conv_in\.', 'conv1.', rest)
  rest = re.sub(r'^norm_out\.', 'head.0.', rest)
  rest = re.sub(r'^conv_out\.', 'head.2.', rest)
  rest = re.sub(r'^mid_block\.attentions\.0\.', 'middle.1.', rest)
  rest = re.sub(r'^mid_block\.resnets\.(\d)\.', lambda m: f'middle.{2 * int(m[1])}.', rest)
  rest = re.sub(r'^down_blocks\.', 'downsamples.', rest)
  per_level = num_res_blocks + 2  # decoder: nres+1 res blocks, then the upsampler
  rest = re.sub(r'^up_blocks\.(\d+)\.resnets\.(\d+)\.',
                lambda m: f'upsamples.{int(m[1]) * per_level + int(m[2])}.', rest)
  rest = re.sub(r'^up_blocks\.(\d+)\.upsamplers\.0\.',
                lambda m: f'upsamples.{int(m[1]) * per_level + per_level - 1}.', rest)
  leaf = {'norm1.': 'residual.0.', 'conv1.': 'residual.2.', 'norm2.': 'residual.3.',
          'conv2.': 'residual.6.', 'conv_shortcut.': 'shortcut.'}
  m = re.match(r'^((?:downsamples|upsamples|middle)\.\d+\.)(.*)$', rest)
  if m:
    for a, b in leaf.items():
      if m[2].startswith(a):
        rest = m[1] + b + m[2][len(a):]
  return f'{part}.{rest}'


@pytest.fixture(scope='module')
def tiny():
  cfg = shotstream.get_config('tiny').vae
  model = _randomise(_torch_vae(cfg))
  params = convert_vae.vae_from_torch(model.state_dict(), cfg)
  return cfg, model, vae_lib.WanVAE(cfg), params


def test_param_count_full_preset():
  cfg = shotstream.get_config('wan_1_3b').vae
  ours = vae_lib.count_params(cfg)
  with torch.device('meta'):
    ref = _torch_vae(cfg)
  assert ours == sum(p.numel() for p in ref.parameters()) == 126_892_531


@pytest.mark.parametrize('t', [1, 5, 9, 13])
def test_parity_with_diffusers(tiny, t):
  cfg, model, vae, params = tiny
  video = np.random.RandomState(t).uniform(-1, 1, (2, t, 16, 40, 3)).astype(np.float32)
  mu = _torch_encode_mu(model, video)
  want_z = _normalise(cfg, mu)
  for chunked in (True, False):
    encode = jax.jit(functools.partial(vae_lib.encode, vae, chunked=chunked))
    z = np.asarray(encode(params, jnp.asarray(video)))
    assert z.shape == (2, (t - 1) // 4 + 1, 2, 5, 16)
    err = np.abs(z - want_z).max()
    assert err < ENC_TOL, f'encode (chunked={chunked}) max abs err {err:.2e} at scale ' \
                          f'{np.abs(want_z).max():.2f}'
  want_x = _torch_decode(model, mu)
  for chunked in (True, False):
    decode = jax.jit(functools.partial(vae_lib.decode, vae, chunked=chunked))
    x = np.asarray(decode(params, jnp.asarray(want_z)))
    assert x.shape == video.shape
    err = np.abs(x - want_x).max()
    assert err < DEC_TOL, f'decode (chunked={chunked}) max abs err {err:.2e} (frames in [-1, 1])'


def test_parity_with_diffusers_storyworld_shape():
  """The storyworld preset's VAE (2 levels, 2x temporal, one res block, z 4) is still exactly
  diffusers' AutoencoderKLWan at those settings (9 frames: diffusers encodes in 4-frame pieces,
  we in 2-frame ones, and both are exact because every temporal op is causal); streaming decode
  in chunks of 3 latents, as generation decodes, equals whole-clip decode."""
  cfg = shotstream.get_config('storyworld').vae
  model = _randomise(_torch_vae(cfg), seed=3)
  params = convert_vae.vae_from_torch(model.state_dict(), cfg)
  vae = vae_lib.WanVAE(cfg)
  video = np.random.RandomState(0).uniform(-1, 1, (1, 9, 32, 32, 3)).astype(np.float32)
  mu = _torch_encode_mu(model, video)
  z = np.asarray(jax.jit(functools.partial(vae_lib.encode, vae))(params, jnp.asarray(video)))
  assert z.shape == (1, 5, 16, 16, cfg.z_dim) and cfg.z_dim == 4
  assert np.abs(z - _normalise(cfg, mu)).max() < ENC_TOL
  want_x = _torch_decode(model, mu)
  x = np.asarray(vae_lib.decode(vae, params, jnp.asarray(z)))
  assert np.abs(x - want_x).max() < DEC_TOL
  cache, frames = vae_lib.init_decode_cache(vae, 1, 16, 16), []
  for chunk in (z[:, :3], z[:, 3:]):
    out, cache = vae_lib.decode_step(vae, params, cache, jnp.asarray(chunk))
    frames.append(np.asarray(out))
  assert [f.shape[1] for f in frames] == [5, 4]
  assert np.abs(np.concatenate(frames, axis=1) - x).max() < STREAM_TOL
  # Our original-layout export reads back to the same params.
  again = convert_vae.vae_from_torch(convert_vae.vae_to_torch(params, cfg), cfg)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_encode_image_is_a_one_frame_clip(tiny):
  cfg, model, vae, params = tiny
  image = np.random.RandomState(0).uniform(-1, 1, (1, 24, 16, 3)).astype(np.float32)
  z = np.asarray(vae_lib.encode_image(vae, params, jnp.asarray(image)))
  want = _normalise(cfg, _torch_encode_mu(model, image[:, None]))
  assert z.shape == (1, 1, 3, 2, 16)
  np.testing.assert_allclose(z, want, atol=ENC_TOL, rtol=0)


def test_rename_table_agrees_with_diffusers_converter():
  """The test's diffusers->original table, checked on the real key set by diffusers' own
  original->diffusers converter (which is hard-coded for the Wan2.1 structure)."""
  from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
  cfg = shotstream.get_config('wan_1_3b').vae
  with torch.device('meta'):
    sd = _torch_vae(cfg).state_dict()
  original = {diffusers_to_original(k, cfg.num_res_blocks): v for k, v in sd.items()}
  assert len(original) == len(sd)
  assert set(convert_wan_vae_to_diffusers(original)) == set(sd)


def test_importer_original_layout(tiny):
  cfg, model, _, params = tiny
  sd = {diffusers_to_original(k, cfg.num_res_blocks): v for k, v in model.state_dict().items()}
  assert convert_vae.detect_layout(sd) == 'original'
  assert convert_vae.detect_layout(model.state_dict()) == 'diffusers'
  from_original = convert_vae.vae_from_torch(sd, cfg)
  from_numpy = convert_vae.vae_from_torch({k: v.numpy() for k, v in sd.items()}, cfg)
  want = common.flatten(params)
  for tree in (from_original, from_numpy):
    got = common.flatten(tree)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))


def test_importer_full_preset_key_sets():
  """Every key of the real-size state dict (both layouts) maps to a param of the wan_1_3b preset."""
  cfg = shotstream.get_config('wan_1_3b').vae
  with torch.device('meta'):
    sd = _torch_vae(cfg).state_dict()
  for layout, names in (('diffusers', sd),
                        ('original', {diffusers_to_original(k, 2): v for k, v in sd.items()})):
    kmap = convert_vae.key_map(cfg, layout)
    assert {k: tuple(s) for k, s in kmap.values()} == {k: tuple(v.shape) for k, v in names.items()}


def test_bad_checkpoints(tiny, tmp_path):
  cfg, model, _, _ = tiny
  sd = dict(model.state_dict())
  del sd['decoder.conv_out.bias']
  sd['encoder.extra.weight'] = torch.zeros(1)
  with pytest.raises(common.CheckpointError, match=r'missing keys: decoder\.conv_out\.bias.*'
                     r'unexpected keys: encoder\.extra\.weight'):
    convert_vae.vae_from_torch(sd, cfg)
  wider = shotstream.get_config('tiny').vae
  wider.base_dim = 16
  with pytest.raises(common.CheckpointError, match=r'wrong shapes: decoder\.conv_in\.bias: '
                     r'expected \(32,\), got \(16,\)'):
    convert_vae.vae_from_torch(model.state_dict(), wider)
  with pytest.raises(common.CheckpointError, match='not a Wan2.1 VAE state dict'):
    convert_vae.vae_from_torch({'blocks.0.q.weight': np.zeros(1)}, cfg)
  path = tmp_path / 'Wan2.1_VAE.pth'
  torch.save(model.state_dict(), path)
  assert convert_vae.load_vae(str(path), cfg).keys() == {'encoder', 'decoder', 'quant_conv',
                                                         'post_quant_conv'}
  path.write_bytes(path.read_bytes()[:2000])
  with pytest.raises(common.CheckpointError, match='cannot read'):
    convert_vae.load_vae(str(path), cfg)


def test_streaming_decode_matches_whole_clip_and_compiles_once(tiny):
  _, _, vae, params = tiny
  traces = []

  def step(params, cache, chunk):
    traces.append((cache.first, chunk.shape[1]))
    return vae_lib.decode_step(vae, params, cache, chunk)

  jstep = jax.jit(step)
  z = jax.random.normal(jax.random.PRNGKey(0), (1, 10, 3, 2, 16))
  whole = np.asarray(vae_lib.decode(vae, params, z))  # reference schedule, 1 latent per step
  for sizes in ((1, 3, 3, 3), (3, 3, 3, 1)):  # a DiT-style 3, 3, 3 shot with a 1-frame tail
    cache = vae_lib.init_decode_cache(vae, 1, 3, 2)
    frames, start = [], 0
    for n in sizes:
      x, cache = jstep(params, cache, z[:, start:start + n])
      assert x.shape[1] == (1 + 4 * (n - 1) if start == 0 else 4 * n)
      frames.append(np.asarray(x))
      start += n
    err = np.abs(np.concatenate(frames, axis=1) - whole).max()
    assert err < STREAM_TOL, f'chunks {sizes}: streaming vs whole decode max abs err {err:.2e}'
  # (first, n): (True, 1), (False, 3) for the first shot; (True, 3), (False, 1) for the second.
  # The 3-latent steady-state chunk was traced (and compiled) once for all five of its calls.
  assert traces == [(True, 1), (False, 3), (True, 3), (False, 1)], traces
  if hasattr(jstep, '_cache_size'):
    assert jstep._cache_size() == 4


def test_steady_chunks_in_a_scan_compile_once(tiny):
  """A whole shot as first chunk + lax.scan over 3-latent chunks: one jit, one compilation."""
  _, _, vae, params = tiny

  @jax.jit
  def shot(params, z):
    cache = vae_lib.init_decode_cache(vae, z.shape[0], z.shape[2], z.shape[3])
    x0, cache = vae_lib.decode_step(vae, params, cache, z[:, :3])
    rest = z[:, 3:].reshape((z.shape[0], -1, 3) + z.shape[2:]).swapaxes(0, 1)
    _, xs = jax.lax.scan(lambda c, zc: vae_lib.decode_step(vae, params, c, zc)[::-1], cache, rest)
    xs = xs.swapaxes(0, 1)
    return jnp.concatenate([x0, xs.reshape((xs.shape[0], -1) + xs.shape[3:])], axis=1)

  z = jax.random.normal(jax.random.PRNGKey(1), (1, 9, 2, 3, 16))
  got = shot(params, z)
  err = float(jnp.abs(got - vae_lib.decode(vae, params, z)).max())
  assert got.shape[1] == 33 and err < STREAM_TOL, err


def test_bad_inputs(tiny):
  _, _, vae, params = tiny
  with pytest.raises(ValueError, match='video: T must be 4k\\+1, got 6'):
    vae_lib.encode(vae, params, jnp.zeros((1, 6, 16, 16, 3)))
  with pytest.raises(ValueError, match='video: H and W must be multiples of 8, got 12x16'):
    vae_lib.encode(vae, params, jnp.zeros((1, 1, 12, 16, 3)))
  with pytest.raises(ValueError, match=r'latents: expected \[B, T>0, h, w, 16\]'):
    vae_lib.decode(vae, params, jnp.zeros((1, 2, 2, 2, 4)))
  cache = vae_lib.init_encode_cache(vae, 1, 16, 16)
  _, cache = vae_lib.encode_step(vae, params, cache, jnp.zeros((1, 1, 16, 16, 3)))
  with pytest.raises(ValueError, match='a chunk after the first must have T a positive '
                     'multiple of 4, got 3'):
    vae_lib.encode_step(vae, params, cache, jnp.zeros((1, 3, 16, 16, 3)))
  cache = vae_lib.init_decode_cache(vae, 1, 3, 2)
  with pytest.raises(ValueError, match=r'latents: batch, height, width \(1, 4, 4\) do not match '
                     r'the cache, made for \(1, 3, 2\)'):
    vae_lib.decode_step(vae, params, cache, jnp.zeros((1, 1, 4, 4, 16)))


@pytest.mark.huge   # ~2.5 min, 13 GB: opt-in (--runhuge) to keep the CI run under 30 min
def test_full_size_parity_one_frame():
  """The real Wan2.1 VAE shapes at one 480x832 frame (random weights).

  Measured on CPU: encode max abs err 1.7e-6 (latent scale 1.4), decode 7e-7 (frame scale 0.4);
  about 2.5 minutes on 2 cores.
  """
  cfg = shotstream.get_config('wan_1_3b').vae
  model = _randomise(_torch_vae(cfg), seed=1)
  vae = vae_lib.WanVAE(cfg)
  params = convert_vae.vae_from_torch(model.state_dict(), cfg)
  video = np.random.RandomState(0).uniform(-1, 1, (1, 1, 480, 832, 3)).astype(np.float32)
  mu = _torch_encode_mu(model, video)
  z = np.asarray(jax.jit(functools.partial(vae_lib.encode, vae))(params, jnp.asarray(video)))
  want_z = _normalise(cfg, mu)
  err = np.abs(z - want_z).max()
  assert err < ENC_TOL, f'encode max abs err {err:.2e} at scale {np.abs(want_z).max():.2f}'
  want_x = _torch_decode(model, mu)
  x = np.asarray(jax.jit(functools.partial(vae_lib.decode, vae))(params, jnp.asarray(want_z)))
  err = np.abs(x - want_x).max()
  assert err < DEC_TOL, f'decode max abs err {err:.2e} (frames in [-1, 1])'
