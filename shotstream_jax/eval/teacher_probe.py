"""Probe of a stage-1a / stage-1 teacher of a chain: x0 error by noise level, and its samples.

On `num` held-out examples (the stage's own example layout: single images for teacher_image,
[ground-truth context | last shot] for teacher), seed 0:
  * x0_mse[sigma]: mean squared error of the teacher's x0 prediction (x_t - sigma v) from
    x_t = (1 - sigma) x0 + sigma eps, in units of the data (`data_var` beside it);
  * samples: `num_steps` Euler steps with CFG `guidance` (uncond = zero text rows, as stage 2)
    from fresh noise, decoded by the chain's VAE; `<out>/<stage>_samples.png` rows are examples,
    columns: the first context frame (teacher), ground-truth frames, then sampled frames.
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
from shotstream_jax.io.video import to_uint8
from shotstream_jax.models import vae as vae_lib
from shotstream_jax.sampling import teacher as teacher_lib
from shotstream_jax.training import chain as chain_lib
from shotstream_jax.training import init as init_lib
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
  params = init_lib.load_network_params(chain.source(stage), 'teacher', m, field='root')
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
  x0_mse = {}
  for s in SIGMAS:
    x_t = (1.0 - s) * x0 + s * noise
    pred = x_t - s * velocity(x_t, jnp.full((num,), 1000.0 * s))
    x0_mse[str(s)] = round(float(jnp.mean(jnp.square(pred - x0))), 4)
  fn = teacher_lib.guided_velocity_fn(m, params, cond, text, jnp.zeros_like(text[:1]))
  sample = jax.jit(lambda z: teacher_lib.euler_cfg(fn, z, guidance, num_steps,
                                                   c.sampling.shift, ())[1])
  x = sample(jax.random.normal(jax.random.PRNGKey(1), x0.shape))
  vae = vae_lib.WanVAE(c.vae)
  vae_params = convert_vae.load_vae(chain.vae_file, c.vae)
  decode = jax.jit(lambda z: vae_lib.decode(vae, vae_params, z))
  every = max(1, (4 * (frames - 1) + 1) // 5)
  cols = [np.asarray(decode(x0))[:, ::every], np.asarray(decode(x))[:, ::every]]
  if ctx:
    cols.insert(0, np.asarray(decode(batch['latents'][:, :1])))
  sheet = np.concatenate([np.concatenate(list(np.concatenate(cols, 1)[b]), 1)
                          for b in range(num)], 0)
  os.makedirs(out, exist_ok=True)
  png = os.path.join(out, f'{stage}_samples.png')
  img = Image.fromarray(to_uint8(sheet))
  img.resize((img.width * 3, img.height * 3), Image.NEAREST).save(png)
  result = {'stage': stage, 'num': num, 'guidance': guidance, 'num_steps': num_steps,
            'data_var': round(float(jnp.var(x0)), 4), 'x0_mse': x0_mse,
            'sample_std': round(float(jnp.std(x)), 4), 'samples_png': png}
  with open(os.path.join(out, f'{stage}_probe.json'), 'w') as f:
    json.dump(result, f, indent=1)
  return result
