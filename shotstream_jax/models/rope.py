"""3D rotary position embedding of Wan, with ShotStream's shot discontinuity (DESIGN 4.2).

A head of size `d` holds d/2 rotation pairs split time / height / width as
`[d/2 - 2*(d/2//3), d/2//3, d/2//3]` (22 / 21 / 21 for d = 128). Each axis has its own
frequencies `base**(-2i/d_axis)` where `d_axis` is twice its pair count. Pairs are interleaved:
channels (2i, 2i+1) rotate together.

The temporal angle of pair i for a frame with position p and shot id s is

    (p + position_gap * s) * w_i + theta * s

`theta` is the reference's per-shot phase (1/6 rad); `position_gap` inserts extra temporal
positions at every shot boundary. Height and width angles are plain `pos * w`.
"""

from typing import Tuple

import jax.numpy as jnp
import numpy as np


def rope_split(head_dim: int) -> Tuple[int, int, int]:
  """Number of rotation pairs for (time, height, width)."""
  if head_dim % 2:
    raise ValueError(f'model.num_heads: head_dim must be even for RoPE, got {head_dim}')
  pairs = head_dim // 2
  hw = pairs // 3
  return pairs - 2 * hw, hw, hw


def axis_frequencies(pairs: int, base: float) -> np.ndarray:
  """`base**(-2i/(2*pairs))` for i < pairs, in float64 (cast at use)."""
  return base ** (-np.arange(pairs, dtype=np.float64) * 2.0 / (2 * pairs))


def rope_angles(frame_pos, frame_shot, height: int, width: int, head_dim: int, *,
                base: float = 10000.0, theta: float = 0.0, position_gap: int = 0):
  """Angles [B, F*height*width, head_dim/2] (float32) for tokens laid out (frame, h, w).

  Args:
    frame_pos: int [B, F] temporal position of each latent frame.
    frame_shot: int [B, F] shot id of each latent frame.
    height, width: token grid after patching (static).
  """
  t_pairs, h_pairs, w_pairs = rope_split(head_dim)
  wt = jnp.asarray(axis_frequencies(t_pairs, base), jnp.float32)
  pos = (frame_pos + position_gap * frame_shot).astype(jnp.float32)
  ang_t = pos[..., None] * wt + jnp.float32(theta) * frame_shot.astype(jnp.float32)[..., None]
  # Height/width positions are static: compute their angles exactly in float64 numpy.
  ang_h = np.arange(height)[:, None] * axis_frequencies(h_pairs, base)
  ang_w = np.arange(width)[:, None] * axis_frequencies(w_pairs, base)
  ang_hw = np.concatenate([
      np.broadcast_to(ang_h[:, None, :], (height, width, h_pairs)),
      np.broadcast_to(ang_w[None, :, :], (height, width, w_pairs))], axis=-1)
  ang_hw = jnp.asarray(ang_hw.reshape(height * width, h_pairs + w_pairs), jnp.float32)
  b, f = frame_pos.shape
  ang_t = jnp.broadcast_to(ang_t[:, :, None, :], (b, f, height * width, t_pairs))
  ang_hw = jnp.broadcast_to(ang_hw[None, None], (b, f, height * width, h_pairs + w_pairs))
  return jnp.concatenate([ang_t, ang_hw], axis=-1).reshape(b, f * height * width, -1)


def apply_rope(x, angles):
  """Rotate interleaved pairs of x [B, T, H, D] by angles [B, T, D/2]; float32 math."""
  dtype = x.dtype
  x = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = x[..., 0], x[..., 1]
  out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.reshape(*out.shape[:-2], -1).astype(dtype)
