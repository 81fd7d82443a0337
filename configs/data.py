"""Data configuration: `get_config('tiny' | 'storyworld' | 'default')`.

Sections:
  storyworld  procedural multi-shot videos with known ground truth (data/storyworld.py)
  loader      the grain pipeline (data/loader.py)

`tiny` is sized for tests and CPU training in minutes: 32x32 frames, 9 pixel frames per shot
(= 3 latent frames after the VAE's 4x temporal compression = one student chunk).
`storyworld` is the data of the embedded default model (configs/shotstream.py:storyworld):
32x32, 11 frames per shot (6 latent frames = 2 chunks after its VAE's 2x temporal compression),
2-4 shots, 2000 training stories.
"""

import ml_collections

PRESETS = ('tiny', 'storyworld', 'default')


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  if arg not in PRESETS:
    raise ValueError(f'configs/data.py: unknown preset {arg!r}; accepted: {", ".join(PRESETS)}')
  c = ml_collections.ConfigDict()

  s = c.storyworld = ml_collections.ConfigDict()
  s.height = 64 if arg == 'default' else 32
  s.width = 64 if arg == 'default' else 32
  # tk+1 for the VAE's temporal factor t: 3 latents at tiny (t=4), 6 at storyworld (t=2)
  s.frames_per_shot = {'tiny': 9, 'storyworld': 11, 'default': 21}[arg]
  s.min_shots = 2
  s.max_shots = 5 if arg == 'default' else 4
  s.num_train = {'tiny': 64, 'storyworld': 2000, 'default': 20000}[arg]
  s.num_heldout = {'tiny': 16, 'storyworld': 64, 'default': 500}[arg]
  s.seed = 0                   # the whole dataset is a function of this seed
  s.supersample = 2            # anti-aliasing: render at this multiple, then box-average

  ld = c.loader = ml_collections.ConfigDict()
  ld.batch_size = 4
  ld.seed = 0
  ld.shuffle = True
  ld.num_epochs = None         # None: repeat forever
  ld.drop_remainder = True
  return c
