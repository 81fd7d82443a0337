"""Self-forcing rollout: equals inference at the last exit step, gradient only through the exit
forward, zero gradient through the history path; stage 4 equals the story session."""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shotstream
from shotstream_jax import context
from shotstream_jax import pipeline as pipeline_lib
from shotstream_jax.data import prompts as prompts_lib
from shotstream_jax.models import dit
from shotstream_jax.sampling import causal
from shotstream_jax.sampling import schedule
from shotstream_jax.training import rollout

sys.path.insert(0, os.path.dirname(__file__))
import model_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position

HW = (4, 6)


@functools.lru_cache(maxsize=None)
def _setup(local_frames=None):
  cfg = shotstream.get_config('tiny')      # 6 latent frames per shot = 2 chunks of 3
  if local_frames:
    cfg.sampling.local_frames = local_frames
  m = cfg.model
  sampler = causal.CausalSampler(m, cfg.sampling, HW)
  params = model_fixtures.random_dit(m)
  choice = context.choose_context([9, 9], m.context_frames)
  rng = np.random.default_rng(0)
  rows = jnp.asarray(rng.standard_normal((m.context_frames + 1, 5, m.text_dim)), jnp.float32)
  plan = causal.ShotPlan(
      jnp.asarray(rng.standard_normal((1, 6) + HW + (16,)), jnp.float32),
      jnp.asarray([choice.ctx_shot]), jnp.asarray([choice.ctx_caption]),
      jnp.asarray([choice.gen_shot]), jnp.asarray([choice.gen_caption]),
      dit.WanTextKV(m).apply({'params': params}, rows))
  return cfg, sampler, params, plan


def _weights(sampler):
  shape = (1, sampler.num_chunks * sampler.chunk_frames) + HW + (16,)
  return jax.random.normal(jax.random.key(42), shape)


def test_last_exit_step_equals_inference():
  _, sampler, params, plan = _setup()
  key = jax.random.key(7)
  want = jax.jit(sampler.shot)(params, plan, key)
  got = jax.jit(rollout.rollout_shot, static_argnums=0)(sampler, params, plan, key, 3)
  np.testing.assert_allclose(got.latents, want, atol=1e-5)
  # Earlier exits give the x0 prediction of that step: a different (less refined) output.
  early = jax.jit(rollout.rollout_shot, static_argnums=0)(sampler, params, plan, key, 1)
  assert float(jnp.max(jnp.abs(early.latents - want))) > 1e-2


@pytest.mark.parametrize('exit_step,local_frames', [
    pytest.param(0, None, marks=pytest.mark.slow), (2, None), (2, 3)])
def test_gradient_reaches_only_the_exit_forward(exit_step, local_frames):
  """d(w . latents)/d params == the gradient of the exit forwards alone, with their inputs
  (noisy chunk, global and local caches) computed beforehand and held fixed. The local window
  holding the whole shot (default) takes the replayed exit forwards of `rollout_shot`, a
  one-chunk window (3 frames: a ring buffer) the exit forwards inside the chunk scan."""
  _, sampler, params, plan = _setup(local_frames)
  key = jax.random.key(3)
  w = _weights(sampler)
  f = lambda p: jnp.sum(w * rollout.rollout_shot(sampler, p, plan, key, exit_step).latents)
  got = jax.jit(jax.grad(f))(params)

  # Independent: replay the rollout with plain Python control flow, no gradient anywhere,
  # recording what each exit forward reads; then differentiate only those forwards.
  n, b = sampler.chunk_frames, 1
  shape = (b, n) + HW + (16,)
  full = lambda t: jnp.full((b, n), t, jnp.float32)
  fwd = jax.jit(sampler.forward, static_argnames='return_kv')
  g_cache = jax.jit(sampler.prefill)(params, plan)
  local = sampler.init_local(b)
  recorded = []
  for c in range(sampler.num_chunks):
    keys = sampler.noise_keys(key, c)
    x = jax.random.normal(keys[0], shape)
    for i in range(exit_step):
      v = fwd(params, plan, g_cache, local, c, x, full(sampler.timesteps[i]))
      x0 = schedule.x0_from_velocity(x, v, sampler.sigmas[i])
      x = schedule.add_noise(x0, jax.random.normal(keys[i + 1], shape), sampler.sigmas[i + 1])
    recorded.append((x, local))
    v = fwd(params, plan, g_cache, local, c, x, full(sampler.timesteps[exit_step]))
    x0 = schedule.x0_from_velocity(x, v, sampler.sigmas[exit_step])
    _, kv = fwd(params, plan, g_cache, local, c, x0, full(0.0), return_kv=True)
    local = sampler.write_local(local, kv, c)

  def exit_only(p):
    total = 0.0
    for c, (x, loc) in enumerate(recorded):
      v = sampler.forward(p, plan, g_cache, loc, c, x, full(sampler.timesteps[exit_step]))
      x0 = schedule.x0_from_velocity(x, v, sampler.sigmas[exit_step])
      total += jnp.sum(w[:, c * n:(c + 1) * n] * x0)
    return total

  want = jax.jit(jax.grad(exit_only))(params)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, e, rtol=2e-4, atol=2e-4 * float(jnp.max(jnp.abs(e))) + 1e-7)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(got)) > 0


def test_local_before_needs_a_window_that_holds_the_shot():
  _, sampler, _, _ = _setup()
  final = sampler.init_local(1)
  assert sampler.local_holds_shot and int(sampler.local_before(final, 1).length) == (
      sampler.chunk_tokens)
  _, ring, _, _ = _setup(3)
  assert not ring.local_holds_shot
  with pytest.raises(ValueError, match='local_frames'):
    ring.local_before(ring.init_local(1), 1)


def test_history_params_get_zero_gradient_but_change_the_output():
  """Weights used by the prefill, the earlier steps and the cache writes sit behind
  stop_gradient: the output depends on them, its gradient w.r.t. them is exactly zero."""
  _, sampler, params, plan = _setup()
  key = jax.random.key(5)
  w = _weights(sampler)
  other = jax.tree.map(lambda x: 1.1 * x, params)
  f = lambda hist: jnp.sum(w * rollout.rollout_shot(sampler, params, plan, key, 2,
                                                    history_params=hist).latents)
  value, grads = jax.jit(jax.value_and_grad(f))(other)
  assert all(not np.any(g) for g in jax.tree.leaves(grads))
  assert abs(float(value) - float(jax.jit(f)(params))) > 1e-3


def test_draw_exit_step_covers_all_steps():
  steps = np.asarray(jax.vmap(lambda k: rollout.draw_exit_step(k, 4))(
      jax.random.split(jax.random.key(0), 400)))
  assert set(steps.tolist()) == {0, 1, 2, 3}


def test_frameconcat_layout():
  _, sampler, _, plan = _setup()
  cond = rollout.frameconcat(plan, 6)
  assert cond.frame_shot.shape == (1, 12)
  np.testing.assert_array_equal(cond.frame_shot[0, 6:], plan.gen_shot[0])
  np.testing.assert_array_equal(cond.frame_caption[0, :6], plan.ctx_caption[0])


@pytest.mark.slow
def test_story_rollout_at_last_exit_equals_the_story_session():
  """Stage 4 at exit step 3 == interactive generation: same context frames (decoded, chosen,
  re-encoded) and the same noise keys for every shot."""
  cfg = shotstream.get_config('tiny')
  pipe = pipeline_lib.ShotStreamPipeline.from_random(cfg, seed=0)
  captions = ['a red fox runs', 'the fox jumps a fence', 'the fox sleeps']
  session = pipe.session('A fox story. ', seed=3)
  for c in captions:
    session.run_shot(c)
  rows = pipe.prompt_encoder(prompts_lib.shot_prompts('A fox story. ', captions))
  shots, _ = rollout.rollout_story(pipe.sampler, pipe.vae, pipe.vae_params, pipe.dit_params,
                                   rows[None], jax.random.key(3), [3, 3, 3])
  for s, shot in enumerate(shots):
    np.testing.assert_allclose(shot.rollout.latents[0], session.latents[s], atol=1e-4)
