"""WanDiT parity with diffusers.WanTransformer3DModel, importers, and the ShotStream additions.

Tolerance: fp32 everywhere; we require max |ours - diffusers| <= 1e-5 * max |diffusers|
(measured 4e-7 relative on CPU for tiny; the slack covers summation-order differences of
XLA vs ATen in 2-4 layer models).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

from configs import shotstream
from shotstream_jax.convert import dit as dit_convert
from shotstream_jax.convert.common import CheckpointError
from shotstream_jax.models import dit

REL_TOL = 1e-5


def tiny_cfg(**overrides):
  cfg = shotstream.get_config('tiny').model
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


def diffusers_model(cfg, seed=0):
  """A diffusers Wan DiT of `cfg`'s shape with every parameter random (head, modulation too)."""
  torch.manual_seed(seed)
  model = WanTransformer3DModel(
      patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads,
      attention_head_dim=cfg.dim // cfg.num_heads, in_channels=cfg.in_channels,
      out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
      ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
      qk_norm='rms_norm_across_heads', eps=cfg.eps).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif name.endswith('bias'):
        p.copy_(0.1 * torch.randn_like(p))
      elif p.ndim >= 2 and 'scale_shift_table' not in name:
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(torch.randn_like(p) / np.sqrt(fan_in))
      else:
        p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1]))
  return model


def original_state_dict(model):
  """diffusers names -> original Wan names, written independently of the importer's table."""
  out = {}
  for name, t in model.state_dict().items():
    n = name
    n = n.replace('condition_embedder.time_embedder.linear_1', 'time_embedding.0')
    n = n.replace('condition_embedder.time_embedder.linear_2', 'time_embedding.2')
    n = n.replace('condition_embedder.time_proj', 'time_projection.1')
    n = n.replace('condition_embedder.text_embedder.linear_1', 'text_embedding.0')
    n = n.replace('condition_embedder.text_embedder.linear_2', 'text_embedding.2')
    n = n.replace('.attn1.to_out.0.', '.self_attn.o.').replace('.attn2.to_out.0.', '.cross_attn.o.')
    for a, b in (('attn1', 'self_attn'), ('attn2', 'cross_attn')):
      for p in 'qkv':
        n = n.replace(f'.{a}.to_{p}.', f'.{b}.{p}.')
      for p in 'qk':
        n = n.replace(f'.{a}.norm_{p}.', f'.{b}.norm_{p}.')
    n = n.replace('.norm2.', '.norm3.').replace('.ffn.net.0.proj.', '.ffn.0.')
    n = n.replace('.ffn.net.2.', '.ffn.2.')
    if n.startswith('blocks.') and n.endswith('.scale_shift_table'):
      n = n.replace('scale_shift_table', 'modulation')
    n = {'scale_shift_table': 'head.modulation'}.get(n, n)
    n = n.replace('proj_out.', 'head.head.')
    out[n] = t.clone()
  return out


def run_diffusers(model, latents, timesteps, context):
  """latents [B, F, H, W, C] numpy; timesteps [B] or per-token [B, T]."""
  with torch.no_grad():
    out = model(torch.from_numpy(np.asarray(latents)).permute(0, 4, 1, 2, 3),
                torch.from_numpy(np.asarray(timesteps)),
                torch.from_numpy(np.asarray(context)), return_dict=False)[0]
  return out.permute(0, 2, 3, 4, 1).numpy()


def inputs(cfg, b, f, h, w, l=7, seed=0, n_ctx=None):
  rng = np.random.default_rng(seed)
  lat = rng.standard_normal((b, f, h, w, cfg.in_channels)).astype(np.float32)
  ctx = rng.standard_normal((n_ctx or b, l, cfg.text_dim)).astype(np.float32)
  return lat, ctx


def assert_close(ours, ref, rel=REL_TOL):
  err = np.max(np.abs(np.asarray(ours) - ref))
  scale = np.max(np.abs(ref))
  assert err <= rel * scale, f'max abs err {err:.3g} vs output scale {scale:.3g} ({err/scale:.3g} rel)'
  return err / scale


@pytest.fixture(scope='module')
def tiny():
  cfg = tiny_cfg()
  model = diffusers_model(cfg)
  params = dit_convert.dit_from_torch(model.state_dict(), cfg)
  return cfg, model, params


@pytest.mark.parametrize('b,f,h,w', [(1, 1, 4, 6), (2, 3, 6, 4), (2, 5, 8, 12)])
def test_parity_with_diffusers_both_layouts(tiny, b, f, h, w):
  cfg, model, params = tiny
  lat, ctx = inputs(cfg, b, f, h, w)
  t = np.array([999.0, 371.5][:b], np.float32)
  ref = run_diffusers(model, lat, t, ctx)
  fwd = jax.jit(dit.WanDiT(cfg).apply)
  ours = fwd({'params': params}, lat, jnp.broadcast_to(t[:, None], (b, f)), ctx)
  assert_close(ours, ref)
  # The original Wan layout converts to the same params.
  params_orig = dit_convert.dit_from_torch(original_state_dict(model), cfg)
  jax.tree.map(np.testing.assert_array_equal, params_orig, params)


def test_per_frame_timesteps_match_diffusers_per_token(tiny):
  """Per-frame timesteps == diffusers' per-token timestep path with each frame's t repeated."""
  cfg, model, params = tiny
  b, f, h, w = 2, 3, 4, 6
  lat, ctx = inputs(cfg, b, f, h, w, seed=1)
  t_frames = np.array([[0.0, 500.0, 999.0], [250.0, 250.0, 737.59]], np.float32)
  t_tokens = np.repeat(t_frames, (h // 2) * (w // 2), axis=1)
  ref = run_diffusers(model, lat, t_tokens, ctx)
  ours = dit.WanDiT(cfg).apply({'params': params}, lat, t_frames, ctx)
  assert_close(ours, ref)


def test_parity_other_shape_config():
  """Heads, head_dim and layers all differ from tiny (head_dim 48 -> RoPE pairs 8/8/8)."""
  cfg = tiny_cfg(dim=96, num_heads=2, num_layers=3, ffn_dim=160, freq_dim=64, text_dim=24)
  model = diffusers_model(cfg, seed=3)
  params = dit_convert.dit_from_torch(original_state_dict(model), cfg)
  lat, ctx = inputs(cfg, 2, 2, 6, 10, l=5, seed=2)
  t = np.array([10.0, 900.0], np.float32)
  ref = run_diffusers(model, lat, t, ctx)
  assert_close(dit.WanDiT(cfg).apply({'params': params}, lat, jnp.stack([t, t], 1), ctx), ref)


def test_shotstream_pt_file_reproduces_diffusers(tiny, tmp_path):
  cfg, model, _ = tiny
  sd = {'generator': {f'model.{k}': v for k, v in original_state_dict(model).items()}}
  path = tmp_path / 'shotstream_merged.pt'
  torch.save(sd, path)
  params = dit_convert.load_dit(str(path), cfg)
  lat, ctx = inputs(cfg, 1, 3, 4, 4, seed=5)
  ref = run_diffusers(model, lat, np.array([640.0], np.float32), ctx)
  assert_close(dit.WanDiT(cfg).apply({'params': params}, lat, jnp.full((1, 3), 640.0), ctx), ref)


def test_legacy_non_zip_pt_file_loads(tiny, tmp_path):
  """torch.save(..., _use_new_zipfile_serialization=False), as torch < 1.6 wrote: mmap cannot
  read it (that used to be the error); it loads into memory, same params."""
  cfg, model, params = tiny
  path = tmp_path / 'legacy.pt'
  torch.save(original_state_dict(model), path, _use_new_zipfile_serialization=False)
  jax.tree.map(np.testing.assert_array_equal, dit_convert.load_dit(str(path), cfg), params)


def test_safetensors_file_loads_without_torch_tensors(tiny, tmp_path):
  from safetensors.numpy import save_file
  cfg, model, params = tiny
  path = tmp_path / 'diffusion_pytorch_model.safetensors'
  save_file({k: v.numpy() for k, v in original_state_dict(model).items()}, str(path))
  jax.tree.map(np.testing.assert_array_equal, dit_convert.load_dit(str(path), cfg), params)


def test_importer_mismatch_errors(tiny, tmp_path):
  cfg, model, _ = tiny
  sd = original_state_dict(model)
  del sd['blocks.1.ffn.0.weight']
  sd['blocks.0.extra.weight'] = torch.zeros(3)
  sd['head.modulation'] = torch.zeros(1, 3, cfg.dim)
  with pytest.raises(CheckpointError) as e:
    dit_convert.dit_from_torch(sd, cfg)
  msg = str(e.value)
  assert '1 missing keys: blocks.1.ffn.0.weight' in msg
  assert '1 unexpected keys: blocks.0.extra.weight' in msg
  assert 'head.modulation: expected (1, 2, 64), got (1, 3, 64)' in msg
  # A larger config than the file: every missing block is counted, the list is cut short.
  with pytest.raises(CheckpointError, match=r'missing keys: .*\(\+\d+ more\)'):
    dit_convert.dit_from_torch(model.state_dict(), tiny_cfg(num_layers=4))
  with pytest.raises(CheckpointError, match='not a Wan / ShotStream / diffusers DiT'):
    dit_convert.dit_from_torch({'encoder.weight': torch.zeros(2)}, cfg)
  bad = tmp_path / 'truncated.pt'
  torch.save(sd, bad)
  bad.write_bytes(bad.read_bytes()[:200])
  with pytest.raises(CheckpointError, match='cannot read'):
    dit_convert.load_dit(str(bad), cfg)
  with pytest.raises(CheckpointError, match='file not found'):
    dit_convert.load_dit(str(tmp_path / 'nope.safetensors'), cfg)
  torch.save({'generator': {'model.step': 3}}, tmp_path / 'odd.pt')
  with pytest.raises(CheckpointError, match='not a ShotStream/Wan state dict'):
    dit_convert.load_dit(str(tmp_path / 'odd.pt'), cfg)


def test_bad_inputs_name_the_field(tiny):
  cfg, _, params = tiny
  m = dit.WanDiT(cfg)
  lat, ctx = inputs(cfg, 1, 2, 4, 4)
  cases = [
      (dict(latents=lat[..., :8]), 'latents: expected 16 channels'),
      (dict(latents=lat[:, :, :3]), 'latents: height 3 is not a multiple of the patch size 2'),
      (dict(timesteps=np.zeros((1, 3))), r'timesteps: expected shape \[1, 2\]'),
      (dict(context=np.concatenate([ctx, ctx])), 'context: has 2 rows but the batch has 1'),
      (dict(attention='causal'), "attention: unknown mode 'causal'"),
      (dict(frame_pos=np.arange(5)), r'frame_pos: expected shape \[1, 2\]'),
  ]
  for override, msg in cases:
    kw = dict(latents=lat, timesteps=np.zeros((1, 2)), context=ctx)
    kw.update(override)
    with pytest.raises(ValueError, match=msg):
      m.apply({'params': params}, **kw)


def test_param_count_wan_1_3b():
  assert dit.count_params(shotstream.get_config('wan_1_3b').model) == 1_418_996_800


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown preset 'big'; accepted: storyworld, tiny, wan_1_3b"):
    shotstream.get_config('big')


@pytest.mark.huge   # ~2.5 min, 12 GB: opt-in (--runhuge) to keep the CI run under 30 min
def test_parity_wan_1_3b_full_shapes():
  """Full 1.3B shapes, random weights, 1 latent frame at 60x104, text 512, fp32."""
  cfg = shotstream.get_config('wan_1_3b').model
  model = diffusers_model(cfg, seed=11)
  lat, ctx = inputs(cfg, 1, 1, 60, 104, l=512, seed=11)
  t = np.array([737.59], np.float32)
  ref = run_diffusers(model, lat, t, ctx)
  params = dit_convert.dit_from_torch(model.state_dict(), cfg)
  del model
  rel = assert_close(dit.WanDiT(cfg).apply({'params': params}, lat, t[None], ctx), ref)
  print(f'wan_1_3b parity: max abs err / output scale = {rel:.3g}')


def test_x0_prediction_is_read_back_as_a_velocity():
  """model.prediction='x0': the same params' head output (what 'velocity' returns as is) is the
  x0 the returned velocity gives back through x0 = x_t - sigma v, per frame; below
  x0_min_sigma the velocity is (x_t - x0) / x0_min_sigma; an unknown mode is an error."""
  cfg = shotstream.get_config('tiny').model
  params = dit.init_params(cfg, jax.random.key(0))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape),
                        params)   # Wan zero-initialises the head
  x_t = jax.random.normal(jax.random.key(2), (2, 3, 4, 6, cfg.in_channels))
  t = jnp.array([[1000.0, 600.0, 10.0], [300.0, 40.0, 0.0]])
  ctx = jax.random.normal(jax.random.key(3), (2, 5, cfg.text_dim))
  head = dit.WanDiT(cfg).apply({'params': params}, x_t, t, ctx)
  x0_cfg = cfg.copy_and_resolve_references()
  x0_cfg.prediction = 'x0'
  v = dit.WanDiT(x0_cfg).apply({'params': params}, x_t, t, ctx)
  sigma = np.maximum(np.asarray(t) / 1000.0, x0_cfg.x0_min_sigma)[:, :, None, None, None]
  np.testing.assert_allclose(np.asarray(x_t) - sigma * np.asarray(v), head, atol=2e-5)
  assert np.all(np.isfinite(v))            # t = 0 (the cache pass) divides by the floor
  x0_cfg.prediction = 'noise'
  with pytest.raises(ValueError, match='model.prediction: unknown'):
    dit.WanDiT(x0_cfg).apply({'params': params}, x_t, t, ctx)
