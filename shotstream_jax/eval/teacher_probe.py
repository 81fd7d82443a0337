"""Probe of a stage-1a / stage-1 teacher of a chain: x0 error by noise level, and its samples.

On `num` held-out examples (the stage's own example layout: single images for teacher_image,
[ground-truth context | last shot] for teacher), seed 0:
  * x0_mse[sigma]: mean squared error of the teacher's x0 prediction (x_t - sigma v) from
    x_t = (1 - sigma) x0 + sigma eps, in units of the data (`data_var` beside it);
    `x0_mse_by_frame` splits it by latent frame (a frame the teacher gets wrong stands out),
    `x0_mse_by_motion` by the target shot's camera motion (static / pan / zoom) and
    `x0_mse_by_frame_and_motion` by both (is a moving shot's first frame as good as a still
    one's?);
  * samples: `num_steps` Euler steps with CFG `guidance` (uncond = zero text rows, as stage 2)
    from fresh noise, decoded by the chain's VAE; `<out>/<stage>_samples.png` rows are examples
    (the first 16), columns: the first context frame (teacher), ground-truth frames, then
    sampled frames;
  * judge: every decoded sample parsed by the StoryWorld judge against its caption (`judge`
    in the JSON): the share that shows a scene (found), whose shape / colour / setting are the
    global caption's (subject), whose shape alone is (shape), whose framing is the shot
    caption's, and (teacher) the attribute agreement with the ground-truth shot, which holds
    the hidden attributes the context shows (identity); `not_found` counts what the judge
    missed (`judge.MISSES`).
Why: a teacher whose samples are not scenes makes every later stage meaningless, and this
answers that in a minute, before stage 2 starts. `launch/probe_teacher.py` is its command line.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from shotstream_jax.convert import vae as convert_vae
from shotstream_jax.data import precompute as pc
from shotstream_jax.data import storyworld as sw
from shotstream_jax.eval import judge as judge_lib
from shotstream_jax.io.video import to_uint8
from shotstream_jax import loading
from shotstream_jax.models import vae as vae_lib
from shotstream_jax.sampling import teacher as teacher_lib
from shotstream_jax.training import chain as chain_lib
from shotstream_jax.training import teacher_stage

SIGMAS = (0.2, 0.4, 0.6, 0.8, 1.0)
STAGES = ('teacher_image', 'teacher')


def probe(root: str, stage: str = 'teacher', num: int = 8, guidance: float = 2.5,
          num_steps: int = 50, out: str = 'out/probe', preset: str = 'storyworld',
          overrides=None) -> dict:
  """Writes `<out>/<stage>_probe.json` and `<stage>_samples.png`; returns the JSON's dict."""
  if stage not in STAGES:
    raise ValueError(f'stage: unknown {stage!r}; accepted: {", ".join(STAGES)}')
  chain = chain_lib.Chain(root, preset, overrides)
  c = chain.config(stage)
  m = c.model
  params = loading.load_network_params(chain.source(stage), 'teacher', m, field='root')
  ctx = teacher_stage.context_frames(c)
  frames = c.teacher.target_frames
  src = pc.PrecomputedSource(chain.heldout_dir)
  if num < 1 or num > len(src):
    raise ValueError(f'num: need 1..{len(src)} (the held-out split), got {num}')
  rng = np.random.default_rng(0)
  exs = [teacher_stage.make_example(src[i], rng, context_frames=ctx, target_frames=frames,
                                    target_shot='last') for i in range(num)]
  batch = {k: jnp.asarray(np.stack([e[k] for e in exs])) for k in exs[0]}
  rows = batch['text'].shape[1]
  cond = teacher_lib.FrameConcat(batch['latents'][:, :ctx], batch['frame_shot'],
                                 batch['frame_caption'] + rows * jnp.arange(num)[:, None])
  text = batch['text'].reshape((num * rows,) + batch['text'].shape[2:])
  x0 = batch['latents'][:, ctx:]
  noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
  velocity = jax.jit(lambda x, t: teacher_lib.frameconcat_velocity(m, params, cond, x, t, text))
  # The target shot's camera motion: a moving pattern is what the StoryWorld teachers get
  # wrong most (README, "Where: in shots whose camera moves").
  records = [src[i] for i in range(num)]
  text_of = pc._text   # pylint: disable=protected-access
  shot_captions = [text_of(r['shot_captions'][-1]) for r in records]
  motions = [sw.parse_shot_caption(caption)[1] for caption in shot_captions]
  cameras = np.asarray([sw.camera(m) if m else '' for m in motions])   # '': not stated
  x0_mse, x0_mse_by_frame, x0_mse_by_motion, x0_mse_by_frame_and_motion = {}, {}, {}, {}
  for s in SIGMAS:
    x_t = (1.0 - s) * x0 + s * noise
    pred = x_t - s * velocity(x_t, jnp.full((num,), 1000.0 * s))
    err = np.asarray(jnp.square(pred - x0))
    x0_mse[str(s)] = round(float(np.mean(err)), 4)
    per_frame = np.mean(err, axis=tuple(i for i in range(2, err.ndim)))   # [num, frames]
    x0_mse_by_frame[str(s)] = [round(float(v), 4) for v in per_frame.mean(0)]
    x0_mse_by_motion[str(s)] = sw.mean_by_camera(per_frame.mean(1), cameras)
    x0_mse_by_frame_and_motion[str(s)] = sw.mean_by_camera(per_frame, cameras)
  fn = teacher_lib.guided_velocity_fn(m, params, cond, text, jnp.zeros_like(text[:1]),
                                      guidance=guidance)
  sample = jax.jit(lambda z: teacher_lib.euler(fn, z, num_steps, c.sampling.shift, ())[1])
  x = sample(jax.random.normal(jax.random.PRNGKey(1), x0.shape))
  vae = vae_lib.WanVAE(c.vae)
  vae_params = convert_vae.load_vae(chain.vae_file, c.vae)
  decode = jax.jit(lambda z: vae_lib.decode(vae, vae_params, z))
  gt_frames = _decode_all(decode, x0)
  sample_frames = _decode_all(decode, x)
  scores = judge_samples(to_uint8(gt_frames), to_uint8(sample_frames),
                         [text_of(r['global_caption']) for r in records], shot_captions)
  every = max(1, vae_lib.pixel_frames(c.vae, frames) // 5)
  show = min(num, 16)
  cols = [gt_frames[:show, ::every], sample_frames[:show, ::every]]
  if ctx:
    cols.insert(0, _decode_all(decode, batch['latents'][:show, :1]))
  sheet = np.concatenate([np.concatenate(list(np.concatenate(cols, 1)[b]), 1)
                          for b in range(show)], 0)
  os.makedirs(out, exist_ok=True)
  png = os.path.join(out, f'{stage}_samples.png')
  img = Image.fromarray(to_uint8(sheet))
  img.resize((img.width * 3, img.height * 3), Image.NEAREST).save(png)
  result = {'stage': stage, 'num': num, 'guidance': guidance, 'num_steps': num_steps,
            'data_var': round(float(jnp.var(x0)), 4),
            'data_var_by_frame': [round(float(v), 4) for v in jnp.var(x0, axis=(0, 2, 3, 4))],
            'x0_mse': x0_mse, 'x0_mse_by_frame': x0_mse_by_frame,
            'x0_mse_by_motion': x0_mse_by_motion,
            'x0_mse_by_frame_and_motion': x0_mse_by_frame_and_motion,
            'motions': {c: int(np.sum(cameras == c)) for c in sw.CAMERAS},
            'sample_std': round(float(jnp.std(x)), 4), 'judge': scores, 'samples_png': png}
  with open(os.path.join(out, f'{stage}_probe.json'), 'w') as f:
    json.dump(result, f, indent=1)
  return result


def _decode_all(decode, z, batch: int = 16) -> np.ndarray:
  """Decoded frames of latents [N, F, ...] in batches of `batch` (one compiled shape)."""
  out = []
  for i in range(0, z.shape[0], batch):
    part = z[i:i + batch]
    pad = batch - part.shape[0]
    if pad:
      part = jnp.concatenate([part, jnp.zeros((pad,) + part.shape[1:], part.dtype)])
    out.append(np.asarray(decode(part))[:batch - pad])
  return np.concatenate(out)


def judge_samples(gt, samples, global_captions, shot_captions) -> dict:
  """Judge scores of sampled shots uint8 [N, T, H, W, 3] against their captions, and their
  attribute agreement with the ground-truth shots `gt` (module docstring)."""
  rows, reasons = [], {}
  for g, x, glob, cap in zip(gt, samples, global_captions, shot_captions):
    subject = judge_lib.parse_global_caption(glob)
    m = judge_lib.measure_shot(x.astype(np.float32), cap, subject)
    truth = judge_lib.measure_shot(g.astype(np.float32), cap, subject)
    if not m.found:
      reasons[m.miss] = reasons.get(m.miss, 0) + 1
    rows.append({'found': m.found, 'subject': bool(m.subject_ok),
                 'shape': m.found and m.attributes['shape'] == subject['shape'],
                 'framing': m.framing_ok,
                 'identity': judge_lib.attribute_agreement(truth, m)})
  out = {k: round(float(np.mean([r[k] for r in rows])), 3) for k in rows[0]}
  out['not_found'] = reasons
  return out
