"""An optional adversarial term for stages 3-4 (`gan.weight` > 0; the reference has none).

Why: DMD moves the student toward the teacher's distribution, so the student can be no closer
to the data than the teacher's scores let it be. Where the teacher is off the data in a way a
picture shows at once (StoryWorld: backgrounds blended from three palette colours, patterns
that fray), a discriminator that sees real latents beside the student's gives the generator a
signal toward the data itself, as DMD2 (Yin et al., 2024) adds a GAN term to DMD. Here the
discriminator is a separate small conv net on single latent frames, not a head on the critic:
the frames carry the failure (colour and pattern), the critic's DiT stays the plain fake score
(its flow loss unchanged), and a frame net is cheap beside three DiTs.

Both real and generated frames are diffused to the same random noise level in [0, gan.noise]
before the discriminator sees them (instance noise), so their distributions overlap and the
discriminator cannot win by a margin that gives the generator no gradient. Losses are the
non-saturating ones: discriminator softplus(-D(real)) + softplus(D(fake)), generator
softplus(-D(fake)), means over the frames that count (masks).
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from shotstream_jax.training import losses


class FrameDiscriminator(nn.Module):
  """Latent frames [N, h, w, C] -> logits [N] (real > 0): stride-1 then stride-2 3x3 convs."""
  widths: Sequence[int] = (32, 64, 128)

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    for i, width in enumerate(self.widths):
      x = nn.leaky_relu(nn.Conv(width, (3, 3), strides=1 if i == 0 else 2)(x), 0.2)
    return nn.Dense(1)(x.reshape(x.shape[0], -1))[:, 0]


def network(cfg) -> FrameDiscriminator:
  return FrameDiscriminator(tuple(cfg.widths))


def init_params(cfg, key, frame_shape) -> dict:
  """Discriminator params for latent frames of `frame_shape` (h, w, C)."""
  return network(cfg).init(key, jnp.zeros((1,) + tuple(frame_shape), jnp.float32))['params']


def frames(x, mask=None):
  """[B, F, h, w, C] -> ([B F, h, w, C], per-frame mask [B F]); mask [B, F] or None (all)."""
  b, f = x.shape[:2]
  m = jnp.ones((b, f), jnp.float32) if mask is None else jnp.broadcast_to(mask, (b, f))
  return x.reshape((b * f,) + x.shape[2:]), m.reshape(b * f).astype(jnp.float32)


def _logits(cfg, params, x, key):
  """D of x [N, h, w, C] diffused to a random sigma in [0, cfg.noise] per frame."""
  k_s, k_n = jax.random.split(key)
  sigma = cfg.noise * jax.random.uniform(k_s, (x.shape[0],))
  x_t = losses.add_noise(x, jax.random.normal(k_n, x.shape, x.dtype), sigma)
  return network(cfg).apply({'params': params}, x_t)


def _mean(values, mask):
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def discriminator_loss(cfg, params, real, real_mask, fake, fake_mask, key):
  """(loss, metrics) of the discriminator on real and generated frames [N, h, w, C] (fake under
  stop_gradient); metrics: the loss and the shares of real / fake frames it classifies right."""
  k_real, k_fake = jax.random.split(key)
  d_real = _logits(cfg, params, real, k_real)
  d_fake = _logits(cfg, params, jax.lax.stop_gradient(fake), k_fake)
  loss = _mean(jax.nn.softplus(-d_real), real_mask) + _mean(jax.nn.softplus(d_fake), fake_mask)
  return loss, {'disc_loss': loss,
                'disc_real_correct': _mean((d_real > 0).astype(jnp.float32), real_mask),
                'disc_fake_correct': _mean((d_fake < 0).astype(jnp.float32), fake_mask)}


def generator_loss(cfg, params, fake, fake_mask, key):
  """Non-saturating generator loss softplus(-D(fake)) on frames [N, h, w, C]; the gradient
  flows into `fake` only (the discriminator's params are held fixed)."""
  d_fake = _logits(cfg, jax.lax.stop_gradient(params), fake, key)
  return _mean(jax.nn.softplus(-d_fake), fake_mask)
