"""Self-forcing rollouts of the causal student for DMD (DESIGN 4.5, stages 3 and 4).

Stage 3: the student generates a shot chunk by chunk with its own caches, exactly as at
inference (`CausalSampler` pieces: prefill, forward, write_local, noise keys), except that every
chunk stops at one exit step k in 0..3 drawn once per iteration: its output is the x0
prediction of step k. Only that forward carries gradient: the prefill, the steps before k, and
the clean pass that writes the chunk's K/V run on `stop_gradient` params, and the inputs and
caches the exit forward reads are `stop_gradient`. With k = 3 and the same key the latents are
those of `CausalSampler.shot` (same noise keys per chunk and step).

Stage 4: every shot of a sample is rolled out in order; each later shot's context comes from the
decoded and re-encoded outputs of the earlier shots of this rollout (VAE decode -> the context
rule of context.py -> each chosen frame encoded alone), all under `stop_gradient`.
"""

from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from shotstream_jax import context as context_lib
from shotstream_jax.models import dit
from shotstream_jax.models import vae as vae_lib
from shotstream_jax.sampling import causal
from shotstream_jax.sampling import schedule
from shotstream_jax.sampling import teacher
from shotstream_jax.training import inputs as inputs_lib

sg = jax.lax.stop_gradient


@flax.struct.dataclass
class Rollout:
  latents: jax.Array     # [B, F, h, w, C]; gradient only through each chunk's exit forward
  exit_step: jax.Array   # int32 []: the denoising step every chunk stopped at


def draw_exit_step(key, num_steps: int):
  """One exit step in [0, num_steps), shared by all chunks (and all hosts: same key)."""
  return jax.random.randint(key, (), 0, num_steps)


def rollout_shot(sampler: causal.CausalSampler, params, plan: causal.ShotPlan, key, exit_step,
                 history_params=None) -> Rollout:
  """One shot of the student, chunk by chunk, stopping every chunk at `exit_step` (traced ok).

  Args:
    sampler: the static structure (configs, latent size) of generation.
    params: student params; gradient flows into them only through the exit forwards.
    plan: per-shot inputs (context latents, ids, caption rows, text K/V). `plan.text_kv` is used
      as given in the exit forward; compute it under `stop_gradient` to match the reference,
      which fills its cross-attention cache without gradient.
    key: noise key (the same derivation per chunk and step as `CausalSampler.chunk`).
    exit_step: int in [0, len(denoising_steps)).
    history_params: params for every pass without gradient (prefill, earlier steps, cache
      writes); default `params`. Always `stop_gradient`.
  """
  hist = sg(params if history_params is None else history_params)
  hist_plan = sg(plan)
  ts = jnp.asarray(sampler.timesteps)
  sigmas = jnp.asarray(sampler.sigmas)
  b, n = plan.gen_shot.shape[0], sampler.chunk_frames
  shape = (b, n) + sampler.latent_hw + (sampler.model_cfg.in_channels,)
  full = lambda t: jnp.full((b, n), t, jnp.float32)
  global_cache = sg(sampler.prefill(hist, hist_plan))
  exit_step = jnp.asarray(exit_step, jnp.int32)

  def exit_forward(p, pl, local, index, x):
    v = sampler.forward(p, pl, global_cache, local, index, x, full(ts[exit_step]))
    return schedule.x0_from_velocity(x, v, sigmas[exit_step])

  def body(local, index):
    keys = sampler.noise_keys(key, index)

    def earlier_step(i, x):
      v = sampler.forward(hist, hist_plan, global_cache, local, index, x, full(ts[i]))
      x0 = schedule.x0_from_velocity(x, v, sigmas[i])
      noise = jax.random.normal(keys[i + 1], shape, jnp.float32)
      return schedule.add_noise(x0, noise, sigmas[i + 1])

    x = jax.random.normal(keys[0], shape, jnp.float32)
    x = sg(jax.lax.fori_loop(0, exit_step, earlier_step, x))
    # Replayed: the exit forward runs once more with gradient after the scan.
    x0 = exit_forward(params if not replay else hist, plan if not replay else hist_plan,
                      local, index, x)
    _, kv = sampler.forward(hist, hist_plan, global_cache, local, index, sg(x0),
                            full(sampler.sampling_cfg.cache_timestep), return_kv=True)
    return sg(sampler.write_local(local, sg(kv), index)), (x if replay else x0)

  # Replay (the local window holds the whole shot, so no chunk's K/V is ever overwritten): the
  # cache chunk i read is the final cache cut to its first i chunks (`local_before`), so the
  # exit forwards with gradient run in a second scan against that one cache instead of inside
  # the first, whose backward would keep a copy of the whole local cache per chunk. Same
  # numbers: the same K/V in the filled slots, and the attention never reads past the fill
  # length. The price is one more forward a chunk: the exit forward runs without gradient in
  # the scan (its x0 writes the cache) and again with gradient in the replay.
  replay = sampler.local_holds_shot
  final, xs = jax.lax.scan(body, sampler.init_local(b), jnp.arange(sampler.num_chunks))
  if replay:
    final = sg(final)

    def replayed(_, inputs):
      index, x = inputs
      return None, exit_forward(params, plan, sampler.local_before(final, index), index, x)

    _, xs = jax.lax.scan(replayed, None, (jnp.arange(sampler.num_chunks), xs))
  xs = jnp.swapaxes(xs, 0, 1)
  latents = xs.reshape((b, sampler.num_chunks * n) + xs.shape[3:])
  return Rollout(latents, exit_step)


def frameconcat(plan: causal.ShotPlan, num_frames: int) -> teacher.FrameConcat:
  """The shot as the bidirectional teacher / critic see it: [context | num_frames generated]."""
  b = plan.gen_shot.shape[0]
  gen = lambda a: jnp.broadcast_to(a[:, None], (b, num_frames))
  return teacher.FrameConcat(plan.ctx_latents,
                             jnp.concatenate([plan.ctx_shot, gen(plan.gen_shot)], axis=1),
                             jnp.concatenate([plan.ctx_caption, gen(plan.gen_caption)], axis=1))


# ------------------------------------------------------------------ stage 4

class ShotRollout(NamedTuple):
  rollout: Rollout
  plan: causal.ShotPlan         # what the student conditioned on
  cond: teacher.FrameConcat     # the same for the real / fake scores
  rows: jax.Array               # [B R, L, text_dim] the batch's caption tables, stacked


def batch_plan(model_cfg, params, ctx_latents, ctx_shot, ctx_caption, gen_shot, gen_caption,
               rows):
  """(ShotPlan, caption table) of a batch whose examples have their own caption tables
  rows [B, R, L, text_dim]: the tables are stacked into one [B R, L, text_dim] and each
  example's caption ids offset by R b. Text K/V under `stop_gradient` (as the reference)."""
  table, ctx_caption, gen_caption = inputs_lib.flatten_tables(rows, ctx_caption, gen_caption)
  text_kv = sg(dit.WanTextKV(model_cfg).apply({'params': sg(params)}, table))
  plan = causal.ShotPlan(sg(ctx_latents), ctx_shot, ctx_caption, gen_shot, gen_caption, text_kv)
  return plan, table


def shot_plan(model_cfg, params, ctx_latents, choice: context_lib.ContextChoice, caption_rows):
  """(ShotPlan, caption table) of one shot of every story of a batch: its caption table rows
  gathered from per-shot prompt embeddings caption_rows [B, S, L, text_dim]; every story has the
  same shot lengths, so one context choice serves the batch."""
  ids = map(jnp.asarray, choice.batch_ids(ctx_latents.shape[0]))
  return batch_plan(model_cfg, params, ctx_latents, *ids,
                    caption_rows[:, np.asarray(choice.caption_shots)])


def history_context(vae, vae_params, decoded: Sequence[jax.Array], budget: int,
                    latent_shape):
  """(context latents [B, Cf, h, w, C], ContextChoice) of the next shot from the decoded
  frames [B, T_s, H, W, 3] of the earlier shots of this rollout (exact zeros for shot 0)."""
  choice = context_lib.choose_context([d.shape[1] for d in decoded], budget)
  if not decoded:
    return jnp.zeros(latent_shape[:1] + (budget,) + tuple(latent_shape[1:]), jnp.float32), choice
  frames = jnp.concatenate([sg(d) for d in decoded], axis=1)[:, np.asarray(choice.frame_indices)]
  b, cf = frames.shape[:2]
  z = vae_lib.encode_image(vae, vae_params, frames.reshape((b * cf,) + frames.shape[2:]))
  return sg(z.reshape((b, cf) + z.shape[2:])), choice


def rollout_story(sampler: causal.CausalSampler, vae, vae_params, params, caption_rows, key,
                  exit_steps, history_params=None, roll_out: Optional[Callable] = None,
                  carry=None) -> Tuple[List[ShotRollout], Any]:
  """Every shot of a batch of stories in order (stage 4), later shots conditioned on the
  decoded and re-encoded rollouts of the earlier ones.

  caption_rows: [B, S, L, text_dim] prompt embeddings of the S shots of each story
    (`global + "shotI:" + ...`).
  key: shot s uses fold_in(key, s) (as `StorySession`); exit_steps: [S] one per shot.
  roll_out(carry, s, plan, table, key, exit_step) -> (carry, latents [B, F, ...]): how a shot
    is rolled out once its plan is known; default `rollout_shot` (the DMD generator step takes
    each shot's gradient in its own). `carry` threads through it.
  Returns (per shot its rollout and what the DMD losses need, the final carry). Only the
  rolled-out latents carry gradient; the history (decode, context choice, encode) does not.
  """
  m = sampler.model_cfg
  text_params = params if history_params is None else history_params
  if roll_out is None:
    def roll_out(c, s, plan, table, k, exit_step):
      del s, table
      return c, rollout_shot(sampler, params, plan, k, exit_step, history_params).latents
  num_shots, batch = caption_rows.shape[1], caption_rows.shape[0]
  decoded, out = [], []
  for s in range(num_shots):
    ctx, choice = history_context(vae, vae_params, decoded, m.context_frames,
                                  (batch,) + sampler.latent_hw + (m.in_channels,))
    plan, table = shot_plan(m, text_params, ctx, choice, caption_rows)
    carry, x = roll_out(carry, s, plan, table, jax.random.fold_in(key, s), exit_steps[s])
    out.append(ShotRollout(Rollout(x, jnp.asarray(exit_steps[s], jnp.int32)), plan,
                           frameconcat(plan, x.shape[1]), table))
    if s + 1 < num_shots:
      decoded.append(sg(vae_lib.decode(vae, vae_params, sg(x))))
  return out, carry
