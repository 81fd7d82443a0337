"""Attention kernels and the student's block-causal frame mask (DESIGN 3, 4.4)."""

import jax
import jax.numpy as jnp
import numpy as np

ATTENTION_IMPLS = ('xla', 'cudnn')
ATTENTION_MODES = ('bidirectional', 'block_causal')


def dot_product_attention(q, k, v, mask=None, implementation: str = 'xla'):
  """Softmax attention, q [B, T, H, D], k/v [B, S, H, D], mask broadcastable to [B, H, T, S].

  `implementation` is the config's `model.attention`: 'xla' runs everywhere, 'cudnn' needs a GPU.
  """
  if implementation not in ATTENTION_IMPLS:
    raise ValueError(f'model.attention: unknown implementation {implementation!r}; '
                     f'accepted: {", ".join(ATTENTION_IMPLS)}')
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def frame_blocks(num_frames: int, chunk_frames: int, context_frames: int) -> np.ndarray:
  """Block id of each latent frame: 0 for the leading context frames, 1 + chunk index after.

  Frames past the context are grouped into chunks of `chunk_frames`; a trailing partial chunk is
  its own block.
  """
  if chunk_frames < 1:
    raise ValueError(f'model.chunk_frames: must be >= 1, got {chunk_frames}')
  if not 0 <= context_frames <= num_frames:
    raise ValueError(f'context_frames: must be in [0, {num_frames}] (the number of latent '
                     f'frames), got {context_frames}')
  f = np.arange(num_frames)
  return np.where(f < context_frames, 0, 1 + (f - context_frames) // chunk_frames)


def block_causal_mask(num_frames: int, tokens_per_frame: int, chunk_frames: int,
                      context_frames: int) -> jnp.ndarray:
  """Boolean token mask [1, 1, T, T]: a query sees keys whose block id is <= its own.

  Context frames see only context frames; chunk b sees the context and chunks 0..b, and is
  bidirectional inside itself (DESIGN 4.4).
  """
  blocks = np.repeat(frame_blocks(num_frames, chunk_frames, context_frames), tokens_per_frame)
  return jnp.asarray(blocks[None, :] <= blocks[:, None])[None, None]
