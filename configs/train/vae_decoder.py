"""Stage 0b, the stage-0 VAE's decoder trained on with its encoder frozen:
`get_config('storyworld' | 'tiny')`.

  python launch/train.py --config=configs/train/vae_decoder.py:storyworld \
      --config.vae_train.init_from=out/sw/vae --workdir=out/sw/vae_decoder

Why a stage of its own: every generated video is decoded, so the decoder bounds what any DiT
stage can show (the round trip of 32 held-out stories scored 0.94 against the ground truth's
1.00 after stage 0, shapes of the small wide-shot protagonists being most of the loss). The
encoder, and with it every latent the DiT stages train on, stays bit for bit what stage 0 made:
the export measures the same latent statistics from the same clips, so the precomputed shards
stay valid and this stage can run at any point of the chain. Whole shots get a larger share of
the batch than in stage 0 (`vae_train.full_shots`), since generation decodes whole shots.
"""

import ml_collections

from configs.train import vae


def get_config(arg: str = 'storyworld') -> ml_collections.ConfigDict:
  preset = (arg or 'storyworld').strip()
  c = vae.get_config(preset)
  c.optim.vae.trainable = r'^(decoder|post_quant_conv)/'   # the encoder's latents stay fixed
  c.vae_train.full_shots = 4 if preset == 'storyworld' else 2
  c.optim.vae.lr = 1e-3
  c.optim.vae.warmup_steps = 20 if preset == 'storyworld' else 1
  c.train.num_steps = 1500 if preset == 'storyworld' else 10
  return c
