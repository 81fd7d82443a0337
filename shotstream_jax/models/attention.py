"""Attention kernels and the student's block-causal frame mask (DESIGN 3, 4.4)."""

import functools

import flax
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


@flax.struct.dataclass
class Filled:
  """Validity of a cache segment filled from the front in whole blocks: its first `length`
  slots (traced int32, a multiple of `block`) hold keys. Where a mask would make every query
  score the whole capacity and discard the empty part, `prefix_attention` attends to the
  filled part only: one branch per possible block count, chosen by `lax.switch` (shapes stay
  fixed, one compilation), so a chunk's cost grows with the filled cache, not its capacity."""
  length: jax.Array
  block: int = flax.struct.field(pytree_node=False)


def prefix_attention(q, k, v, mask, prefix_kv, prefix_valid, implementation: str = 'xla'):
  """Attention of q over [prefix segment 0 | segment 1 | ... | own k, v].

  prefix_kv: (k, v) [B, P_i, H, D] per segment; prefix_valid: per segment a bool mask [B, P_i],
  None (every slot holds a key: no mask at all) or `Filled` (at most one segment). `mask`: the
  own keys' [B or 1, 1, T, T] mask or None. The result equals masked attention over the whole
  concatenation (softmax gives masked keys weight 0) up to float summation order.
  """
  filled = [i for i, valid in enumerate(prefix_valid) if isinstance(valid, Filled)]
  if len(filled) > 1:
    raise ValueError('prefix_kv: at most one segment may be Filled')

  def attend(segments, valids):
    keys = jnp.concatenate([pk for pk, _ in segments] + [k], axis=1)
    values = jnp.concatenate([pv for _, pv in segments] + [v], axis=1)
    if mask is None and all(valid is None for valid in valids):
      return dot_product_attention(q, keys, values, None, implementation)
    b, t = q.shape[:2]
    parts = [jnp.ones((b, 1, t, pk.shape[1]), bool) if valid is None else
             jnp.broadcast_to(valid[:, None, None, :], (b, 1, t, valid.shape[-1]))
             for (pk, _), valid in zip(segments, valids)]
    parts.append(jnp.ones((b, 1, t, t), bool) if mask is None else
                 jnp.broadcast_to(mask, (b, 1, t, t)))
    return dot_product_attention(q, keys, values, jnp.concatenate(parts, axis=-1),
                                 implementation)

  if not filled:
    return attend(prefix_kv, prefix_valid)
  i = filled[0]
  spec = prefix_valid[i]
  capacity = prefix_kv[i][0].shape[1]
  if capacity % spec.block:
    raise ValueError(f'prefix_kv: capacity {capacity} is not a multiple of the block {spec.block}')

  def branch(blocks):
    n = blocks * spec.block
    segments = list(prefix_kv)
    segments[i] = (prefix_kv[i][0][:, :n], prefix_kv[i][1][:, :n])
    valids = list(prefix_valid)
    valids[i] = None
    return attend([seg for seg in segments if seg[0].shape[1]],
                  [val for seg, val in zip(segments, valids) if seg[0].shape[1]])

  count = jnp.clip(spec.length // spec.block, 0, capacity // spec.block)
  return jax.lax.switch(count, [functools.partial(branch, n)
                                for n in range(capacity // spec.block + 1)])


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
