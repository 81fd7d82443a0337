"""Fixed-shape K/V caches of the streaming student (DESIGN 3, 4.4).

A cache holds every layer's post-RoPE keys and values, `[layers, batch, tokens, heads, head_dim]`,
and an int32 fill length in tokens. Shapes depend only on the config (capacity), never on the
shot index or the prompt, so a whole story runs on one compilation. The global context cache
is filled once per shot by the context prefill; the local cache grows chunk by chunk through
`write` and is reset at every shot.
"""

import flax
import jax
import jax.numpy as jnp

from shotstream_jax.models import attention
from shotstream_jax.models import common


@flax.struct.dataclass
class KVCache:
  k: jax.Array        # [L, B, S, H, Dh]
  v: jax.Array        # [L, B, S, H, Dh]
  length: jax.Array   # int32 []: tokens filled, from the front

  @property
  def capacity(self) -> int:
    return self.k.shape[2]

  def valid(self) -> jax.Array:
    """[B, S] bool: which slots hold keys."""
    b, s = self.k.shape[1:3]
    return jnp.broadcast_to(jnp.arange(s) < self.length, (b, s))

  def segment(self, block: int = 0):
    """The (k, v, valid) triple that `WanDiT(prefix_kv=...)` attends to. block > 0: the
    cache fills in whole blocks of that many tokens from the front (the local cache, chunk by
    chunk), so attention may skip its empty part (`attention.Filled`); else a mask."""
    if block:
      return self.k, self.v, attention.Filled(self.length, block)
    return self.k, self.v, self.valid()


def init_cache(model_cfg, batch: int, tokens: int, dtype=None) -> KVCache:
  """An empty cache with room for `tokens` keys per layer."""
  dtype = dtype or common.dtype_of(model_cfg.dtype)
  shape = (model_cfg.num_layers, batch, tokens, model_cfg.num_heads,
           model_cfg.dim // model_cfg.num_heads)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


def from_kv(kv) -> KVCache:
  """A full cache from a `return_kv` output (k, v) [L, B, T, H, Dh]."""
  k, v = kv
  return KVCache(k, v, jnp.asarray(k.shape[2], jnp.int32))


def write(cache: KVCache, kv, offset) -> KVCache:
  """Write (k, v) [L, B, T, H, Dh] at token `offset` (traced ok); length covers the write."""
  k, v = kv
  offset = jnp.asarray(offset, jnp.int32)
  zero = jnp.zeros((), jnp.int32)
  idx = (zero, zero, offset, zero, zero)
  return KVCache(jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), idx),
                 jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), idx),
                 jnp.maximum(cache.length, offset + k.shape[2]))
