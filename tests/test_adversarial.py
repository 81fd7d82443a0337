"""The optional GAN term of stages 3-4 (training/adversarial.py): the discriminator loss against
its softplus formula with masks, a discriminator that learns to tell two frame distributions
apart, and a generator gradient that then points the fake frames toward the real ones."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from shotstream_jax.training import adversarial

HW_C = (8, 8, 4)


def _cfg(noise=0.0):
  return ml_collections.ConfigDict(dict(widths=(8, 16), noise=noise))


def _frames(seed, mean, n=16):
  return mean + 0.3 * jax.random.normal(jax.random.key(seed), (n,) + HW_C)


def test_discriminator_loss_is_masked_softplus():
  cfg = _cfg()
  params = adversarial.init_params(cfg, jax.random.key(0), HW_C)
  real, fake = _frames(1, 0.5, 6), _frames(2, -0.5, 6)
  real_mask = jnp.array([1, 1, 1, 0, 0, 1], jnp.float32)
  fake_mask = jnp.array([0, 1, 1, 1, 1, 1], jnp.float32)
  loss, m = adversarial.discriminator_loss(cfg, params, real, real_mask, fake, fake_mask,
                                           jax.random.key(3))
  d = lambda x: np.asarray(adversarial.network(cfg).apply({'params': params}, x), np.float64)
  sp = lambda z: np.log1p(np.exp(z))
  want = (np.sum(sp(-d(real)) * real_mask) / 4 + np.sum(sp(d(fake)) * fake_mask) / 5)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)   # noise 0: D sees the frames
  assert float(m['disc_loss']) == float(loss)
  assert 0 <= float(m['disc_real_correct']) <= 1


def test_discriminator_learns_and_generator_gradient_points_to_real():
  cfg = _cfg(noise=0.3)
  params = adversarial.init_params(cfg, jax.random.key(0), HW_C)
  real, fake = _frames(1, 0.5), _frames(2, -0.5)
  ones = jnp.ones(real.shape[0])
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, key):
    (loss, m), g = jax.value_and_grad(adversarial.discriminator_loss, argnums=1, has_aux=True)(
        cfg, params, real, ones, fake, ones, key)
    updates, opt = tx.update(g, opt)
    return optax.apply_updates(params, updates), opt, loss, m

  first = None
  for i in range(60):
    params, opt, loss, m = step(params, opt, jax.random.key(i))
    first = float(loss) if first is None else first
  assert float(loss) < 0.5 * first
  assert float(m['disc_real_correct']) == 1.0 and float(m['disc_fake_correct']) == 1.0
  g = jax.grad(lambda x: adversarial.generator_loss(cfg, params, x, ones, jax.random.key(9)))(
      fake)
  # Descending the generator's loss moves the fake frames toward the real ones.
  assert float(jnp.sum(-g * (real.mean(0) - fake))) > 0
  # Its gradient reaches the frames only: the discriminator's params are held fixed.
  gp = jax.grad(lambda p: adversarial.generator_loss(cfg, p, fake, ones, jax.random.key(9)))(
      params)
  assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(gp))
