"""Stage 1: the bidirectional next-shot teacher (DESIGN 4.5.1).

One training example is one target shot s of a story, laid out on the frame axis as

    [ C clean context latents from shots < s | T target latents ]      C = model.context_frames

(C = 0 with teacher.use_context=False: shots without context, images with T = 1: pre-training.)

The context frames are the reference's picks (context.choose_context: budget split over earlier
shots, round(linspace) inside each, each frame encoded alone); a frame from shot j carries RoPE
shot id j and attends to shot j's caption; the target frames carry `last id + 1` and their own
caption. Shot 0 has all-zero context with id 0 (target id 1). Captions go through a per-example
table of C + 1 rows (context.choose_context's `caption_shots`), so shapes never change.

Loss: one timestep per example, shared by every frame (context included, as the reference), t
uniform over the shifted grid; only target frames are noised; flow loss ||v - (noise - x0)||^2 on
the real target frames, weighted by w(t) (a Gaussian bump at t=500, min-subtracted, mean 1 over
the grid, so w(1000) = 0). With probability `context_dropout` the context is zeroed (ids 0,
target id 1, as a first shot); with probability `prompt_dropout` every caption row is zeroed.
Which params train is `optim.teacher.trainable` (the reference: 'self_attn').

Image mix (`teacher.image_mix` = m > 0, not in the reference): every example also carries m
images of its story (a random shot's first latent frame, no context, its own caption: stage
1a's examples) under 'images', and the loss adds `teacher.image_weight` x their flow loss. Why:
a from-scratch stage 1 started from the stage-1a image model unlearns its images while it
learns to read a context (held-out flow MSE 3.4 at step 0, then samples 5x less often
recognisable than stage 1a's), and an image costs 16 tokens where a shot example costs 192.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from shotstream_jax import context as context_lib
from shotstream_jax.models import dit
from shotstream_jax.sampling import schedule
from shotstream_jax.training import inputs as inputs_lib
from shotstream_jax.training import sharding as sharding_lib
from shotstream_jax.training import stage as stage_lib

TARGET_SHOT = ('random', 'last')
WEIGHTINGS = ('bump', 'uniform', 'snr_clamp')


def loss_weights(timesteps: np.ndarray, weighting: str = 'bump',
                 snr_gamma: float = 5.0) -> np.ndarray:
  """w(t) on the grid, normalised to mean 1 (`teacher.weighting`):

    bump       exp(-2((t-500)/1000)^2) minus its minimum (the reference);
    uniform    1;
    snr_clamp  min(1, snr_gamma sigma^2), sigma = t / 1000. The flow loss of an x0-predicting
               DiT is its x0 error / sigma^2, so low-noise steps, where the network only has
               to copy its input, would weigh up to 1/x0_min_sigma^2 = 400x the rest; this
               caps that factor at snr_gamma (Min-SNR weighting, Hang et al. 2023, applied
               to the x0 error) and leaves sigma >= 1/sqrt(snr_gamma) unchanged.
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f'teacher.weighting: unknown {weighting!r}; accepted: {", ".join(WEIGHTINGS)}')
  t = np.asarray(timesteps, np.float64)
  if weighting == 'uniform':
    return np.ones_like(t)
  if weighting == 'snr_clamp':
    if snr_gamma <= 0:
      raise ValueError(f'teacher.snr_gamma: must be > 0, got {snr_gamma}')
    w = np.minimum(1.0, snr_gamma * (t / 1000.0) ** 2)
    return w / w.mean()
  w = np.exp(-2.0 * ((t - 500.0) / 1000.0) ** 2)
  w = w - w.min()
  return w / w.mean()


def make_example(record, rng: np.random.Generator, *, context_frames: int, target_frames: int,
                 target_shot: str = 'random'):
  """One teacher example (fixed shapes) from a PrecomputedSource record (pad_text=True)."""
  if target_shot not in TARGET_SHOT:
    raise ValueError(f'teacher.target_shot: unknown {target_shot!r}; accepted: '
                     f'{", ".join(TARGET_SHOT)}')
  shot_frames = np.asarray(record['shot_frames'])
  num_shots = len(shot_frames)
  s = int(rng.integers(num_shots)) if target_shot == 'random' else num_shots - 1
  choice = (context_lib.choose_context(shot_frames[:s].tolist(), context_frames)
            if context_frames else context_lib.no_context(s, 0))
  latents = np.asarray(record['latents'])
  c, t = context_frames, target_frames
  x = np.zeros((c + t,) + latents.shape[1:], np.float32)
  if choice.frame_indices:
    cand = np.asarray(record['ctx_frame_index'])
    rows = np.searchsorted(cand, choice.frame_indices)
    if np.any(rows >= len(cand)) or np.any(cand[np.minimum(rows, len(cand) - 1)] !=
                                           choice.frame_indices):
      raise ValueError(f'example {record.get("id")}: context frames {choice.frame_indices} are '
                       'not among the precomputed candidates; precompute with the same '
                       'model.context_frames')
    x[:c] = np.asarray(record['ctx_latents'])[rows]
  target = latents[np.asarray(record['latent_shot']) == s][:t]
  x[c:c + len(target)] = target
  mask = np.zeros(c + t, np.float32)
  mask[c:c + len(target)] = 1.0
  return {
      'latents': x,
      'frame_shot': np.asarray(choice.ctx_shot + (choice.gen_shot,) * t, np.int32),
      'frame_caption': np.asarray(choice.ctx_caption + (choice.gen_caption,) * t, np.int32),
      'target_mask': mask,
      'text': np.asarray(record['text'], np.float32)[list(choice.caption_shots)],
  }


def make_mixed_example(record, rng: np.random.Generator, *, images: int, **video_kwargs):
  """`make_example` (video) plus `images` stage-1a examples of the same story under 'images'
  (each a random shot's first latent frame, no context, target_frames 1), stacked [images, ...]."""
  ex = make_example(record, rng, **video_kwargs)
  if images:
    imgs = [make_example(record, rng, context_frames=0, target_frames=1) for _ in range(images)]
    ex['images'] = {k: np.stack([e[k] for e in imgs]) for k in imgs[0]}
  return ex


def linear_baseline(x0, noise, sigma, mean, var):
  """Per-frame MSE [B, F] of the best *linear* predictor of v = noise - x0 from x_t that knows
  only the data's per-channel mean and variance (x0 ~ N(mean, var) per channel): the floor any
  trained teacher must beat (a teacher above it has learned nothing about the content)."""
  s = sigma[:, None, None, None, None]
  x_t = (1.0 - s) * x0 + s * noise
  gain = (s - (1.0 - s) * var) / ((1.0 - s) ** 2 * var + s * s)
  v_hat = -mean + gain * (x_t - (1.0 - s) * mean)
  return jnp.mean(jnp.square(v_hat - (noise - x0)), axis=(2, 3, 4))


def flow_loss(model, params, batch, key, *, context_frames: int, grid_sigmas, weights,
              context_dropout: float = 0.0, prompt_dropout: float = 0.0,
              num_train_timesteps: int = 1000, latent_stats=None):
  """(weighted loss, metrics) of a teacher batch; all randomness from `key`.

  `latent_stats` (per-channel mean, variance) adds `baseline_mse`: `linear_baseline` on the
  same draws, for comparison with `flow_mse`."""
  x0 = batch['latents']
  b, f = x0.shape[:2]
  k_t, k_n, k_c, k_p = jax.random.split(key, 4)
  idx = jax.random.randint(k_t, (b,), 0, grid_sigmas.shape[0])
  sigma = grid_sigmas[idx]
  w = weights[idx]
  noise = jax.random.normal(k_n, x0.shape, x0.dtype)
  is_target = (jnp.arange(f) >= context_frames)[None, :]                       # [1, F]
  bc = lambda a: a[:, :, None, None, None]
  s5 = sigma[:, None, None, None, None]
  x_t = jnp.where(bc(is_target), (1.0 - s5) * x0 + s5 * noise, x0)
  frame_shot, frame_caption, text = batch['frame_shot'], batch['frame_caption'], batch['text']
  if context_dropout > 0:
    drop = jax.random.bernoulli(k_c, context_dropout, (b,))[:, None]           # [B, 1]
    ctx = drop & ~is_target
    x_t = jnp.where(bc(ctx), 0.0, x_t)
    frame_shot = jnp.where(drop, is_target.astype(jnp.int32), frame_shot)
    frame_caption = jnp.where(ctx, frame_caption[:, context_frames:context_frames + 1],
                              frame_caption)
  if prompt_dropout > 0:
    drop = jax.random.bernoulli(k_p, prompt_dropout, (b,))
    text = jnp.where(drop[:, None, None, None], 0.0, text)
  table, frame_caption = inputs_lib.flatten_tables(text, frame_caption)
  v = model.apply({'params': params}, x_t,
                  jnp.broadcast_to((sigma * num_train_timesteps)[:, None], (b, f)), table,
                  frame_shot=frame_shot, frame_caption=frame_caption, attention='bidirectional')
  err = jnp.mean(jnp.square(v - (noise - x0)), axis=(2, 3, 4))                # [B, F]
  mask = batch['target_mask']
  per_example = jnp.sum(err * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
  loss = jnp.mean(w * per_example)
  metrics = {'flow_mse': jnp.mean(per_example), 'timestep': jnp.mean(sigma) * 1000.0}
  if latent_stats is not None:
    base = linear_baseline(x0, noise, sigma, *latent_stats)
    metrics['baseline_mse'] = jnp.mean(
        jnp.sum(base * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0))
  return loss, metrics


def context_frames(config) -> int:
  """Clean context frames of a teacher example: `model.context_frames`, 0 without context."""
  return config.model.context_frames if config.teacher.use_context else 0


class TeacherStage(stage_lib.PrecomputedStage):
  """Stage 1: one network, 'teacher'."""
  networks = ('teacher',)

  def __init__(self, config, workdir: str):
    super().__init__(config, workdir)
    tc = config.teacher
    self.model = dit.WanDiT(config.model)
    sigmas = schedule.shifted_grid(config.sampling.num_train_timesteps, config.sampling.shift)
    self.grid_sigmas = jnp.asarray(sigmas, jnp.float32)
    self.weights = jnp.asarray(
        loss_weights(sigmas * config.sampling.num_train_timesteps, tc.weighting,
                     tc.get('snr_gamma', 5.0)), jnp.float32)
    for name in ('context_dropout', 'prompt_dropout'):
      if not 0.0 <= tc[name] < 1.0:
        raise ValueError(f'teacher.{name}: must be in [0, 1), got {tc[name]}')
    if tc.target_frames < 1:
      raise ValueError(f'teacher.target_frames: must be >= 1, got {tc.target_frames}')
    if tc.image_mix < 0 or tc.image_weight < 0:
      raise ValueError(f'teacher.image_mix / image_weight: must be >= 0, got {tc.image_mix} / '
                       f'{tc.image_weight}')
    ctx = context_frames(config)
    self.train_dir, self.heldout_dir = inputs_lib.prepare(config.data, config, workdir)
    self.latent_stats = inputs_lib.latent_stats(self.train_dir)
    self.eval_limit = tc.eval_batches
    self.example = functools.partial(
        make_example, context_frames=ctx,
        target_frames=tc.target_frames, target_shot=tc.target_shot)
    self.train_example = functools.partial(
        make_mixed_example, images=tc.image_mix, context_frames=ctx,
        target_frames=tc.target_frames, target_shot=tc.target_shot)
    loss = functools.partial(flow_loss, self.model, grid_sigmas=self.grid_sigmas,
                             weights=self.weights,
                             num_train_timesteps=config.sampling.num_train_timesteps)
    self._loss = functools.partial(loss, context_frames=ctx)
    self._image_loss = functools.partial(loss, context_frames=0)

  def boxed_shapes(self):
    return {'teacher': sharding_lib.dit_boxed_shapes(self.config.model)}

  def init_params(self, key, shardings):
    """Random init (Wan's initializers) or `teacher.init_from` (any format of loading.py)."""
    return {'teacher': self.dit_params(self.config.teacher.init_from, 'teacher',
                                       'teacher.init_from', key, shardings['teacher'])}

  def loss(self, params, batch, key):
    tc = self.config.teacher
    dropout = dict(context_dropout=tc.context_dropout, prompt_dropout=tc.prompt_dropout)
    if 'images' not in batch:   # the reference's loss (draws as without image_mix)
      return self._loss(params['teacher'], batch, key, **dropout)
    k_video, k_image = jax.random.split(key)
    video = {k: v for k, v in batch.items() if k != 'images'}
    loss, metrics = self._loss(params['teacher'], video, k_video, **dropout)
    # [B, m, ...] -> [B * m, ...]: m images per story example, one flow loss over all of them.
    images = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), batch['images'])
    image_loss, image_metrics = self._image_loss(params['teacher'], images, k_image, **dropout)
    metrics = dict(metrics, image_flow_mse=image_metrics['flow_mse'], video_loss=loss)
    return loss + tc.image_weight * image_loss, metrics

  def eval_metrics(self, params, batch, key):
    loss, aux = self._loss(params['teacher'], batch, key, latent_stats=self.latent_stats)
    return {'loss': loss, 'flow_mse': aux['flow_mse'], 'baseline_mse': aux['baseline_mse']}
