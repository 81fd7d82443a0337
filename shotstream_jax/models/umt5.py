"""The umT5(-XXL) text encoder in Flax linen, and Wan's post-processing (DESIGN 4.6).

    emb = encode_text(params, config.text, token_ids, lengths)   # [B, text_len, d_model]

umT5 differs from T5 in one structural way: every layer owns its relative-position bias table
(T5 shares the first layer's). Otherwise it is T5.1.1: RMS norms without mean or bias, gated
tanh-GELU FFN, no 1/sqrt(d) attention scaling, no biases. Param names mirror the original Wan file
`models_t5_umt5-xxl-enc-bf16.pth` (`token_embedding`, `blocks.{norm1, attn.{q,k,v,o}, norm2,
ffn.{gate,fc1,fc2}, pos_embedding}`, `norm`), the blocks stacked on a leading layer axis.

Numerics: the residual stream, norms and softmax run in float32; matmuls in `config.dtype`.
(The reference keeps the residual in bf16; ours is at least as accurate.) Params may be stored in
bf16 (the imported XXL is 11 GiB in bf16 and does not fit a 24 GiB host in fp32).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from shotstream_jax.models import common
from shotstream_jax.models.common import dtype_of


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bidirectional T5 bucket of (key - query) for a [length, length] grid (int32 numpy).

  Half the buckets are for keys after the query. Inside each half, distances below
  `num_buckets // 4` get their own bucket and larger ones share log-spaced buckets up to
  `max_distance`. The log bucket is computed in exact integer arithmetic so that distances on a
  bucket edge (16, 32, 64 for the real config) land where the float32 reference puts them.
  """
  half = num_buckets // 2
  exact = half // 2
  span = half - exact

  def bucket(n):
    if n < exact:
      return n
    # Largest k with (max_distance / exact)**(k / span) <= n / exact, i.e.
    # max_distance**k * exact**span <= n**span * exact**k; capped at the last bucket.
    k = 0
    while k + 1 < span and max_distance**(k + 1) * exact**span <= n**span * exact**(k + 1):
      k += 1
    return exact + k

  table = np.array([bucket(n) for n in range(length)], np.int32)
  rel = np.arange(length)[None, :] - np.arange(length)[:, None]
  return np.where(rel > 0, half, 0).astype(np.int32) + table[np.abs(rel)]


def _normal(std):
  return nn.initializers.normal(stddev=std)


class RMSNorm(nn.Module):
  """T5 layer norm: x / rms(x) * scale, no mean subtraction, no bias; float32."""
  eps: float

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones_init(), (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return x * scale.astype(jnp.float32)


class Linear(nn.Module):
  """Bias-free x @ kernel in the compute dtype (kernel [in, out], stored in any dtype)."""
  features: int
  dtype: Any
  std: float = 0.02

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', _normal(self.std), (x.shape[-1], self.features), jnp.float32)
    return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


class UMT5Block(nn.Module):
  """Pre-norm self-attention (with this layer's relative bias) then gated FFN; scanned."""
  cfg: Any

  @nn.compact
  def __call__(self, x, shared):
    cfg = self.cfg
    dt = dtype_of(cfg.dtype, 'text.dtype')
    h = cfg.num_heads
    table = self.param('pos_embedding', _normal((2 * cfg.relative_buckets * h)**-0.5),
                       (cfg.relative_buckets, h), jnp.float32)
    bias = jnp.transpose(table.astype(jnp.float32)[shared['buckets']], (2, 0, 1))[None]
    y = RMSNorm(cfg.eps, name='norm1')(x).astype(dt)
    x = x + _Attention(cfg, name='attn')(y, bias, shared['mask']).astype(jnp.float32)
    y = RMSNorm(cfg.eps, name='norm2')(x).astype(dt)
    x = x + _FeedForward(cfg, name='ffn')(y).astype(jnp.float32)
    return x, None


class _Attention(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, x, bias, mask):
    cfg = self.cfg
    dt = dtype_of(cfg.dtype, 'text.dtype')
    b, t, d = x.shape
    h, dk = cfg.num_heads, cfg.d_kv
    inner = h * dk
    q = Linear(inner, dt, (d * dk)**-0.5, name='q')(x).reshape(b, t, h, dk)
    k = Linear(inner, dt, d**-0.5, name='k')(x).reshape(b, t, h, dk)
    v = Linear(inner, dt, d**-0.5, name='v')(x).reshape(b, t, h, dk)
    # T5 does not scale q.k: the scale is folded into the q init.
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) + bias
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, t, inner)
    return Linear(d, dt, inner**-0.5, name='o')(out)


class _FeedForward(nn.Module):
  """fc2(gelu_tanh(gate(x)) * fc1(x)): the T5.1.1 gated FFN (HF wi_0, wi_1, wo)."""
  cfg: Any

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dt = dtype_of(cfg.dtype, 'text.dtype')
    d = x.shape[-1]
    gate = nn.gelu(Linear(cfg.d_ff, dt, d**-0.5, name='gate')(x), approximate=True)
    y = gate * Linear(cfg.d_ff, dt, d**-0.5, name='fc1')(x)
    return Linear(d, dt, cfg.d_ff**-0.5, name='fc2')(y)


class UMT5Encoder(nn.Module):
  """umT5 encoder stack: token ids [B, L] and a key mask [B, L] -> hidden [B, L, D] (float32).

  Attributes:
    config: the `text` section of configs/shotstream.py.
  """
  config: Any

  @nn.compact
  def __call__(self, token_ids, mask):
    cfg = self.config
    emb = self.param('token_embedding', _normal(1.0), (cfg.vocab_size, cfg.d_model), jnp.float32)
    x = jnp.take(emb, token_ids, axis=0).astype(jnp.float32)
    buckets = relative_position_buckets(token_ids.shape[1], cfg.relative_buckets,
                                        cfg.relative_max_distance)
    shared = dict(buckets=jnp.asarray(buckets), mask=mask.astype(bool))
    blocks = nn.scan(UMT5Block, variable_axes={'params': 0}, split_rngs={'params': True},
                     in_axes=nn.broadcast, length=cfg.num_layers)
    x, _ = blocks(cfg, name='blocks')(x, shared)
    return RMSNorm(cfg.eps, name='norm')(x)


def _check_tokens(token_ids, lengths):
  if token_ids.ndim != 2:
    raise ValueError(f'token_ids: expected [B, L], got shape {tuple(token_ids.shape)}')
  if lengths.shape != token_ids.shape[:1]:
    raise ValueError(f'lengths: expected shape [{token_ids.shape[0]}] (one per row of '
                     f'token_ids), got {tuple(lengths.shape)}')


def encode_text(params, cfg, token_ids, lengths):
  """umT5 embeddings as the DiT consumes them: [B, cfg.text_len, d_model] in `cfg.dtype`.

  Rows are padded with zeros (or truncated) to `text_len`, and every position at or past a row's
  real length (its token count including EOS) is exactly 0, as in the reference, which trims each
  output to its length and zero-pads it back. Pure and jittable; `token_ids` may be shorter than
  `text_len` (outputs at real positions do not depend on the padding).
  """
  token_ids = jnp.asarray(token_ids, jnp.int32)
  lengths = jnp.asarray(lengths, jnp.int32)
  _check_tokens(token_ids, lengths)
  token_ids = token_ids[:, :cfg.text_len]
  lengths = jnp.minimum(lengths, token_ids.shape[1])
  mask = jnp.arange(token_ids.shape[1])[None, :] < lengths[:, None]
  hidden = UMT5Encoder(cfg).apply({'params': params}, token_ids, mask)
  hidden = jnp.where(mask[..., None], hidden, 0.0).astype(dtype_of(cfg.dtype, 'text.dtype'))
  pad = cfg.text_len - hidden.shape[1]
  return jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))) if pad else hidden


def init_params(cfg, key, length: int = 8):
  """Random params (a plain pytree, float32)."""
  ids = jnp.zeros((1, length), jnp.int32)
  return UMT5Encoder(cfg).init(key, ids, jnp.ones((1, length), bool))['params']


def param_shapes(cfg):
  """Parameter ShapeDtypeStructs without allocating anything (works for umT5-XXL)."""
  return jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))


def count_params(cfg) -> int:
  return common.count(param_shapes(cfg))
