"""Stages 3 and 4: two-stage DMD of the causal student (DESIGN 4.5.3-4).

Networks (the `TrainState` params):
  generator   the causal student; trained (or, with LoRA, a frozen base for 'generator_lora')
  critic      the fake score, initialised from the teacher; trained every step (or via
              'critic_lora')
  teacher     the real score, frozen: `cond + g (cond - uncond)`, uncond = the precomputed
              negative-prompt embedding (`dmd.negative`) or a zero embedding
  vae         stage 4 only, frozen: decodes earlier shots, re-encodes their context frames

Stage 3 ('dmd_intra'): one target shot per example with its ground-truth context (as the
teacher's examples); the generator rolls the shot out chunk by chunk (rollout.rollout_shot) and
stops every chunk at one exit step drawn per iteration. Stage 4 ('dmd_inter'): the first
`dmd.num_shots` shots of a story are rolled out in order; each later shot's context comes from
the decoded and re-encoded outputs of this rollout (rollout.history_context), and the losses
cover every shot (stories with fewer shots are masked). The generator's gradient is taken shot
by shot (`_generator_grads`): the same numbers as the joint loss's, with one shot's backward
residuals in memory instead of every shot's.

Every step: the critic's flow loss on stop_gradient generator samples. Every
`dmd.generator_every` steps (state.step % N == 0, as the reference's
`step % dfake_gen_update_ratio == 0`): the generator's DMD loss, whose rollout also provides
the critic's samples that step. On other steps the generator only samples (no backward pass,
`lax.cond`), and its params AND AdamW state are left untouched: the reference calls
`generator_optimizer.step()` only on generator steps, so moments do not decay, the weight decay
is not applied and the bias-correction count counts generator updates only.

LoRA (`lora.enabled`): adapters 'generator_lora' / 'critic_lora' (models/lora.py layout) are
the trainable params; the bases stay frozen and every forward uses `lora.merge(base, adapter)`.
`optim.generator` / `optim.critic` then apply to the adapters (their `trainable` regex searches
adapter paths like 'blocks/self_attn/q/lora_a'). At the end, `merged_params(config, params)`
gives plain DiT params (base + adapters) and `export_merged(config, params)` the Wan/ShotStream
state dict of the generator.
"""

import functools
from typing import Dict

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from shotstream_jax import loading
from shotstream_jax.convert import dit as dit_convert
from shotstream_jax.models import lora as lora_lib
from shotstream_jax.models import random_init
from shotstream_jax.models import vae as vae_lib
from shotstream_jax.sampling import causal
from shotstream_jax.training import inputs as inputs_lib
from shotstream_jax.training import losses
from shotstream_jax.training import rollout
from shotstream_jax.training import sharding as sharding_lib
from shotstream_jax.training import stage as stage_lib
from shotstream_jax.training import teacher_stage

sg = jax.lax.stop_gradient
DMD_STAGES = ('dmd_intra', 'dmd_inter')
ROLES = ('generator', 'critic')


# ----------------------------------------------------------------------------- examples


def shot_example(record, rng, *, context_frames: int, target_frames: int, target_shot: str,
                 latent_hw):
  """Stage 3: one target shot's ground-truth context and caption table (no target latents)."""
  ex = teacher_stage.make_example(record, rng, context_frames=context_frames,
                                  target_frames=target_frames, target_shot=target_shot)
  c = context_frames
  if tuple(ex['latents'].shape[1:3]) != tuple(latent_hw):
    raise ValueError(f'sampling.height/width: latent size {tuple(latent_hw)} does not match the '
                     f'data latents {tuple(ex["latents"].shape[1:3])}')
  return {'ctx_latents': ex['latents'][:c], 'ctx_shot': ex['frame_shot'][:c],
          'ctx_caption': ex['frame_caption'][:c], 'gen_shot': ex['frame_shot'][c],
          'gen_caption': ex['frame_caption'][c], 'text': ex['text']}


def story_example(record, rng, *, num_shots: int):
  """Stage 4: the prompt embeddings of the first `num_shots` shots; missing shots are masked."""
  del rng
  text = np.asarray(record['text'], np.float32)
  s = min(len(text), num_shots)
  out = np.zeros((num_shots,) + text.shape[1:], np.float32)
  out[:s] = text[:s]
  return {'text': out, 'shot_mask': (np.arange(num_shots) < s).astype(np.float32)}


# ----------------------------------------------------------------------------- LoRA export


def _lora_cfg(config):
  return lora_lib.as_config(config.lora)


def merged_params(config, params, role: str = 'generator'):
  """Plain DiT params of `role` ('generator' or 'critic'): base + adapters when LoRA is on."""
  if not config.lora.enabled:
    return params[role]
  return lora_lib.merge(params[role], params[f'{role}_lora'], _lora_cfg(config))


def export_merged(config, params) -> Dict[str, np.ndarray]:
  """The generator as a Wan/ShotStream state dict (`model.<name>` -> float32 numpy), merged."""
  return dit_convert.shotstream_state_dict(merged_params(config, params), config.model)


def lora_boxed_shapes(boxed, cfg):
  """Adapter shapes boxed like their kernels: lora_a keeps the input axis names, lora_b the
  output's, the rank axis is unsharded (so FSDP / tensor parallelism apply to adapters too)."""
  shapes = jax.eval_shape(lambda p: lora_lib.init_lora(p, cfg, jax.random.key(0)),
                          flax.linen.meta.unbox(boxed))

  def box(path, x):
    names = tuple(str(getattr(k, 'key', k)) for k in path)
    node = boxed
    for n in names[:-1] + ('kernel',):
      node = node[n]
    axes = tuple(node.names)
    axes = axes[:-1] + (None,) if names[-1] == 'lora_a' else axes[:-2] + (None, axes[-1])
    return flax.linen.Partitioned(x, names=axes)
  return jax.tree_util.tree_map_with_path(box, shapes)


# ----------------------------------------------------------------------------- stage


def _tree_where(ok, new, old):
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


class DmdStage(stage_lib.PrecomputedStage):
  """Stages 3-4: their own `train_step`; no held-out loss (DMD losses do not measure quality:
  the harness judges samples)."""

  def __init__(self, config, workdir: str):
    super().__init__(config, workdir)
    if config.stage not in DMD_STAGES:
      raise ValueError(f'stage: DmdStage needs one of {", ".join(DMD_STAGES)}, got '
                       f'{config.stage!r}')
    self.inter = config.stage == 'dmd_inter'
    d = config.dmd
    if d.generator_every < 1:
      raise ValueError(f'dmd.generator_every: must be an integer >= 1, got {d.generator_every}')
    if not 0 <= d.min_timestep < d.max_timestep <= config.sampling.num_train_timesteps:
      raise ValueError(f'dmd.min_timestep/max_timestep: need 0 <= min < max <= '
                       f'{config.sampling.num_train_timesteps}, got {d.min_timestep}, '
                       f'{d.max_timestep}')
    if self.inter and d.num_shots < 1:
      raise ValueError(f'dmd.num_shots: must be >= 1, got {d.num_shots}')
    for role in ROLES:
      if role not in config.optim:
        raise ValueError(f'optim.{role}: missing; DMD needs optim.generator and optim.critic')
    self.lora = _lora_cfg(config) if config.lora.enabled else None
    self.roles = {(f'{r}_lora' if self.lora else r): r for r in ROLES}   # net -> role
    self.gen_net, self.critic_net = list(self.roles)
    self.networks = ('generator', 'critic', 'teacher') + tuple(
        n for n in self.roles if self.lora) + (('vae',) if self.inter else ())

    m, s = config.model, config.sampling
    self.vae = vae_lib.WanVAE(config.vae)
    factor = vae_lib.spatial_factor(config.vae)
    self.latent_hw = (s.height // factor, s.width // factor)
    self.sampler = causal.CausalSampler(m, s, self.latent_hw)
    self.score_cfg = losses.ScoreConfig(
        num_train_timesteps=s.num_train_timesteps, shift=s.shift,
        min_timestep=float(d.min_timestep), max_timestep=float(d.max_timestep),
        real_guidance=float(d.real_guidance))
    self.train_dir, self.heldout_dir = inputs_lib.prepare(config.data, config, workdir)
    self.uncond_text = jnp.asarray(inputs_lib.negative_text(
        d.negative, self.train_dir, m.text_len, m.text_dim, 'dmd.negative'))[None]   # [1, L, D]
    if self.inter:
      self.example = functools.partial(story_example, num_shots=d.num_shots)
    else:
      self.example = functools.partial(
          shot_example, context_frames=m.context_frames, target_frames=s.shot_latent_frames,
          target_shot=d.target_shot, latent_hw=self.latent_hw)

  # ------------------------------------------------------------------ setup

  def boxed_shapes(self):
    dit_boxed = sharding_lib.dit_boxed_shapes(self.config.model)
    out = {n: dit_boxed for n in ('generator', 'critic', 'teacher')}
    if self.lora:
      adapters = lora_boxed_shapes(dit_boxed, self.lora)
      out.update({n: adapters for n in self.roles})
    if self.inter:
      out['vae'] = vae_lib.param_shapes(self.config.vae)    # unboxed: replicated
    return out

  def init_params(self, key, shardings):
    """Teacher from `dmd.teacher_init`; critic and generator from their own paths or, when
    '' (critic: always in the reference), the teacher's weights. '' everywhere = random init
    (the same draw for all three). Fresh LoRA adapters leave the forward unchanged."""
    d = self.config.dmd
    k_dit, k_gen, k_critic = jax.random.split(key, 3)
    teacher = (d.teacher_init, 'teacher', 'dmd.teacher_init')
    source = {'teacher': teacher,
              'critic': (d.critic_init, 'critic', 'dmd.critic_init') if d.critic_init else teacher,
              'generator': ((d.generator_init, 'generator', 'dmd.generator_init')
                            if d.generator_init else teacher)}
    out = {n: self.dit_params(*source[n], k_dit, shardings[n]) for n in source}
    if self.lora:
      for net, k in zip(self.roles, (k_gen, k_critic)):
        init = jax.jit(lambda p, k: lora_lib.init_lora(p, self.lora, k),
                       out_shardings=shardings[net])
        out[net] = init(out[self.roles[net]], k)
    if self.inter:
      out['vae'] = jax.device_put(self._vae_params(), shardings['vae'])
    return out

  def _vae_params(self):
    """The VAE that encoded the data: StoryWorld's random weights (`seed`, as
    training/inputs.py) or `dmd.vae_path` (Wan2.1_VAE.pth or our orbax dir) for real data."""
    cfg = self.config
    if cfg.data.source == 'storyworld':
      return random_init.embedded_vae(cfg.vae, cfg.seed)
    if not cfg.dmd.vae_path:
      raise ValueError('dmd.vae_path: required for dmd_inter on precomputed data (the VAE that '
                       'encoded it, e.g. Wan2.1_VAE.pth)')
    return loading.load_vae(cfg.dmd.vae_path, cfg.vae, 'dmd.vae_path')

  def trained(self):
    """The generator and the critic (or their LoRA adapters), each with its role's section:
    optim.generator / optim.critic; the teacher, the VAE and LoRA bases are frozen."""
    return dict(self.roles)

  # ------------------------------------------------------------------ rollouts

  def _with(self, params, net, value):
    return dict(params, **{net: value})

  def _exit_steps(self, key, count: int):
    n = len(self.config.sampling.denoising_steps)
    return [rollout.draw_exit_step(jax.random.fold_in(key, i), n) for i in range(count)]

  def _shot_mask(self, batch, s: int):
    """[B] which examples have shot s (stage 4 masks stories with fewer shots)."""
    if self.inter:
      return batch['shot_mask'][:, s]
    return jnp.ones(batch['gen_shot'].shape, jnp.float32)

  def _shots(self, gen_params, batch, key, vae_params, roll_out=None, carry=None):
    """Rolls out the step's shots: stage 3's one shot with its ground-truth context, stage 4's
    whole stories (rollout.rollout_story). `roll_out` as rollout_story's (default: no
    gradient). Returns ([(sg latents, FrameConcat, caption table, mask [B])] per shot, the
    final carry)."""
    k_exit, k_roll = jax.random.split(key)
    if roll_out is None:
      roll_out = lambda c, s, plan, table, k, exit_step: (c, rollout.rollout_shot(
          self.sampler, gen_params, plan, k, exit_step).latents)
    if self.inter:
      exits = self._exit_steps(k_exit, batch['text'].shape[1])
      shots, carry = rollout.rollout_story(self.sampler, self.vae, vae_params, gen_params,
                                           batch['text'], k_roll, exits, roll_out=roll_out,
                                           carry=carry)
    else:
      exits = self._exit_steps(k_exit, 1)
      plan, table = rollout.batch_plan(self.config.model, gen_params, batch['ctx_latents'],
                                       batch['ctx_shot'], batch['ctx_caption'],
                                       batch['gen_shot'], batch['gen_caption'], batch['text'])
      carry, x = roll_out(carry, 0, plan, table, k_roll, exits[0])
      shots = [rollout.ShotRollout(rollout.Rollout(x, exits[0]), plan,
                                   rollout.frameconcat(plan, x.shape[1]), table)]
    return [(sg(r.rollout.latents), r.cond, r.rows, self._shot_mask(batch, s))
            for s, r in enumerate(shots)], carry

  # ------------------------------------------------------------------ losses

  @staticmethod
  def _frames_mask(mask, x):
    return jnp.broadcast_to(mask[:, None], x.shape[:2])

  def _generator_grads(self, params, batch, key):
    """(loss, sg shots, metrics, gradient w.r.t. params[gen_net]) of the generator's DMD loss:
    the mean over all rolled-out shots' frames (stories with fewer shots masked).

    A shot's loss reaches the generator only through its own exit forwards (its history,
    context and caption K/V carry no gradient), so the gradient of the mean is the
    mask-weighted sum of per-shot gradients. They are taken one shot at a time, each finished
    before the next shot is rolled out (an optimization barrier orders them), so only one
    shot's backward residuals are alive at once instead of every shot's: what stage 4's memory
    grows with at `wan_1_3b` (README: training steps ahead of time). Equal to the gradient of
    the joint loss (tests/test_train_dmd.py)."""
    gen_net = self.gen_net
    k_roll, k_score = jax.random.split(key)
    gen = sg(merged_params(self.config, params))
    teacher, critic = sg(params['teacher']), sg(merged_params(self.config, params, 'critic'))
    b = batch['text'].shape[0]
    weight = jnp.maximum(jnp.sum(batch['shot_mask']), 1.0) if self.inter else float(b)

    def shot_loss(train_p, s, plan, table, k, exit_step):
      p = merged_params(self.config, self._with(params, gen_net, train_p))
      x = rollout.rollout_shot(self.sampler, p, plan, k, exit_step).latents
      mask = self._shot_mask(batch, s)
      loss, aux = losses.generator_dmd_loss(
          self.config.model, x, teacher, critic, rollout.frameconcat(plan, x.shape[1]), table,
          self.uncond_text, jax.random.fold_in(k_score, s), self.score_cfg,
          mask=self._frames_mask(mask, x))
      return jnp.sum(mask) * loss / weight, (x, aux)

    def roll_out(carry, s, plan, table, k, exit_step):
      total, grads_so_far, _ = carry
      (loss, (x, aux)), grads = jax.value_and_grad(shot_loss, has_aux=True)(
          params[gen_net], s, plan, table, k, exit_step)
      grads = jax.tree.map(jnp.add, grads_so_far, grads)
      # The next shot starts from x: it waits for this shot's gradient, whose residuals die.
      grads, x = jax.lax.optimization_barrier((grads, x))
      return (total + loss, grads, aux['dmd_grad_abs_mean']), x

    zeros = jax.tree.map(jnp.zeros_like, params[gen_net])
    shots, (loss, grads, grad_abs_mean) = self._shots(
        gen, batch, k_roll, params.get('vae'), roll_out, (jnp.zeros((), jnp.float32), zeros, None))
    return loss, shots, {'dmd_loss': loss, 'dmd_grad_abs_mean': grad_abs_mean}, grads

  def _critic_loss(self, train_p, params, shots, key):
    """Flow loss of the critic on the generator's samples (masked mean over shots)."""
    critic = merged_params(self.config, self._with(params, self.critic_net, train_p), 'critic')
    total, weight = 0.0, 0.0
    for s, (x, cond, table, mask) in enumerate(shots):
      err, _ = losses.critic_flow_loss(self.config.model, critic, x, cond, table,
                                       jax.random.fold_in(key, s), self.score_cfg,
                                       mask=self._frames_mask(mask, x))
      n = jnp.sum(mask)
      total, weight = total + n * err, weight + n
    loss = total / jnp.maximum(weight, 1.0)
    return loss, {'critic_loss': loss}

  # ------------------------------------------------------------------ step

  def train_step(self, tx):
    """step(state, batch): critic every step, generator every `dmd.generator_every` steps."""
    every = self.config.dmd.generator_every
    gen_net, critic_net = self.gen_net, self.critic_net

    def step(state, batch):
      key, sub = jax.random.split(jax.random.wrap_key_data(state.rng))
      k_gen, k_critic = jax.random.split(sub)
      params = state.params
      is_gen = state.step % every == 0

      def generator_branch(_):
        loss, shots, aux, grads = self._generator_grads(params, batch, k_gen)
        return grads, shots, dict(aux, generator_loss=loss)

      def sample_branch(_):
        gen = sg(merged_params(self.config, params))
        k_roll, _ = jax.random.split(k_gen)
        shots = sg(self._shots(gen, batch, k_roll, params.get('vae'))[0])
        unmeasured = jnp.full((), jnp.nan, jnp.float32)   # left out of the logged means
        return (jax.tree.map(jnp.zeros_like, params[gen_net]), shots,
                {'dmd_loss': unmeasured, 'dmd_grad_abs_mean': unmeasured,
                 'generator_loss': unmeasured})

      g_grads, shots, metrics = jax.lax.cond(is_gen, generator_branch, sample_branch, None)
      (c_loss, c_aux), c_grads = jax.value_and_grad(self._critic_loss, has_aux=True)(
          params[critic_net], params, shots, k_critic)
      grads = {n: (g_grads if n == gen_net else c_grads if n == critic_net else
                   jax.tree.map(jnp.zeros_like, v)) for n, v in params.items()}
      updates, opt_state = tx.update(grads, state.opt_state, params)
      new = optax.apply_updates(params, updates)
      # Skipped generator steps: params and AdamW state exactly as before.
      new[gen_net] = _tree_where(is_gen, new[gen_net], params[gen_net])
      inner = dict(opt_state.inner_states)
      inner[gen_net] = _tree_where(is_gen, inner[gen_net], state.opt_state.inner_states[gen_net])
      opt_state = opt_state._replace(inner_states=inner)
      metrics = dict(metrics, **c_aux,
                     loss=c_loss + jnp.where(is_gen, metrics['generator_loss'], 0.0),
                     generator_step=is_gen.astype(jnp.float32))
      metrics[f'grad_norm/{gen_net}'] = optax.tree.norm(g_grads)
      metrics[f'grad_norm/{critic_net}'] = optax.tree.norm(c_grads)
      return state.replace(params=new, opt_state=opt_state,
                           rng=jax.random.key_data(key)), metrics
    return step
