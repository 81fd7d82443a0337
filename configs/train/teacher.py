"""Stage 1, the bidirectional next-shot teacher: `get_config('storyworld' | 'tiny' | 'wan_1_3b')`.

  python launch/train.py --config=configs/train/teacher.py:tiny --workdir=out/teacher_tiny

`tiny` trains a 2-layer DiT from scratch on StoryWorld (built and encoded on first use, random
tiny encoders) on CPU in about a minute. `wan_1_3b` is the reference fine-tune (DESIGN 4.5.1):
from Wan2.1-T2V-1.3B (`--config.teacher.init_from=.../diffusion_pytorch_model.safetensors`),
only self-attention params, AdamW lr 1e-5, betas (0, 0.999), wd 0.01, clip 10, bf16 compute
with fp32 master weights, per-block remat, on precomputed shards (`data.train_dir`, ...).
`storyworld` trains the preset's DiT from scratch on StoryWorld shards encoded by the stage-0
VAE (launch/reproduce.py chains it): every param, AdamW with momentum and warm-up (from
scratch, not a fine-tune), the 'snr_clamp' loss weighting (not the reference's bump, which
gives almost no weight at t > 700 where the student's steps and the DMD scores sit; not the
uniform weighting, under which the x0 head's lowest noise levels dominate: seventh attempt,
weights/storyworld_progress/HISTORY.md), whole 6-latent shots, and
4 stage-1a images of each story beside it (`teacher.image_mix`: keeps what stage 1a learned).
"""

import ml_collections

from configs.train import common


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  preset = (arg or 'tiny').strip()
  c = common.base(preset, 'teacher')
  tiny = preset == 'tiny'

  t = c.teacher = ml_collections.ConfigDict()
  t.init_from = ''            # '' = random init; a Wan/ShotStream file or our orbax dir
  t.target_shot = 'random'    # 'random' shot of the story, or its 'last'
  t.target_frames = c.sampling.shot_latent_frames   # latent frames of the target (padded / cut)
  # False: no context frames at all, each shot alone on its own caption (with target_frames=1:
  # images, a shot's first latent frame), a cheap pre-training of the same network.
  t.use_context = True
  t.context_dropout = 0.1
  t.prompt_dropout = 0.1
  t.weighting = 'bump'        # w(t): 'bump' | 'uniform' | 'snr_clamp' (teacher_stage.loss_weights)
  t.snr_gamma = 5.0           # 'snr_clamp': the cap on the x0 error's 1/sigma^2 factor
  t.eval_batches = 0          # held-out batches per evaluation (0 = the whole split)
  # Images (stage-1a examples: a shot's first latent frame, no context) of each story example
  # trained beside it, loss weight image_weight; 0 = the reference (teacher_stage docstring).
  t.image_mix = 0
  t.image_weight = 1.0

  if tiny:
    c.optim.teacher = common.adamw(lr=1e-3, clip=10.0, weight_decay=0.01)
  elif preset == 'storyworld':
    t.weighting = 'snr_clamp'   # stage 1a: as good at 10000 steps as 'uniform' at 14500+
    t.eval_batches = 4
    t.image_mix = 4           # 16 stories x 4 = 64 images a step, stage 1a's batch
    c.optim.teacher = common.adamw(lr=2e-3, clip=1.0, weight_decay=0.01, b1=0.9, b2=0.99)
    c.optim.teacher.warmup_steps = 100
    c.optim.teacher.ema_decay = 0.999   # samples from the EMA (train_loop.with_ema)
    c.train.num_steps = 2400
    c.optim.teacher.decay_steps = c.train.get_ref('num_steps')
    c.train.log_every = 25
    c.train.eval_every = 400
    c.train.checkpoint_every = 250
  else:
    c.optim.teacher = common.adamw(lr=1e-5, clip=10.0, weight_decay=0.01,
                                   trainable='self_attn')
    c.model.dtype = 'bfloat16'
    c.model.remat = True
  return c
