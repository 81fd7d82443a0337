"""Attention kernels and the student's block-causal frame mask (DESIGN 3, 4.4).

`model.attention` picks the kernel of every attention call:
  * 'xla': `jax.nn.dot_product_attention`'s XLA path, the reference, runs everywhere;
  * 'cudnn': the same call with cuDNN's fused kernel (GPU only);
  * 'splash': the Pallas splash-attention kernel of `jax.experimental.pallas.ops.tpu` (TPU
    only; shipped with the pinned jax): an online-softmax kernel that never writes the
    [T, S] score matrix to memory, which XLA's path does on TPU;
  * 'splash_interpret': the same kernel run by the Pallas interpreter, on any backend: how
    the splash path is checked against 'xla' on a CPU (slow: tests only).

Under a device mesh XLA cannot partition a Mosaic kernel ("Mosaic kernels cannot be
automatically partitioned"), so the splash call runs in a `shard_map` over the ambient mesh
(`jax.sharding.use_abstract_mesh`, set by the training loop and the sharded story generator):
the batch split over the mesh's batch axes and the heads over its heads axis wherever they
divide (mesh_axes.py), replicated otherwise.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from shotstream_jax import mesh_axes

ATTENTION_IMPLS = ('xla', 'cudnn', 'splash', 'splash_interpret')
ATTENTION_MODES = ('bidirectional', 'block_causal')
# Splash tiles: the query and key axes are padded to a multiple of this (the kernel's default
# tile, a multiple of the TPU's 128 lanes); padded keys are excluded through segment ids.
SPLASH_BLOCK = 128


def dot_product_attention(q, k, v, mask=None, implementation: str = 'xla', key_valid=None):
  """Softmax attention, q [B, T, H, D], k/v [B, S, H, D].

  mask: None, a `BlockCausal` or a bool array broadcastable to [B, H, T, S]; key_valid: None
  or bool [B, S],
  the keys each example may attend to (anded with `mask`). `implementation` is the config's
  `model.attention` (module docstring). The splash kernels take the mask as a static pattern:
  a numpy array with batch and head axes of size 1 (the block-causal mask is one); per-example
  validity goes through `key_valid` (their key segment ids).
  """
  if implementation not in ATTENTION_IMPLS:
    raise ValueError(f'model.attention: unknown implementation {implementation!r}; '
                     f'accepted: {", ".join(ATTENTION_IMPLS)}')
  mask = materialise(mask, implementation)
  if implementation.startswith('splash'):
    return splash_attention(q, k, v, mask, key_valid,
                            interpret=implementation == 'splash_interpret')
  if key_valid is not None:
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    valid = jnp.broadcast_to(key_valid[:, None, None, :], (b, 1, t, s))
    mask = valid if mask is None else jnp.logical_and(mask, valid)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def _round_up(n: int, block: int) -> int:
  return -(-n // block) * block


def _splash_kernel(heads: int, t: int, s: int, mask, interpret: bool):
  """The splash kernel for padded lengths (t, s) and a static [t, s] pattern (None: full)."""
  if mask is None:
    head_mask = splash_mask.FullMask((t, s))
  else:
    head_mask = splash_mask.NumpyMask(mask)
  return splash.make_splash_mha(splash_mask.MultiHeadMask([head_mask] * heads), head_shards=1,
                                q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, mask=None, key_valid=None, interpret: bool = False):
  """`dot_product_attention` through the splash kernel (its arguments, same result).

  Both sequence axes are padded to SPLASH_BLOCK; the kernel sees query segment id 1 everywhere
  (padded queries attend to real keys, so no row is empty, and are dropped) and key segment
  id 1 for valid keys, 0 for padding and for keys `key_valid` excludes. q is pre-scaled by
  1/sqrt(D): the kernel applies no scale.
  """
  b, t, heads, d = q.shape
  s = k.shape[1]
  tp, sp = _round_up(t, SPLASH_BLOCK), _round_up(s, SPLASH_BLOCK)
  pattern = None
  if mask is not None:
    if isinstance(mask, jax.Array) or np.ndim(mask) < 2 or \
       any(n != 1 for n in np.shape(mask)[:-2]):
      raise ValueError('model.attention: the splash kernels take a static numpy mask with batch '
                       'and head axes of size 1 (per-example validity goes through key_valid); '
                       f'got {type(mask).__name__} of shape {np.shape(mask)}')
    pattern = np.zeros((tp, sp), bool)
    pattern[:t, :s] = np.broadcast_to(np.asarray(mask, bool).reshape(np.shape(mask)[-2:]),
                                     (t, s))
    pattern[t:, :s] = True        # padded queries: any real key (their rows are dropped)
    if not pattern[:t, :s].any(axis=1).all():
      raise ValueError('mask: a query row with no key to attend to')

  def heads_first(x, n):  # [B, L, H, D] -> [B, H, n, D], zero-padded
    return jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

  def attend(qq, kk, vv, seg_q, seg_kv):   # one device's examples and heads
    kernel = _splash_kernel(qq.shape[1], tp, sp, pattern, interpret)
    return jax.vmap(lambda *a: kernel(*a[:3], segment_ids=splash.SegmentIds(*a[3:])))(
        qq, kk, vv, seg_q, seg_kv)

  valid = jnp.ones((b, s), bool) if key_valid is None else jnp.broadcast_to(key_valid, (b, s))
  args = (heads_first(q * jnp.asarray(d ** -0.5, q.dtype), tp), heads_first(k, sp),
          heads_first(v, sp), jnp.ones((b, tp), jnp.int32),
          jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, sp - s))))
  split = _mesh_split(b, heads)
  if split is not None:
    mesh, batch, head = split
    x, seg = P(batch, head), P(batch)
    attend = jax.shard_map(attend, mesh=mesh, in_specs=(x, x, x, seg, seg), out_specs=x,
                           check_vma=False)
  return attend(*args).transpose(0, 2, 1, 3)[:, :t].astype(q.dtype)


def _mesh_split(batch: int, heads: int):
  """(ambient mesh, batch axes or None, heads axis or None) for the splash shard_map, or None
  without a mesh: an axis splits only where its size divides the dimension."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  size = dict(zip(mesh.axis_names, mesh.axis_sizes))
  axes = tuple(a for a in mesh_axes.BATCH_AXES if size.get(a, 1) > 1)
  if batch % int(np.prod([size[a] for a in axes])):
    axes = ()
  n = size.get(mesh_axes.HEADS_AXIS, 1)
  head = mesh_axes.HEADS_AXIS if n > 1 and heads % n == 0 else None
  return mesh, (axes or None), head


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
    t = q.shape[1]
    own = None if mask is None else _own_pattern(materialise(mask, implementation),
                                                 [pk.shape[1] for pk, _ in segments], t)
    if all(valid is None for valid in valids):
      return dot_product_attention(q, keys, values, own, implementation)
    b = q.shape[0]
    key_valid = jnp.concatenate(
        [jnp.broadcast_to(True if valid is None else valid, (b, pk.shape[1]))
         for (pk, _), valid in zip(segments, valids)] + [jnp.ones((b, t), bool)], axis=1)
    return dot_product_attention(q, keys, values, own, implementation, key_valid=key_valid)

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


def _own_pattern(mask, prefix_lengths, t: int):
  """The own keys' mask [.., T, T] behind prefix segments every query sees: [.., T, P + T]
  (numpy stays numpy, so the splash kernels can take it as their static pattern)."""
  xp = np if isinstance(mask, np.ndarray) else jnp
  lead = np.shape(mask)[:-2]
  return xp.concatenate([xp.ones(lead + (t, sum(prefix_lengths)), bool),
                         xp.broadcast_to(mask, lead + (t, t))], axis=-1)


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


@flax.struct.dataclass
class BlockCausal:
  """The block-causal token mask of `block_causal_mask`, as its description only.

  Why not the array: the DiT hands its mask to every block through the layer scan, and a scan
  turns an array it broadcasts into a traced value. The splash kernels need the pattern as a
  static numpy array, so the student's whole-sequence forward (the ODE stage, block-causal
  over [context | chunks]) could not use them, and XLA got a [T, T] constant (1.8 GB at
  wan_1_3b's 42120 tokens). This object has no array leaves, so it crosses the scan as static
  structure; `materialise` turns it into the numpy pattern for splash and into two iotas'
  comparison, built inside the program, for XLA."""
  num_frames: int = flax.struct.field(pytree_node=False)
  tokens_per_frame: int = flax.struct.field(pytree_node=False)
  chunk_frames: int = flax.struct.field(pytree_node=False)
  context_frames: int = flax.struct.field(pytree_node=False)

  def pattern(self, xp=np):
    """The bool mask [1, 1, T, T], built with `xp` (numpy: a static array; jax.numpy: a
    comparison inside the program)."""
    blocks = xp.asarray(np.repeat(frame_blocks(self.num_frames, self.chunk_frames,
                                               self.context_frames), self.tokens_per_frame))
    return (blocks[None, :] <= blocks[:, None])[None, None]


def materialise(mask, implementation: str):
  """A `BlockCausal` as the mask `implementation` takes ([1, 1, T, T]: numpy for the splash
  kernels' static pattern, a traced comparison for XLA / cuDNN); anything else unchanged."""
  if not isinstance(mask, BlockCausal):
    return mask
  return mask.pattern(np if implementation.startswith('splash') else jnp)


def block_causal_mask(num_frames: int, tokens_per_frame: int, chunk_frames: int,
                      context_frames: int) -> np.ndarray:
  """Boolean token mask [1, 1, T, T]: a query sees keys whose block id is <= its own.

  Context frames see only context frames; chunk b sees the context and chunks 0..b, and is
  bidirectional inside itself (DESIGN 4.4).
  """
  return BlockCausal(num_frames, tokens_per_frame, chunk_frames, context_frames).pattern(np)
