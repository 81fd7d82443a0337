"""Shared base of the training configs (configs/train/<stage>.py build on `base(preset, stage)`).

Sections on top of configs/shotstream.py (model, vae, text, sampling):
  mesh, logical_axis_rules   device mesh sizes and logical-name -> mesh-axis rules
  data                       where examples come from, batch size (global), loader seed
  optim.<network>            AdamW per network: lr, betas, eps, weight decay, clip, trainable
  train                      steps, logging / eval / checkpoint intervals, seeds, NaN policy
"""

import ml_collections

from configs import data as data_configs
from configs import shotstream
from shotstream_jax.models import vae as vae_lib

# Params: FSDP over 'fsdp' on the model width, tensor-parallel on heads / MLP; the stacked
# layer axis and modulation tables replicated. 'batch' is the activations' leading axis.
LOGICAL_AXIS_RULES = (
    ('batch', ('data', 'fsdp')),
    ('layers', None),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('norm', None),
)


def adamw(lr: float, clip: float, weight_decay: float = 0.01, trainable: str = '',
          b1: float = 0.0, b2: float = 0.999) -> ml_collections.ConfigDict:
  """One network's optimizer; defaults are the reference's (betas (0, 0.999), wd 0.01)."""
  return ml_collections.ConfigDict(dict(
      lr=lr, b1=b1, b2=b2, eps=1e-8, weight_decay=weight_decay, clip=clip,
      warmup_steps=0,          # linear warm-up from 0
      decay_steps=0,           # 0: constant after warm-up; > 0: cosine decay ending here ...
      final_lr_fraction=0.05,  # ... at lr * this
      ema_decay=0.0,           # > 0: keep an EMA of the weights (loaded and evaluated instead)
      trainable=trainable))    # trainable: regex on 'blocks/self_attn/q/kernel'


def base(preset: str, stage: str) -> ml_collections.ConfigDict:
  c = shotstream.get_config(preset)
  c.stage = stage

  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))   # -1: the rest
  c.logical_axis_rules = LOGICAL_AXIS_RULES

  d = c.data = ml_collections.ConfigDict()
  d.source = 'storyworld' if preset == 'tiny' else 'precomputed'
  # StoryWorld sizes (source=storyworld; the VAE stage; the storyworld chain's precompute).
  d.storyworld = data_configs.get_config('storyworld' if preset == 'storyworld' else 'tiny'
                                         ).storyworld
  if preset == 'tiny':   # every stage trains (and generation runs) at the data's size
    sw = d.storyworld
    c.sampling.height, c.sampling.width = sw.height, sw.width
    c.sampling.shot_latent_frames = c.sampling.local_frames = vae_lib.latent_frames(
        c.vae, sw.frames_per_shot)
  d.dir = ''                  # storyworld: where it is built and encoded ('' = <workdir>/data)
  d.train_dir = ''            # precomputed: launch/precompute.py output of the train split
  d.heldout_dir = ''          # precomputed: ... of a held-out split
  d.batch_size = {'tiny': 4, 'storyworld': 16}.get(preset, 8)   # global, over all processes
  d.seed = 0
  d.shuffle = True
  d.read_threads = 2
  d.prefetch = 4

  c.optim = ml_collections.ConfigDict()

  t = c.train = ml_collections.ConfigDict()
  small = preset in ('tiny', 'storyworld')
  t.num_steps = 300 if small else 10000
  t.log_every = 10 if small else 50
  t.eval_every = 100 if small else 1000   # 0: no held-out evaluation
  t.eval_seed = 1234
  t.checkpoint_every = 100 if small else 500
  t.keep_checkpoints = 3
  t.seed = 0                  # init and the train state's PRNG key
  t.skip_nonfinite = False    # False: NaN/Inf stops the run; True: skip that step
  t.progress = True
  t.tensorboard = True
  return c
