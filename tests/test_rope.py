"""Shot-aware 3D RoPE: diffusers' RoPE when the discontinuity is off; DESIGN 4.2 otherwise."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from shotstream_jax.models import rope


def reference_rope(x, frame_pos, frame_shot, h, w, theta, gap, base=10000.0):
  """DESIGN 4.2 in float64 complex arithmetic: x [T, H, D] with tokens laid out (f, h, w)."""
  d = x.shape[-1]
  c = d // 2
  sizes = [c - 2 * (c // 3), c // 3, c // 3]
  freqs = [base ** (-np.arange(0, 2 * s, 2) / (2 * s)) for s in sizes]
  rows = []
  for p, s in zip(frame_pos, frame_shot):
    for i in range(h):
      for j in range(w):
        rows.append(np.concatenate([(p + gap * s) * freqs[0] + s * theta, i * freqs[1],
                                    j * freqs[2]]))
  ang = np.stack(rows)[:, None, :]  # [T, 1, D/2]
  z = x[..., 0::2] + 1j * x[..., 1::2]
  z = z * np.exp(1j * ang)
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = z.real, z.imag
  return out


def test_split_for_head_dim_128():
  assert rope.rope_split(128) == (22, 21, 21)
  assert rope.rope_split(32) == (6, 5, 5)


@pytest.mark.parametrize('head_dim,f,h,w', [(128, 3, 4, 6), (32, 5, 3, 2)])
def test_no_discontinuity_is_diffusers_rope(head_dim, f, h, w):
  ang = rope.rope_angles(jnp.arange(f)[None], jnp.zeros((1, f), jnp.int32), h, w, head_dim,
                         theta=0.0, position_gap=0)
  cos, sin = WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)(torch.zeros(1, 16, f, 2 * h, 2 * w))
  ref_cos = cos[0, :, 0, 0::2].numpy()  # diffusers repeats each pair's value twice
  ref_sin = sin[0, :, 0, 0::2].numpy()
  np.testing.assert_allclose(np.cos(np.asarray(ang[0])), ref_cos, atol=2e-6)
  np.testing.assert_allclose(np.sin(np.asarray(ang[0])), ref_sin, atol=2e-6)


@pytest.mark.parametrize('theta,gap', [(1 / 6, 0), (0.0, 3), (1 / 6, 5)])
def test_shot_phase_and_gap_match_reference(theta, gap):
  rng = np.random.default_rng(0)
  f, h, w, heads, d = 6, 2, 3, 2, 128
  frame_pos = np.array([0, 1, 2, 6, 7, 8])
  frame_shot = np.array([0, 0, 1, 2, 2, 2])
  x = rng.standard_normal((f * h * w, heads, d))
  ang = rope.rope_angles(jnp.asarray(frame_pos)[None], jnp.asarray(frame_shot)[None], h, w, d,
                         theta=theta, position_gap=gap)
  ours = rope.apply_rope(jnp.asarray(x, jnp.float32)[None], ang)[0]
  ref = reference_rope(x, frame_pos, frame_shot, h, w, theta, gap)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5)
  # The jump is real: shot ids change the temporal channels only.
  flat = rope.rope_angles(jnp.asarray(frame_pos)[None], jnp.zeros((1, f), jnp.int32), h, w, d)
  diff = np.abs(np.asarray(ang - flat))[0]
  assert diff[:, 22:].max() == 0
  assert diff[:, :22].max() > 0.1


def test_rotation_preserves_norm_and_relative_positions():
  """q.k after RoPE depends only on the position difference (a property, not a reimplementation)."""
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((1, 1, 1, 32)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, 32)), jnp.float32)

  def dot(pq, pk):
    aq = rope.rope_angles(jnp.array([[pq]]), jnp.zeros((1, 1), jnp.int32), 1, 1, 32)
    ak = rope.rope_angles(jnp.array([[pk]]), jnp.zeros((1, 1), jnp.int32), 1, 1, 32)
    return float(jnp.sum(rope.apply_rope(q, aq) * rope.apply_rope(k, ak)))

  assert abs(dot(3, 1) - dot(10, 8)) < 1e-4
  assert abs(dot(3, 1) - dot(3, 2)) > 1e-3
