"""The bidirectional next-shot teacher: frame-concatenated forward, Euler + CFG, ODE pairs.

The teacher (and the critic, and the real score of DMD) sees [clean context | noisy target]
with one timestep shared by every frame, context included (DESIGN 4.5), and bidirectional
attention; only the target frames' output is used. Stage 2 samples it with 50 Euler steps over
the shifted grid (`sigma = shift*s / (1 + (shift-1)*s)`, s in linspace(1, 0, 51)[:-1], then 0)
and CFG `uncond + g (cond - uncond)` (g = 6), saving the latents that *enter* steps 0/13/25/37 --
exactly the student's 4 warped timesteps -- and the final x0: the ODE pairs of stage 2.
"""

from typing import Callable, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from shotstream_jax.models import dit
from shotstream_jax.sampling import schedule

SAVE_STEPS = (0, 13, 25, 37)


@flax.struct.dataclass
class FrameConcat:
  """What conditions the target frames: clean context latents and per-frame routing.

  ctx_latents: [B, Cf, h, w, C] (zeros for the first shot).
  frame_shot / frame_caption: int32 [B, Cf + F] RoPE shot id and caption row of every frame,
    context first. The caption rows index the `text` table passed with them.
  """
  ctx_latents: jax.Array
  frame_shot: jax.Array
  frame_caption: jax.Array


def frameconcat_velocity(model_cfg, params, cond: FrameConcat, x_t, t, text=None, text_kv=None):
  """Velocity of the target frames x_t [B, F, h, w, C] at timesteps t [B] (shared by all frames,
  context included); text [N, L, text_dim] rows that `cond.frame_caption` indexes, or their
  cross-attention K/V (`dit.WanTextKV`)."""
  b, cf = cond.ctx_latents.shape[:2]
  f = x_t.shape[1]
  latents = jnp.concatenate([cond.ctx_latents.astype(x_t.dtype), x_t], axis=1)
  ts = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1, 1), (b, cf + f))
  v = dit.WanDiT(model_cfg).apply(
      {'params': params}, latents, ts, text, frame_pos=jnp.arange(cf + f),
      frame_shot=cond.frame_shot, frame_caption=cond.frame_caption, text_kv=text_kv)
  return v[:, cf:]


def cfg_combine(cond, uncond, scale):
  """uncond + scale (cond - uncond): classifier-free guidance. The reference's sampler CFG g is
  scale g; DMD's real score `cond + g (cond - uncond)` is scale 1 + g."""
  return uncond + scale * (cond - uncond)


def guided_velocity_fn(model_cfg, params, cond: FrameConcat, text=None, uncond_text=None,
                       text_kv=None, uncond_kv=None, guidance: float = 1.0) -> Callable:
  """fn(x_t [B, F, ...], t [B]) -> the guided velocity `cfg_combine(v_cond, v_uncond, guidance)`.

  The one place that decides what a guidance weight costs. At guidance 1 (the unconditional
  branch weighs 0: stages 1-2 and the probe at CFG 1, DMD's real score at g = 0) only the B
  conditional rows run. Otherwise both branches run in ONE DiT call on a 2B batch: the
  unconditional half routes every frame to row 0 of `uncond_text` (or `uncond_kv`), the negative
  or empty prompt, appended to the caption table; the same numbers as two calls
  (`frameconcat_velocity` with `cond`, then with `uncond_routing(cond)`) with larger matmuls.
  """
  if (text is None) == (text_kv is None):
    raise ValueError('text: pass the caption rows or their K/V, not both')
  guidance = float(guidance)
  if guidance == 1.0:
    def cond_fn(x, t):
      t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (x.shape[0],))
      return frameconcat_velocity(model_cfg, params, cond, x, t, text, text_kv)
    return cond_fn
  rows = text.shape[0] if text is not None else text_kv[0].shape[1]
  both = FrameConcat(
      jnp.concatenate([cond.ctx_latents, cond.ctx_latents]),
      jnp.concatenate([cond.frame_shot, cond.frame_shot]),
      jnp.concatenate([cond.frame_caption, jnp.full_like(cond.frame_caption, rows)]))
  table = None if text is None else jnp.concatenate([text, uncond_text.astype(text.dtype)])
  kv = None if text_kv is None else tuple(
      jnp.concatenate([a, b.astype(a.dtype)], axis=1) for a, b in zip(text_kv, uncond_kv))
  b = cond.ctx_latents.shape[0]

  def fn(x, t):
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
    v = frameconcat_velocity(model_cfg, params, both, jnp.concatenate([x, x]),
                             jnp.concatenate([t, t]), table, kv)
    return cfg_combine(v[:b], v[b:], guidance)
  return fn


def uncond_routing(cond: FrameConcat) -> FrameConcat:
  """Every frame attends to row 0: the negative (or empty) prompt passed as a 1-row table."""
  return cond.replace(frame_caption=jnp.zeros_like(cond.frame_caption))


def euler_grid(num_steps: int = 50, shift: float = 8.0,
               num_train_timesteps: int = 1000) -> Tuple[np.ndarray, np.ndarray]:
  """(timesteps [n], sigmas [n + 1]) of the teacher's Euler sampler; the last sigma is 0."""
  if num_steps < 1:
    raise ValueError(f'teacher.num_steps: must be >= 1, got {num_steps}')
  s = np.linspace(1.0, 0.0, num_steps + 1)[:-1]
  sig = shift * s / (1.0 + (shift - 1.0) * s)
  return sig * num_train_timesteps, np.concatenate([sig, [0.0]])


def check_save_steps(save_steps: Sequence[int], sampling_cfg, num_steps: int = 50,
                     shift: float = 8.0) -> np.ndarray:
  """The teacher timesteps at `save_steps`; raises unless they are the student's warped steps."""
  t, _ = euler_grid(num_steps, shift, sampling_cfg.num_train_timesteps)
  if any(not 0 <= i < num_steps for i in save_steps):
    raise ValueError(f'teacher.save_steps: must lie in [0, {num_steps}), got {list(save_steps)}')
  student, _ = schedule.sampling_schedule(sampling_cfg)
  got = t[list(save_steps)]
  if got.shape != student.shape or not np.allclose(got, student, atol=1e-3):
    raise ValueError(f'teacher.save_steps: timesteps {np.round(got, 2).tolist()} are not the '
                     f"student's denoising steps {np.round(student, 2).tolist()}")
  return got


def euler(velocity_fn: Callable, noise, num_steps: int = 50, shift: float = 8.0,
          save_steps: Sequence[int] = SAVE_STEPS, num_train_timesteps: int = 1000):
  """Euler over the shifted grid from `noise` (sigma 1) to sigma 0.

  velocity_fn(x [B, F, ...], t [B]) -> v, e.g. `guided_velocity_fn` (guidance lives there).
  Returns (saved [B, S, F, ...], the latents entering each of `save_steps`; x0 [B, F, ...]).
  One `lax.scan` over the steps.
  """
  ts, sig = euler_grid(num_steps, shift, num_train_timesteps)
  slot = np.full(num_steps, len(save_steps), np.int32)  # out of range = not saved (dropped)
  slot[list(save_steps)] = np.arange(len(save_steps))
  b = noise.shape[0]

  def step(carry, inputs):
    x, saved = carry
    t, s_now, s_next, k = inputs
    if save_steps:
      saved = saved.at[k].set(x, mode='drop')
    v = velocity_fn(x, jnp.full((b,), t, jnp.float32))
    return (x + (s_next - s_now) * v, saved), None

  saved = jnp.zeros((len(save_steps),) + noise.shape, noise.dtype)
  xs = (jnp.asarray(ts, jnp.float32), jnp.asarray(sig[:-1], jnp.float32),
        jnp.asarray(sig[1:], jnp.float32), jnp.asarray(slot))
  (x0, saved), _ = jax.lax.scan(step, (noise, saved), xs)
  return jnp.swapaxes(saved, 0, 1), x0


def ode_pairs(model_cfg, params, noise, cond: FrameConcat, text, uncond_text,
              guidance: float = 6.0, num_steps: int = 50, shift: float = 8.0,
              save_steps: Sequence[int] = SAVE_STEPS):
  """Stage-2 data from the teacher: (trajectory [B, S + 1, F, ...], timesteps [S + 1]).

  The trajectory is the latents entering `save_steps`, then the final x0 (timestep 0), the
  layout of the reference's ODE files (`0_input, 13_input, 25_input, 37_input, pred_x0`).
  `uncond_text` is the negative prompt's [1, L, text_dim] rows (every frame attends to it).
  """
  velocity_fn = guided_velocity_fn(model_cfg, params, cond, text, uncond_text, guidance=guidance)
  saved, x0 = euler(velocity_fn, noise, num_steps, shift, save_steps)
  ts, _ = euler_grid(num_steps, shift)
  times = np.concatenate([ts[list(save_steps)], [0.0]]).astype(np.float32)
  return jnp.concatenate([saved, x0[:, None]], axis=1), times


class TeacherSampler:
  """The bidirectional teacher as a shot sampler of the pipeline (`shot(params, plan, key)`, as
  `causal.CausalSampler`): all target frames at once, `num_steps` Euler steps with CFG over
  [context | target], the caption routing of the plan; uncond = every frame on `uncond_text`.

  For evaluation (the 50-step reference the student is distilled from); it does not stream.
  """

  def __init__(self, model_cfg, sampling_cfg, latent_hw, uncond_text, guidance: float,
               num_steps: int = 50):
    self.model_cfg = model_cfg
    self.latent_hw = tuple(latent_hw)
    self.num_frames = sampling_cfg.shot_latent_frames
    self.num_chunks = 1
    self.shift = sampling_cfg.shift
    self.num_train_timesteps = sampling_cfg.num_train_timesteps
    self.uncond_text = jnp.asarray(uncond_text, jnp.float32)[None]    # [1, L, text_dim]
    self.guidance = float(guidance)
    self.num_steps = int(num_steps)
    euler_grid(self.num_steps)

  def shot(self, params, plan, key):
    b = plan.gen_shot.shape[0]
    f = self.num_frames
    gen = lambda a: jnp.broadcast_to(a[:, None], (b, f))
    cond = FrameConcat(plan.ctx_latents, jnp.concatenate([plan.ctx_shot, gen(plan.gen_shot)], 1),
                       jnp.concatenate([plan.ctx_caption, gen(plan.gen_caption)], 1))
    m = self.model_cfg
    uncond_kv = dit.WanTextKV(m).apply({'params': params}, self.uncond_text)
    velocity_fn = guided_velocity_fn(m, params, cond, text_kv=plan.text_kv, uncond_kv=uncond_kv,
                                     guidance=self.guidance)
    noise = jax.random.normal(key, (b, f) + self.latent_hw + (m.in_channels,), jnp.float32)
    _, x0 = euler(velocity_fn, noise, self.num_steps, self.shift, (), self.num_train_timesteps)
    return x0
