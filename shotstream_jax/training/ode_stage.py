"""Stage 2, ODE init: the block-causal student regresses the teacher's ODE endpoints (DESIGN 4.5.2).

Networks: 'generator' (the causal student, trained) and 'teacher' (frozen). The teacher is a
network of the train state so that the loop shards and checkpoints it like any other, but the
stage does not train it (`trained()` leaves it out): its params get the frozen `set_to_zero`
transform (training/optim.py), which holds no optimizer state, and the loss reads them through
stop_gradient. The generator starts from network `ode.init_network` of `ode.init_from`
('' = random, tests only; loading.py lists the accepted formats); the teacher from
`ode.teacher_from` ('' = a copy of the generator's initial weights: with init_from a stage-1 run
that is the reference's "student initialised from the teacher"; from Wan's random init the
output head is zero, so v = 0 and the loss is trivially 0).

One example is one target shot's conditioning, from the same precomputed shards and with the
same layout as stage 1 (teacher_stage.make_example): C clean context latents with their RoPE
shot ids and caption rows, the caption table, plus the negative prompt's embedding. The target
latents of the data are not used: the teacher generates the target from noise.

ODE pairs are made ON THE FLY inside the jitted step (the reference precomputes them once):
Euler over `ode.num_steps` steps of the shifted grid with CFG `uncond + g (cond - uncond)`
(g = `ode.guidance`, uncond = the negative prompt), FrameConcat conditioning on the target
shot's context, saving the latents entering `ode.save_steps` and the final x0
(sampling/teacher.py:ode_pairs). The saved steps must be the student's denoising timesteps
(50 steps -> 0/13/25/37 for the warped [1000, 740, 500, 260]); `ode.exact_steps=False` lifts
that check, for fast smoke runs only. Then losses.ode_regression_loss: one random trajectory
index per chunk, block-causal attention, MSE to x0 on frames with t > 0.

Deviation from the reference (README): pairs are fresh every step (new noise, new story
shot) instead of a fixed precomputed set reused over epochs, so a step also costs
num_steps x 2 teacher forwards without gradient.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from shotstream_jax.models import dit
from shotstream_jax.sampling import teacher as teacher_lib
from shotstream_jax.training import inputs as inputs_lib
from shotstream_jax.training import losses
from shotstream_jax.training import sharding as sharding_lib
from shotstream_jax.training import stage as stage_lib
from shotstream_jax.training import teacher_stage

GENERATOR, TEACHER = 'generator', 'teacher'


def make_example(record, rng: np.random.Generator, *, negative: np.ndarray, context_frames: int,
                 target_shot: str = 'random'):
  """One ODE example: the target shot's context and routing (stage-1 layout) + negative prompt.

  frame_shot / frame_caption keep the stage-1 length C + 1 (context, then the target's id and
  caption row); the stage broadcasts the last entry over the target frames.
  """
  ex = teacher_stage.make_example(record, rng, context_frames=context_frames, target_frames=1,
                                  target_shot=target_shot)
  return {
      'ctx_latents': ex['latents'][:context_frames],
      'frame_shot': ex['frame_shot'],
      'frame_caption': ex['frame_caption'],
      'text': ex['text'],
      'negative': np.asarray(negative, np.float32)[None],     # [1, L, D]: a 1-row table
  }


def conditioning(batch, target_frames: int):
  """(cond, text, uncond_text) for a batch: caption tables flattened over the batch; the
  negative prompt (the same in every example) as a 1-row table."""
  widen = lambda a: jnp.concatenate(
      [a[:, :-1], jnp.repeat(a[:, -1:], target_frames, axis=1)], axis=1)
  text, caption = inputs_lib.flatten_tables(batch['text'], widen(batch['frame_caption']))
  cond = teacher_lib.FrameConcat(ctx_latents=batch['ctx_latents'],
                                 frame_shot=widen(batch['frame_shot']), frame_caption=caption)
  return cond, text, batch['negative'][0]


def ode_loss(model_cfg, params, batch, key, *, target_frames: int, guidance: float,
             num_steps: int, shift: float, save_steps):
  """(loss, metrics): teacher trajectory from fresh noise, then the student's ODE regression."""
  k_noise, k_idx = jax.random.split(key)
  cond, text, uncond_text = conditioning(batch, target_frames)
  ctx = batch['ctx_latents']
  noise = jax.random.normal(k_noise, (ctx.shape[0], target_frames) + ctx.shape[2:], ctx.dtype)
  teacher = jax.lax.stop_gradient(params[TEACHER])

  trajectory, times = teacher_lib.ode_pairs(model_cfg, teacher, noise, cond, text, uncond_text,
                                            guidance, num_steps, shift, save_steps)
  trajectory = jax.lax.stop_gradient(trajectory)
  loss, aux = losses.ode_regression_loss(model_cfg, params[GENERATOR], trajectory, times, cond,
                                         text, k_idx)
  return loss, dict(aux, teacher_x0_std=jnp.std(trajectory[:, -1]))


class OdeInitStage(stage_lib.PrecomputedStage):
  """Stage 2: 'generator' trained, 'teacher' frozen (see module doc)."""
  networks = (GENERATOR, TEACHER)

  def __init__(self, config, workdir: str):
    super().__init__(config, workdir)
    oc = config.ode
    n = config.model.chunk_frames
    if oc.target_frames < 1 or oc.target_frames % n:
      raise ValueError(f'ode.target_frames: must be a positive multiple of model.chunk_frames '
                       f'({n}), got {oc.target_frames}')
    if oc.guidance < 0:
      raise ValueError(f'ode.guidance: must be >= 0, got {oc.guidance}')
    save_steps = tuple(int(s) for s in oc.save_steps)
    try:   # sampling/teacher.py names its fields teacher.*; here they are ode.*
      teacher_lib.euler_grid(oc.num_steps)
      if oc.exact_steps:
        teacher_lib.check_save_steps(save_steps, config.sampling, oc.num_steps,
                                     config.sampling.shift)
    except ValueError as e:
      raise ValueError(str(e).replace('teacher.', 'ode.', 1)) from None
    if list(save_steps) != sorted(set(save_steps)) or not all(
        0 <= s < oc.num_steps for s in save_steps):
      raise ValueError(f'ode.save_steps: must be increasing and in [0, {oc.num_steps}), got '
                       f'{list(save_steps)}')
    if oc.init_network not in (GENERATOR, TEACHER):
      raise ValueError(f'ode.init_network: unknown {oc.init_network!r}; accepted: '
                       f'{GENERATOR}, {TEACHER}')
    self.check_frozen_sections()
    self.model = dit.WanDiT(config.model)
    self.train_dir, self.heldout_dir = inputs_lib.prepare(config.data, config, workdir)
    negative = inputs_lib.negative_text(oc.negative, self.train_dir, config.model.text_len,
                                        config.model.text_dim, 'ode.negative')
    self.eval_limit = oc.eval_batches   # the eval key fixes the teacher's noise
    self.example = functools.partial(
        make_example, negative=negative, context_frames=config.model.context_frames,
        target_shot=oc.target_shot)
    self.loss = functools.partial(
        ode_loss, config.model, target_frames=oc.target_frames, guidance=oc.guidance,
        num_steps=oc.num_steps, shift=config.sampling.shift, save_steps=save_steps)

  def trained(self):
    return {GENERATOR: GENERATOR}

  def boxed_shapes(self):
    shapes = sharding_lib.dit_boxed_shapes(self.config.model)
    return {GENERATOR: shapes, TEACHER: shapes}

  def init_params(self, key, shardings):
    """Generator from `ode.init_from` (or random); teacher from `ode.teacher_from` (or a copy)."""
    oc = self.config.ode
    gen = self.dit_params(oc.init_from, oc.init_network, 'ode.init_from', key,
                          shardings[GENERATOR])
    if oc.teacher_from:
      teacher = self.dit_params(oc.teacher_from, TEACHER, 'ode.teacher_from', key,
                                shardings[TEACHER])
    else:   # own buffers: the train state is donated
      teacher = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                        out_shardings=shardings[TEACHER])(gen)
    return {GENERATOR: gen, TEACHER: teacher}

  def eval_metrics(self, params, batch, key):
    loss, aux = self.loss(params, batch, key)
    return {'loss': loss, 'teacher_x0_std': aux['teacher_x0_std']}
