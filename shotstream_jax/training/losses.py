"""Losses of stages 2-4 as pure functions (DESIGN 4.5).

Flow matching: x_t = (1 - sigma) x0 + sigma eps, the DiT predicts v = eps - x0, so
x0 = x_t - sigma v; timestep t = 1000 sigma.

  * stage 2, ODE regression: the block-causal student regresses the teacher's x0 from the saved
    trajectory latents, one random trajectory index per chunk, loss on frames with t > 0;
  * stages 3-4, DMD: grad = (fake_x0 - real_x0) / mean|x - real_x0|, generator loss
    0.5 * mean((x - sg(x - grad))^2), so d loss / d x = grad / x.size; the real score is the
    frozen teacher with `cond + g (cond - uncond)` (g = 3), the fake score the critic;
  * the critic's flow loss mean((v - (eps - x))^2) on generator samples.

Reductions follow the reference: every loss is a plain mean over the elements it covers.
Score timesteps are a uniform index into the shifted 1000-point grid, clamped to [20, 980].
"""

import dataclasses
import jax
import jax.numpy as jnp

from shotstream_jax.models import dit
from shotstream_jax.sampling import schedule
from shotstream_jax.sampling import teacher as teacher_lib


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
  """Timesteps of the real / fake scores and the critic (reference: 1000, shift 8, [20, 980])."""
  num_train_timesteps: int = 1000
  shift: float = 8.0
  min_timestep: float = 20.0
  max_timestep: float = 980.0
  real_guidance: float = 3.0     # real score: cond + g (cond - uncond)


# ------------------------------------------------------------------ flow matching pieces

def flow_target(x0, noise):
  """The velocity the DiT should predict: v = eps - x0."""
  return noise - x0


def x0_from_flow(x_t, v, sigma):
  return schedule.x0_from_velocity(x_t, v, _bcast(sigma, x_t))


def add_noise(x0, noise, sigma):
  return schedule.add_noise(x0, noise, _bcast(sigma, x0))


def _bcast(sigma, x):
  """sigma [], [B] or [B, F] -> broadcastable against x [B, F, ...]."""
  sigma = jnp.asarray(sigma, jnp.float32)
  return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def masked_mean(x, mask=None):
  """Mean over the elements where mask [B, F] (per frame) is true; 0 if none is."""
  if mask is None:
    return jnp.mean(x)
  m = jnp.broadcast_to(_bcast(mask.astype(jnp.float32), x), x.shape)
  return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def score_timesteps(key, batch: int, cfg: ScoreConfig = ScoreConfig()):
  """t [B]: a uniform index into the shifted training grid, clamped to [min, max]."""
  grid = schedule.shifted_grid(cfg.num_train_timesteps, cfg.shift) * cfg.num_train_timesteps
  idx = jax.random.randint(key, (batch,), 0, cfg.num_train_timesteps)
  t = jnp.asarray(grid, jnp.float32)[idx]
  return jnp.clip(t, cfg.min_timestep, cfg.max_timestep)


# ------------------------------------------------------------------ stage 2

def ode_regression_loss(model_cfg, params, trajectory, times, cond: teacher_lib.FrameConcat,
                        text, key):
  """Stage-2 loss of the block-causal student.

  Args:
    trajectory: [B, S, F, h, w, C] teacher latents entering the saved steps, last entry x0.
    times: [S] their timesteps (e.g. 1000, 957.93, 888.89, 737.59, 0).
    cond: context latents and per-frame routing (context frames at t = 0).
    text: caption table [N, L, text_dim].
    key: draws one trajectory index per chunk of `model_cfg.chunk_frames` frames.

  Returns (loss, metrics). Frames drawn at t = 0 (the clean x0) are inputs only: they act as
  clean history for later chunks and are left out of the mean.
  """
  b, s, f = trajectory.shape[:3]
  n = model_cfg.chunk_frames
  if f % n:
    raise ValueError(f'trajectory: {f} frames is not a multiple of model.chunk_frames ({n})')
  idx = jnp.repeat(jax.random.randint(key, (b, f // n), 0, s), n, axis=1)     # [B, F]
  noisy = jnp.take_along_axis(trajectory, idx.reshape(b, 1, f, *(1,) * (trajectory.ndim - 3)),
                              axis=1)[:, 0]
  t = jnp.asarray(times, jnp.float32)[idx]
  cf = cond.ctx_latents.shape[1]
  latents = jnp.concatenate([cond.ctx_latents.astype(noisy.dtype), noisy], axis=1)
  ts = jnp.concatenate([jnp.zeros((b, cf), jnp.float32), t], axis=1)
  v = dit.WanDiT(model_cfg).apply(
      {'params': params}, latents, ts, text, frame_pos=jnp.arange(cf + f),
      frame_shot=cond.frame_shot, frame_caption=cond.frame_caption, attention='block_causal',
      chunk_frames=n, context_frames=cf)[:, cf:]
  x0 = x0_from_flow(noisy, v, schedule.timestep_sigma(t))
  mask = t > 0
  loss = masked_mean((x0 - trajectory[:, -1]) ** 2, mask)
  return loss, {'ode_loss': loss, 'ode_frames_with_loss': jnp.sum(mask) / b}


# ------------------------------------------------------------------ stages 3-4 (DMD)

def dmd_direction(x, real_x0, fake_x0):
  """(fake_x0 - real_x0) / mean|x - real_x0| (per sample), NaN/Inf replaced as the reference."""
  norm = jnp.mean(jnp.abs(x - real_x0), axis=tuple(range(1, x.ndim)), keepdims=True)
  return jnp.nan_to_num((fake_x0 - real_x0) / norm)


def dmd_loss(x, grad, mask=None):
  """0.5 * mean((x - sg(x - grad))^2): its gradient w.r.t. x is grad / (number of elements)."""
  target = jax.lax.stop_gradient(x - grad)
  return 0.5 * masked_mean((x - target) ** 2, mask)


def real_score_x0(model_cfg, teacher_params, cond, x_t, t, text, uncond_text,
                  guidance: float = 3.0):
  """Frozen teacher's x0 with guidance `cond + g (cond - uncond)` (negative prompt as uncond)."""
  v = teacher_lib.guided_velocity_fn(model_cfg, teacher_params, cond, text, uncond_text,
                                     guidance=1.0 + guidance)(x_t, t)
  return x0_from_flow(x_t, v, schedule.timestep_sigma(t))


def fake_score_x0(model_cfg, critic_params, cond, x_t, t, text):
  """The critic's x0 (no guidance, as the reference's fake_guidance_scale 0)."""
  v = teacher_lib.frameconcat_velocity(model_cfg, critic_params, cond, x_t, t, text)
  return x0_from_flow(x_t, v, schedule.timestep_sigma(t))


def generator_dmd_loss(model_cfg, x, teacher_params, critic_params, cond, text, uncond_text,
                       key, cfg: ScoreConfig = ScoreConfig(), mask=None):
  """Stage-3/4 generator loss on generated latents x [B, F, ...] (with their gradient path).

  Both scores see sg(x) noised to a random t in [min, max]; only `x` carries gradient.
  Returns (loss, metrics).
  """
  k_t, k_n = jax.random.split(key)
  b = x.shape[0]
  t = score_timesteps(k_t, b, cfg)
  x_sg = jax.lax.stop_gradient(x)
  x_t = add_noise(x_sg, jax.random.normal(k_n, x.shape, x.dtype),
                  schedule.timestep_sigma(t, cfg.num_train_timesteps))
  real = real_score_x0(model_cfg, jax.lax.stop_gradient(teacher_params), cond, x_t, t, text,
                       uncond_text, cfg.real_guidance)
  fake = fake_score_x0(model_cfg, jax.lax.stop_gradient(critic_params), cond, x_t, t, text)
  grad = jax.lax.stop_gradient(dmd_direction(x_sg, real, fake))
  loss = dmd_loss(x, grad, mask)
  return loss, {'dmd_loss': loss, 'dmd_grad_abs_mean': jnp.mean(jnp.abs(grad)),
                'score_timestep': jnp.mean(t)}


def critic_flow_loss(model_cfg, critic_params, x, cond, text, key,
                     cfg: ScoreConfig = ScoreConfig(), mask=None):
  """The critic's flow-matching loss on generator samples x (treated as data: sg); `mask`
  [B, F] leaves frames out of the mean (stage 4: stories with fewer shots)."""
  k_t, k_n = jax.random.split(key)
  t = score_timesteps(k_t, x.shape[0], cfg)
  x = jax.lax.stop_gradient(x)
  noise = jax.random.normal(k_n, x.shape, x.dtype)
  x_t = add_noise(x, noise, schedule.timestep_sigma(t, cfg.num_train_timesteps))
  v = teacher_lib.frameconcat_velocity(model_cfg, critic_params, cond, x_t, t, text)
  loss = masked_mean((v - flow_target(x, noise)) ** 2, mask)
  return loss, {'critic_loss': loss, 'critic_timestep': jnp.mean(t)}

