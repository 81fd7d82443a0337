"""Per-frame timesteps, caption routing and the block-causal mask, each against an independent
formulation (truncated sequences, single-caption runs, K/V-prefix runs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shotstream
from shotstream_jax.models import attention
from shotstream_jax.models import dit

ATOL = 2e-5  # fp32; outputs are O(1)


@pytest.fixture(scope='module')
def setup():
  cfg = shotstream.get_config('tiny').model
  cfg.rope.theta = 0.4
  cfg.rope.position_gap = 2
  params = dit.init_params(cfg, jax.random.key(0))
  # The head is zero-initialised (as in Wan): randomise every leaf so outputs are informative.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  params = jax.tree.unflatten(tree, leaves)
  apply = jax.jit(dit.WanDiT(cfg).apply,
                  static_argnames=('attention', 'chunk_frames', 'context_frames', 'return_kv'))
  return cfg, params, apply


def _rand(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_block_causal_frame0_ignores_later_timesteps_and_captions(setup):
  cfg, params, apply = setup
  f = 4
  lat = _rand((1, f, 4, 6, 16), 0)
  caps = _rand((3, 5, cfg.text_dim), 1)
  t1 = jnp.array([[700.0, 100.0, 300.0, 900.0]])
  t2 = jnp.array([[700.0, 999.0, 0.0, 20.0]])
  c1 = jnp.array([[0, 1, 2, 1]])
  c2 = jnp.array([[0, 2, 0, 0]])
  kw = dict(attention='block_causal', chunk_frames=1, context_frames=0)
  a = apply({'params': params}, lat, t1, caps, frame_caption=c1, **kw)
  b = apply({'params': params}, lat, t2, caps, frame_caption=c2, **kw)
  np.testing.assert_allclose(a[:, 0], b[:, 0], atol=ATOL)
  assert np.abs(a[:, 1:] - b[:, 1:]).max() > 1e-2  # the later frames did change
  # Without the mask, frame 0 does see the later frames.
  a = apply({'params': params}, lat, t1, caps, frame_caption=c1)
  b = apply({'params': params}, lat, t2, caps, frame_caption=c2)
  assert np.abs(a[:, 0] - b[:, 0]).max() > 1e-3


@pytest.mark.parametrize('mode', ['bidirectional', 'block_causal'])
def test_all_frames_on_one_caption_equals_single_caption_run(setup, mode):
  cfg, params, apply = setup
  lat = _rand((2, 3, 4, 4, 16), 2)
  caps = _rand((3, 5, cfg.text_dim), 3)
  t = jnp.array([[10.0, 500.0, 990.0], [300.0, 300.0, 300.0]])
  kw = dict(attention=mode, chunk_frames=1, context_frames=1)
  for j in range(3):
    routed = apply({'params': params}, lat, t, caps, frame_caption=jnp.full((2, 3), j), **kw)
    single = apply({'params': params}, lat, t, jnp.repeat(caps[j:j + 1], 2, axis=0), **kw)
    np.testing.assert_allclose(routed, single, atol=ATOL)


def test_routed_frame_equals_single_caption_run_under_mask(setup):
  cfg, params, apply = setup
  lat = _rand((1, 3, 4, 4, 16), 4)
  caps = _rand((3, 6, cfg.text_dim), 5)
  t = jnp.array([[250.0, 600.0, 800.0]])
  kw = dict(attention='block_causal', chunk_frames=1, context_frames=0)
  for j in range(3):
    routed = apply({'params': params}, lat, t, caps, frame_caption=jnp.array([[j, 2 - j, 1]]), **kw)
    single = apply({'params': params}, lat, t, caps[j:j + 1], **kw)
    np.testing.assert_allclose(routed[:, 0], single[:, 0], atol=ATOL)
    assert np.abs(routed[:, 1] - single[:, 1]).max() > 1e-3 or j == 1


def _story_inputs(cfg):
  """2 context frames + 3 chunks of 2 frames, two shots, per-frame everything."""
  f = 8
  lat = _rand((1, f, 4, 6, 16), 6)
  caps = _rand((3, 5, cfg.text_dim), 7)
  t = jnp.array([[0.0, 0.0, 900.0, 900.0, 500.0, 500.0, 120.0, 120.0]])
  pos = jnp.array([[0, 1, 2, 3, 4, 5, 6, 7]])
  shot = jnp.array([[1, 2, 3, 3, 3, 3, 3, 3]])
  cap = jnp.array([[0, 1, 2, 2, 2, 2, 2, 2]])
  return lat, caps, t, pos, shot, cap


def test_block_causal_chunk_equals_truncated_sequence(setup):
  cfg, params, apply = setup
  lat, caps, t, pos, shot, cap = _story_inputs(cfg)
  kw = dict(attention='block_causal', chunk_frames=2, context_frames=2)
  full = apply({'params': params}, lat, t, caps, frame_pos=pos, frame_shot=shot,
               frame_caption=cap, **kw)
  for b in range(3):
    end = 2 + 2 * (b + 1)
    trunc = apply({'params': params}, lat[:, :end], t[:, :end], caps, frame_pos=pos[:, :end],
                  frame_shot=shot[:, :end], frame_caption=cap[:, :end], **kw)
    np.testing.assert_allclose(full[:, end - 2:end], trunc[:, end - 2:], atol=ATOL)


def test_block_causal_equals_kv_prefix_formulation(setup):
  """Mask-free: context pass alone, then each chunk attends to the K/V of all before it."""
  cfg, params, apply = setup
  lat, caps, t, pos, shot, cap = _story_inputs(cfg)
  full = apply({'params': params}, lat, t, caps, frame_pos=pos, frame_shot=shot,
               frame_caption=cap, attention='block_causal', chunk_frames=2, context_frames=2)

  def run(sl, prefix):
    return apply({'params': params}, lat[:, sl], t[:, sl], caps, frame_pos=pos[:, sl],
                 frame_shot=shot[:, sl], frame_caption=cap[:, sl], prefix_kv=prefix,
                 return_kv=True)

  out, (k, v) = run(slice(0, 2), None)
  np.testing.assert_allclose(full[:, :2], out, atol=ATOL)
  for start in (2, 4, 6):
    prefix = [(k, v, jnp.ones(k.shape[1:3], bool))]
    out, (k_new, v_new) = run(slice(start, start + 2), prefix)
    np.testing.assert_allclose(full[:, start:start + 2], out, atol=ATOL)
    k = jnp.concatenate([k, k_new], axis=2)
    v = jnp.concatenate([v, v_new], axis=2)


def test_invalid_prefix_entries_are_ignored(setup):
  """Cache slots marked invalid contribute nothing (fixed-shape caches with a fill length)."""
  cfg, params, apply = setup
  lat, caps, t, pos, shot, cap = _story_inputs(cfg)
  _, (k, v) = apply({'params': params}, lat[:, :2], t[:, :2], caps, frame_pos=pos[:, :2],
                    frame_shot=shot[:, :2], frame_caption=cap[:, :2], return_kv=True)
  garbage = 5.0 * jnp.ones_like(k)
  pk = jnp.concatenate([k, garbage], axis=2)
  pv = jnp.concatenate([v, garbage], axis=2)
  valid = jnp.arange(pk.shape[2])[None] < k.shape[2]
  kw = dict(frame_pos=pos[:, 2:4], frame_shot=shot[:, 2:4], frame_caption=cap[:, 2:4])
  a = apply({'params': params}, lat[:, 2:4], t[:, 2:4], caps,
            prefix_kv=[(k, v, jnp.ones(k.shape[1:3], bool))], **kw)
  b = apply({'params': params}, lat[:, 2:4], t[:, 2:4], caps, prefix_kv=[(pk, pv, valid)], **kw)
  np.testing.assert_allclose(a, b, atol=ATOL)
  with pytest.raises(ValueError, match=r'prefix_kv: expected a sequence of \(k, v, valid\)'):
    apply({'params': params}, lat[:, 2:4], t[:, 2:4], caps, prefix_kv=(pk, pv, valid), **kw)


def test_mask_layout():
  np.testing.assert_array_equal(attention.frame_blocks(8, 2, 2), [0, 0, 1, 1, 2, 2, 3, 3])
  np.testing.assert_array_equal(attention.frame_blocks(5, 3, 0), [1, 1, 1, 2, 2])
  m = np.asarray(attention.block_causal_mask(4, 2, 1, 1))[0, 0]
  assert m.shape == (8, 8)
  assert m[0:2, 0:2].all() and not m[0:2, 2:].any()  # context sees only context
  assert m[6:8].all()  # last chunk sees everything
  with pytest.raises(ValueError, match='model.chunk_frames: must be >= 1'):
    attention.frame_blocks(4, 0, 0)
  with pytest.raises(ValueError, match='context_frames: must be in'):
    attention.frame_blocks(4, 1, 5)


def test_precomputed_text_kv_and_segmented_prefix(setup):
  """WanTextKV + text_kv == inline text path; two prefix segments == one concatenated."""
  cfg, params, apply = setup
  lat, caps, t, pos, shot, cap = _story_inputs(cfg)
  kw = dict(frame_pos=pos[:, :2], frame_shot=shot[:, :2], frame_caption=cap[:, :2])
  base, (k, v) = apply({'params': params}, lat[:, :2], t[:, :2], caps, return_kv=True, **kw)
  text_kv = dit.WanTextKV(cfg).apply({'params': params}, caps)
  assert text_kv[0].shape == (cfg.num_layers, 3, 5, cfg.num_heads, cfg.dim // cfg.num_heads)
  out = apply({'params': params}, lat[:, :2], t[:, :2], None, text_kv=text_kv, **kw)
  np.testing.assert_allclose(out, base, atol=ATOL)
  kw = dict(frame_pos=pos[:, 2:4], frame_shot=shot[:, 2:4], frame_caption=cap[:, 2:4])
  ones = jnp.ones(k.shape[1:3], bool)
  whole = apply({'params': params}, lat[:, 2:4], t[:, 2:4], caps, prefix_kv=[(k, v, ones)], **kw)
  split = apply({'params': params}, lat[:, 2:4], t[:, 2:4], None, text_kv=text_kv,
                prefix_kv=[(k[:, :, :5], v[:, :, :5], ones[:, :5]),
                           (k[:, :, 5:], v[:, :, 5:], ones[:, 5:])], **kw)
  np.testing.assert_allclose(split, whole, atol=ATOL)


def test_filled_prefix_attends_only_the_filled_blocks():
  """attention.Filled (the local cache: exact cost, a lax.switch over block counts, length
  traced under jit) equals the masked formulation over the whole capacity at every fill, with
  a full segment in front (mask None) and an own-key mask."""
  rng = np.random.default_rng(0)
  b, t, h, d, block, cap, glob = 2, 4, 2, 8, 4, 12, 6
  q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(3))
  gk, gv = (jnp.asarray(rng.standard_normal((b, glob, h, d)), jnp.float32) for _ in range(2))
  lk, lv = (jnp.asarray(rng.standard_normal((b, cap, h, d)), jnp.float32) for _ in range(2))
  own = jnp.asarray(np.tril(np.ones((t, t), bool)))[None, None]

  @jax.jit
  def exact(length):
    return attention.prefix_attention(q, k, v, own, [(gk, gv), (lk, lv)],
                                      (None, attention.Filled(length, block)))

  for length in (0, block, 2 * block, cap):
    valid = jnp.broadcast_to(jnp.arange(cap) < length, (b, cap))
    masked = attention.prefix_attention(q, k, v, own, [(gk, gv), (lk, lv)],
                                        (jnp.ones((b, glob), bool), valid))
    np.testing.assert_allclose(exact(jnp.int32(length)), masked, atol=1e-6, err_msg=str(length))
  with pytest.raises(ValueError, match='at most one segment may be Filled'):
    attention.prefix_attention(q, k, v, None, [(lk, lv), (lk, lv)],
                               (attention.Filled(0, block),) * 2)
