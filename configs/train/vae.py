"""Stage 0, the VAE trained on StoryWorld pixels: `get_config('storyworld' | 'tiny')`.

  python launch/train.py --config=configs/train/vae.py:storyworld --workdir=out/sw/vae

The published chain starts from Wan's pretrained VAE; the `storyworld` preset trains its own
(configs/shotstream.py:storyworld vae section; training/vae_stage.py) on 5-frame windows and
whole 11-frame shots.
`tiny` is the same stage on the tiny VAE and 9-frame shots, for tests.
"""

import ml_collections

from configs import data as data_configs
from configs.train import common


def get_config(arg: str = 'storyworld') -> ml_collections.ConfigDict:
  preset = (arg or 'storyworld').strip()
  if preset not in ('storyworld', 'tiny'):
    raise ValueError(f'config preset: unknown preset {preset!r} for the VAE stage; accepted: '
                     'storyworld, tiny')
  c = common.base(preset, 'vae')
  c.data.source = 'storyworld'
  c.data.storyworld = data_configs.get_config(preset).storyworld
  if preset == 'tiny':   # the tiny VAE's Wan statistics would hide the scale: train with none
    z = c.vae.z_dim
    c.vae.latent_mean, c.vae.latent_std = (0.0,) * z, (1.0,) * z

  v = c.vae_train = ml_collections.ConfigDict()
  v.l1 = 1.0                  # reconstruction: l1 * |y - x| + mse * (y - x)^2, x in [-1, 1]
  v.mse = 1.0
  v.latent_l2 = 1e-3          # + latent_l2 * mean(mu^2): bounds the latent scale
  # + temporal_consistency * latent drift: a later latent stays the latent of its last frame
  # encoded alone, so latents carry no time position (training/vae_stage.py docstring).
  # storyworld: held-out drift 1.79 -> 0.04 at equal PSNR (eighth attempt:
  # weights/storyworld_progress/HISTORY.md).
  v.temporal_consistency = 0.1 if preset == 'storyworld' else 0.0
  v.edge = 0.0                # + edge x L1 of the error's spatial differences (sharp corners)
  # + latent_mix x the error of decoding a mix of two clips' latents against the mix of their
  # pixels (training/vae_stage.latent_mix_error: an unsure DiT's averaged latent then decodes
  # as a blend, not as a third palette colour)
  v.latent_mix = 0.0
  v.init_gain = 3.0 ** 0.5    # kernels x gain at init (torch init / sqrt 3 -> variance 1/fan_in)
  v.clip_frames = 5           # every example: a random window of this many frames (4k+1) ...
  v.full_shots = 2            # ... and the first `full_shots` of a batch also their whole shot
  v.eval_batches = 4          # held-out batches per evaluation (0 = the whole split)
  v.stat_clips = 256          # training shots measuring the latent statistics at export
  v.init_from = ''            # '' = random init; a stage-0 workdir or exported VAE file (stage 0b)
  v.fresh_decoder = False     # stage 0b: a new decoder (e.g. vae.decoder_base_dim wider), encoder kept

  c.optim.vae = common.adamw(lr=2e-3, clip=1.0, weight_decay=0.0, b1=0.9, b2=0.99)
  c.optim.vae.warmup_steps = 50 if preset == 'storyworld' else 1
  c.data.batch_size = 16 if preset == 'storyworld' else 4
  c.train.num_steps = 2000 if preset == 'storyworld' else 20
  c.optim.vae.decay_steps = c.train.get_ref('num_steps')   # cosine to the end of training
  c.train.log_every = 25 if preset == 'storyworld' else 1
  c.train.eval_every = 400 if preset == 'storyworld' else 0
  c.train.checkpoint_every = 250 if preset == 'storyworld' else 10
  return c
