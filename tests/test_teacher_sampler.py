"""Teacher sampler: the 50-step grid and its saved steps, Euler/CFG on analytic velocity
fields, and the ODE pairs of the tiny WanDiT against a hand-written step loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shotstream
from shotstream_jax import context
from shotstream_jax.models import dit
from shotstream_jax.sampling import schedule
from shotstream_jax.sampling import teacher


def test_saved_steps_are_the_warped_student_steps():
  t, sig = teacher.euler_grid(50, 8.0)
  assert t.shape == (50,) and sig.shape == (51,) and sig[-1] == 0.0 and t[0] == 1000.0
  np.testing.assert_allclose(t[list(teacher.SAVE_STEPS)], [1000.0, 957.93, 888.89, 737.59],
                             atol=0.005)
  cfg = shotstream.get_config('wan_1_3b').sampling
  got = teacher.check_save_steps(teacher.SAVE_STEPS, cfg, 50, cfg.shift)
  np.testing.assert_allclose(got, schedule.sampling_schedule(cfg)[0], atol=1e-3)
  with pytest.raises(ValueError, match='teacher.save_steps'):
    teacher.check_save_steps((0, 12, 25, 37), cfg, 50, 8.0)
  with pytest.raises(ValueError, match='teacher.save_steps'):
    teacher.check_save_steps((0, 13, 25, 50), cfg, 50, 8.0)
  with pytest.raises(ValueError, match='teacher.num_steps'):
    teacher.euler_grid(0)


def test_zero_velocity_leaves_x_unchanged():
  noise = jax.random.normal(jax.random.key(0), (2, 3, 4, 6, 16))
  zero = lambda x, t: jnp.zeros_like(x)
  saved, x0 = teacher.euler(zero, noise)
  np.testing.assert_array_equal(x0, noise)
  assert saved.shape == (2, 4, 3, 4, 6, 16)
  for k in range(4):
    np.testing.assert_array_equal(saved[:, k], noise)


def test_straight_flow_is_integrated_exactly():
  """v = eps - x0 constant: Euler lands on x0 and passes x_t = (1 - sigma) x0 + sigma eps."""
  k1, k2 = jax.random.split(jax.random.key(1))
  shape = (1, 3, 4, 6, 16)
  noise, x0 = jax.random.normal(k1, shape), jax.random.normal(k2, shape)
  v = noise - x0
  saved, out = teacher.euler(lambda x, t: v, noise)
  np.testing.assert_allclose(out, x0, atol=2e-5)
  _, sig = teacher.euler_grid(50, 8.0)
  for k, step in enumerate(teacher.SAVE_STEPS):
    np.testing.assert_allclose(saved[:, k], (1 - sig[step]) * x0 + sig[step] * noise, atol=2e-5)


def test_ode_pairs_match_a_hand_written_loop():
  cfg = shotstream.get_config('tiny')
  m = cfg.model
  params = dit.init_params(m, jax.random.key(0))
  params = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(1), x.shape), params)
  rng = np.random.default_rng(0)
  choice = context.choose_context([9, 9], m.context_frames)
  f = 3
  cond = teacher.FrameConcat(
      jnp.asarray(rng.standard_normal((1, 6, 4, 6, 16)), jnp.float32),
      jnp.asarray([list(choice.ctx_shot) + [choice.gen_shot] * f]),
      jnp.asarray([list(choice.ctx_caption) + [choice.gen_caption] * f]))
  text = jnp.asarray(rng.standard_normal((7, 5, m.text_dim)), jnp.float32)
  neg = jnp.asarray(rng.standard_normal((1, 5, m.text_dim)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal((1, f, 4, 6, 16)), jnp.float32)
  steps, save, g = 4, (0, 2), 6.0
  traj, times = jax.jit(lambda p, z: teacher.ode_pairs(
      m, p, z, cond, text, neg, guidance=g, num_steps=steps, save_steps=save))(params, noise)
  assert traj.shape == (1, 3, f, 4, 6, 16)
  ts, sig = teacher.euler_grid(steps, 8.0)
  np.testing.assert_allclose(times, [ts[0], ts[2], 0.0], rtol=1e-6)

  model = dit.WanDiT(m)
  x, saved = noise, []
  for i in range(steps):
    if i in save:
      saved.append(x)
    lat = jnp.concatenate([cond.ctx_latents, x], axis=1)
    tt = jnp.full((1, 6 + f), ts[i], jnp.float32)
    vc = model.apply({'params': params}, lat, tt, text, frame_shot=cond.frame_shot,
                     frame_caption=cond.frame_caption)[:, 6:]
    vu = model.apply({'params': params}, lat, tt, neg, frame_shot=cond.frame_shot,
                     frame_caption=jnp.zeros_like(cond.frame_caption))[:, 6:]
    x = x + (sig[i + 1] - sig[i]) * (vu + g * (vc - vu))
  for k in range(2):
    np.testing.assert_allclose(traj[:, k], saved[k], atol=1e-4)
  np.testing.assert_allclose(traj[:, -1], x, atol=1e-4)
  np.testing.assert_array_equal(traj[:, 0], noise)


def test_teacher_sampler_in_the_pipeline_is_ode_pairs():
  """The pipeline's teacher shot (caption-table K/V, zero uncond rows) equals ode_pairs' x0 on
  the raw rows with the same noise; a 2-shot story runs through it without streaming."""
  from shotstream_jax import pipeline  # pylint: disable=g-import-not-at-top
  cfg = shotstream.get_config('tiny')
  m = cfg.model
  params = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(1), x.shape),
                        dit.init_params(m, jax.random.key(0)))
  base = pipeline.ShotStreamPipeline.from_random(cfg, seed=0)
  uncond = np.zeros((m.text_len, m.text_dim), np.float32)
  sampler = teacher.TeacherSampler(m, cfg.sampling, base.latent_hw, uncond, guidance=3.0,
                                   num_steps=4)
  pipe = pipeline.ShotStreamPipeline(cfg, params, base.vae_params, base.prompt_encoder, sampler)
  assert not pipe.streams
  session = pipe.session('A harbour. ', seed=0)
  plan = session._plan('boats at dawn')      # pylint: disable=protected-access
  key = jax.random.key(7)
  got = pipe._shot(params, plan, key)        # pylint: disable=protected-access
  f = cfg.sampling.shot_latent_frames
  cond = teacher.FrameConcat(
      plan.ctx_latents, jnp.concatenate([plan.ctx_shot, jnp.repeat(plan.gen_shot[:, None], f, 1)], 1),
      jnp.concatenate([plan.ctx_caption, jnp.repeat(plan.gen_caption[:, None], f, 1)], 1))
  rows = base.prompt_encoder(['A harbour. shot0:boats at dawn'] * (m.context_frames + 1))
  noise = jax.random.normal(key, got.shape, jnp.float32)
  traj, _ = teacher.ode_pairs(m, params, noise, cond, rows, jnp.asarray(uncond)[None],
                              guidance=3.0, num_steps=4, save_steps=())
  np.testing.assert_allclose(got, traj[:, -1], atol=2e-4)
  video = pipe.generate(['boats at dawn', 'a gull lands'], seed=0)
  assert video.shape[0] == 2 * pipe.frames_per_shot


def test_guidance_is_uncond_plus_g_times_the_difference_of_two_separate_calls():
  """guided_velocity_fn at guidance g equals `v_u + g (v_c - v_u)` of two separate
  `frameconcat_velocity` calls (cond routing, then every frame on the 1-row uncond table); at
  g = 1 it runs the conditional rows alone and equals the conditional call."""
  m = shotstream.get_config('tiny').model
  params = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(1), x.shape),
                        dit.init_params(m, jax.random.key(0)))
  b, c, f = 2, m.context_frames, 3
  ks = jax.random.split(jax.random.key(2), 4)
  cond = teacher.FrameConcat(jax.random.normal(ks[0], (b, c, 4, 6, m.in_channels)),
                             jnp.tile(jnp.arange(c + f) // 3, (b, 1)),
                             jnp.tile(jnp.arange(c + f) % 2, (b, 1)))
  text = jax.random.normal(ks[1], (2, 5, m.text_dim))
  uncond = jax.random.normal(ks[3], (1, 5, m.text_dim))
  x = jax.random.normal(ks[2], (b, f, 4, 6, m.in_channels))
  t = jnp.array([900.0, 300.0])
  v_c = teacher.frameconcat_velocity(m, params, cond, x, t, text)
  v_u = teacher.frameconcat_velocity(m, params, teacher.uncond_routing(cond), x, t, uncond)
  assert np.abs(np.asarray(v_u - v_c)).max() > 1e-3     # the halves differ: the test can fail
  for g in (0.0, 1.0, 2.5, 6.0):
    got = teacher.guided_velocity_fn(m, params, cond, text, uncond, guidance=g)(x, t)
    np.testing.assert_allclose(got, v_u + g * (v_c - v_u), atol=1e-4 * max(1.0, g))
  only_c = teacher.guided_velocity_fn(m, params, cond, text, uncond, guidance=1.0)(x, t)
  np.testing.assert_array_equal(only_c, v_c)            # one B-row call, the same program
