"""Stage 2-4 losses: the DMD gradient against its analytic formula, reductions, score
timesteps, the critic flow loss and the ODE-regression loss against hand-written versions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shotstream
from shotstream_jax import context
from shotstream_jax.models import dit
from shotstream_jax.sampling import schedule
from shotstream_jax.sampling import teacher
from shotstream_jax.training import losses

F = 3


def _params(m, seed):
  p = dit.init_params(m, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def _inputs(m, f=F, seed=0):
  rng = np.random.default_rng(seed)
  choice = context.choose_context([9, 9], m.context_frames)
  cond = teacher.FrameConcat(
      jnp.asarray(rng.standard_normal((1, 6, 4, 6, 16)), jnp.float32),
      jnp.asarray([list(choice.ctx_shot) + [choice.gen_shot] * f]),
      jnp.asarray([list(choice.ctx_caption) + [choice.gen_caption] * f]))
  text = jnp.asarray(rng.standard_normal((7, 5, m.text_dim)), jnp.float32)
  neg = jnp.asarray(rng.standard_normal((1, 5, m.text_dim)), jnp.float32)
  return cond, text, neg


def test_dmd_loss_gradient_is_the_normalised_score_difference():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (2, 3, 4, 6, 16))
  real, fake = jax.random.normal(k2, x.shape), jax.random.normal(k3, x.shape)
  grad = losses.dmd_direction(x, real, fake)
  g = jax.grad(lambda y: losses.dmd_loss(y, grad))(x)
  xn, rn, fn = (np.asarray(a, np.float64) for a in (x, real, fake))
  norm = np.abs(xn - rn).mean(axis=(1, 2, 3, 4), keepdims=True)   # per sample
  np.testing.assert_allclose(g, (fn - rn) / norm / x.size, rtol=1e-5, atol=1e-9)
  # Reduction: a mean (not a sum) over all elements, times 0.5.
  np.testing.assert_allclose(losses.dmd_loss(x, grad), 0.5 * np.mean(((fn - rn) / norm) ** 2),
                             rtol=1e-5)
  mask = jnp.asarray([[True, False, True], [False, False, True]])
  gm = jax.grad(lambda y: losses.dmd_loss(y, grad, mask))(x)
  count = 3 * 4 * 6 * 16
  np.testing.assert_allclose(gm, np.asarray(grad) * np.asarray(mask)[..., None, None, None] / count,
                             rtol=1e-5, atol=1e-9)


def test_generator_dmd_gradient_matches_the_formula_with_real_networks():
  """d loss / d x of the full generator loss == (fake_x0 - real_x0) / mean|x - real_x0| / N with
  real_x0 from the teacher at cond + 3 (cond - uncond) and fake_x0 from the critic."""
  m = shotstream.get_config('tiny').model
  teacher_p, critic_p = _params(m, 0), _params(m, 10)
  cond, text, neg = _inputs(m)
  x = jax.random.normal(jax.random.key(3), (1, F, 4, 6, 16))
  key = jax.random.key(4)
  sc = losses.ScoreConfig()
  fn = jax.jit(jax.grad(lambda y: losses.generator_dmd_loss(m, y, teacher_p, critic_p, cond,
                                                            text, neg, key, sc)[0]))
  g = np.asarray(fn(x), np.float64)

  k_t, k_n = jax.random.split(key)
  t = losses.score_timesteps(k_t, 1, sc)
  sigma = float(t[0]) / 1000
  x_t = (1 - sigma) * x + sigma * jax.random.normal(k_n, x.shape)
  apply = jax.jit(dit.WanDiT(m).apply)

  def v(p, text_rows, caption):
    lat = jnp.concatenate([cond.ctx_latents, x_t], axis=1)
    return np.asarray(apply({'params': p}, lat, jnp.full((1, 6 + F), t[0]), text_rows,
                                  frame_shot=cond.frame_shot, frame_caption=caption)[:, 6:],
                      np.float64)

  vc, vu = v(teacher_p, text, cond.frame_caption), v(teacher_p, neg, 0 * cond.frame_caption)
  x_t64 = np.asarray(x_t, np.float64)
  real = x_t64 - sigma * (vc + 3.0 * (vc - vu))
  fake = x_t64 - sigma * v(critic_p, text, cond.frame_caption)
  norm = np.mean(np.abs(np.asarray(x, np.float64) - real))
  expected = (fake - real) / norm / x.size
  np.testing.assert_allclose(g, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
  # Frozen networks: no gradient reaches teacher or critic params through the generator loss.
  gp = jax.jit(jax.grad(lambda p: losses.generator_dmd_loss(m, x, teacher_p, p, cond, text, neg,
                                                            key, sc)[0]))(critic_p)
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(gp))


def test_score_timesteps_on_grid_and_clamped():
  sc = losses.ScoreConfig()
  t = np.asarray(losses.score_timesteps(jax.random.key(0), 20000, sc))
  assert t.min() == 20.0 and t.max() == 980.0
  grid = schedule.shifted_grid(1000, 8.0) * 1000
  inside = t[(t > 20) & (t < 980)]
  assert np.all(np.min(np.abs(inside[:, None] - grid[None].astype(np.float32)), axis=1) < 1e-3)
  # sigma >= 0.98 <=> s >= 0.98 / 1.14 on the shift-8 grid: about 14% of draws clamp to 980.
  assert 0.12 < np.mean(t == 980.0) < 0.16


def test_cfg_combine_forms():
  c, u = jnp.asarray(2.0), jnp.asarray(0.5)
  assert float(teacher.cfg_combine(c, u, 6.0)) == 0.5 + 6 * 1.5          # teacher sampler
  assert float(teacher.cfg_combine(c, u, 1 + 3.0)) == 2.0 + 3 * 1.5      # DMD real score


def test_critic_flow_loss_matches_hand_written_and_trains_only_the_critic():
  m = shotstream.get_config('tiny').model
  critic_p = _params(m, 20)
  cond, text, _ = _inputs(m)
  x = jax.random.normal(jax.random.key(5), (1, F, 4, 6, 16))
  key = jax.random.key(6)
  loss, _ = losses.critic_flow_loss(m, critic_p, x, cond, text, key)
  k_t, k_n = jax.random.split(key)
  t = losses.score_timesteps(k_t, 1)
  noise = jax.random.normal(k_n, x.shape)
  x_t = losses.add_noise(x, noise, t / 1000)
  v = teacher.frameconcat_velocity(m, critic_p, cond, x_t, t, text)
  np.testing.assert_allclose(loss, np.mean((np.asarray(v) - np.asarray(noise - x)) ** 2),
                             rtol=1e-5)
  gx = jax.jit(jax.grad(lambda y: losses.critic_flow_loss(m, critic_p, y, cond, text, key)[0]))(x)
  assert not np.any(gx)


def test_ode_regression_loss_matches_hand_written():
  cfg = shotstream.get_config('tiny')
  m = cfg.model
  student = _params(m, 30)
  f = 6
  cond, text, _ = _inputs(m, f)
  times = np.asarray([1000.0, 957.93, 888.89, 737.59, 0.0], np.float32)
  traj = jax.random.normal(jax.random.key(7), (1, 5, f, 4, 6, 16))
  key = jax.random.key(11)
  loss, metrics = losses.ode_regression_loss(m, student, traj, times, cond, text, key)

  idx = np.repeat(np.asarray(jax.random.randint(key, (1, 2), 0, 5)), 3, axis=1)[0]
  noisy = jnp.stack([traj[0, idx[i], i] for i in range(f)])[None]
  t = times[idx]
  lat = jnp.concatenate([cond.ctx_latents, noisy], axis=1)
  v = dit.WanDiT(m).apply({'params': student}, lat, jnp.concatenate([jnp.zeros(6), t])[None],
                          text, frame_shot=cond.frame_shot, frame_caption=cond.frame_caption,
                          attention='block_causal', chunk_frames=3, context_frames=6)[:, 6:]
  x0 = np.asarray(noisy - (t / 1000)[None, :, None, None, None] * v)
  err = (x0 - np.asarray(traj[:, -1])) ** 2
  keep = t > 0
  expected = err[:, keep].mean() if keep.any() else 0.0
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert float(metrics['ode_frames_with_loss']) == keep.sum()
  with pytest.raises(ValueError, match='model.chunk_frames'):
    losses.ode_regression_loss(m, student, traj[:, :, :4], times, cond, text, key)
