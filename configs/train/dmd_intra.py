"""Stage 3, intra-shot DMD with ground-truth history: `get_config('storyworld' | 'tiny' | 'wan_1_3b')`.

  python launch/train.py --config=configs/train/dmd_intra.py:tiny --workdir=out/dmd_intra_tiny

`wan_1_3b` is the reference (DESIGN 4.5.3): generator = the ODE-initialised causal student
(`--config.dmd.generator_init=out/ode_init`), critic and real score = the stage-1 teacher
(`--config.dmd.teacher_init=out/teacher`), real guidance 3, score timesteps in [20, 980],
generator lr 2e-6 / clip 1, critic lr 4e-7 / clip 10, betas (0, 0.999), one generator update
per 6 steps. `tiny` runs on CPU on StoryWorld with random encoders (3-frame shots, one chunk).
`storyworld` distils the stage-2 student on the stage-1 teacher at CPU scale: 2-chunk shots,
larger learning rates, a generator update every 3 steps.
`dmd_config(preset, stage)` is shared with configs/train/dmd_inter.py.
"""

import ml_collections

from configs.train import common
from shotstream_jax.models import lora as lora_lib


def dmd_config(preset: str, stage: str) -> ml_collections.ConfigDict:
  c = common.base(preset, stage)
  tiny = preset == 'tiny'
  c.train.eval_every = 0      # DMD has no held-out loss; judge samples instead

  d = c.dmd = ml_collections.ConfigDict()
  d.generator_init = ''       # '' = the teacher's weights; else our workdir / orbax / Wan file
  d.critic_init = ''          # '' = the teacher's weights (the reference)
  d.teacher_init = ''         # '' = random init (tiny smoke runs only)
  d.generator_every = {'tiny': 2, 'storyworld': 3}.get(preset, 6)   # update when step % N == 0
  d.real_guidance = 3.0       # real score: cond + g (cond - uncond)
  d.min_timestep = 20.0       # score / critic timesteps clamped to [min, max]
  d.max_timestep = 980.0
  d.negative = 'auto'         # uncond text: 'precomputed' negative prompt, 'zeros', or 'auto'
  d.target_shot = 'last'      # stage 3: which shot of a story is generated ('last' | 'random')
  # stage 4: shots per rolled-out story. storyworld: 4, its longest stories (eleventh attempt:
  # with 3, stage 4 held identity over 8 shots worse than stage 3; with 4, as well: README).
  d.num_shots = {'tiny': 2, 'storyworld': 4}.get(preset, 5)
  d.vae_path = ''             # stage 4 on precomputed data: the VAE that encoded it

  lo = c.lora = ml_collections.ConfigDict()
  lo.enabled = False
  lo.rank = 256 if preset == 'wan_1_3b' else 4
  lo.alpha = 256.0 if preset == 'wan_1_3b' else 4.0
  lo.targets = lora_lib.DEFAULT_TARGETS   # regex over Dense paths: every Linear of every block

  if tiny:
    # StoryWorld tiny: 32x32 frames, 9 frames = 3 latent frames per shot (one chunk; common.py).
    c.data.batch_size = 2
    c.train.num_steps = 20
    c.optim.generator = common.adamw(lr=1e-4, clip=1.0)
    c.optim.critic = common.adamw(lr=1e-4, clip=10.0)
  elif preset == 'storyworld':
    d.negative = 'zeros'      # the from-scratch teacher learned "no prompt" as zero rows
    d.real_guidance = 0.0     # no CFG, as the ODE targets (configs/train/ode_init.py)
    c.data.batch_size = 8
    c.train.num_steps = 450   # tenth attempt (150 before): stage 4 gains from a longer stage 3 + 4
    c.train.log_every = 12
    c.train.checkpoint_every = 30
    c.optim.generator = common.adamw(lr=3e-5, clip=1.0)
    c.optim.critic = common.adamw(lr=3e-5, clip=10.0)
  else:
    c.optim.generator = common.adamw(lr=2e-6, clip=1.0)
    c.optim.critic = common.adamw(lr=4e-7, clip=10.0)
    c.model.dtype = 'bfloat16'
    c.model.remat = True
  return c


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  return dmd_config((arg or 'tiny').strip(), 'dmd_intra')
