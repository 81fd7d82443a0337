"""Stage 1a, image pre-training of the stage-1 teacher: `get_config('storyworld' | 'tiny')`.

The same network and flow loss as stage 1 (configs/train/teacher.py), on single images: each
example is the first latent frame of one shot, alone on its own caption, with no context
(`teacher.use_context=False`, `teacher.target_frames=1`). An image costs 16 tokens where a
stage-1 example costs 192, so on the 2-core CPU this sees ~10x more scenes per second: it is
where the teacher learns what StoryWorld looks like; stage 1 (`teacher.init_from` = this
workdir, set by training/chain.py) then learns shots, motion and the context.
"""

import ml_collections

from configs.train import teacher


def get_config(arg: str = 'storyworld') -> ml_collections.ConfigDict:
  preset = (arg or 'storyworld').strip()
  c = teacher.get_config(preset)
  c.teacher.use_context = False
  c.teacher.target_frames = 1
  c.teacher.image_mix = 0      # its examples are the images
  c.data.batch_size = 64
  c.train.num_steps = 10000 if preset == 'storyworld' else 4
  # Constant after warm-up: a run extended to more steps (resumed from its last checkpoint)
  # is the run that had the larger num_steps from the start.
  del c.optim.teacher['decay_steps']   # a reference to train.num_steps: assigning would set it
  c.optim.teacher.decay_steps = 0
  c.train.eval_every = 0       # held-out flow MSE is stage 1's; this stage is judged by its samples
  c.train.checkpoint_every = 500
  c.optim.teacher.lr = 2e-3    # 5e-4 memorised 8 images 4x slower (README: teacher)
  c.optim.teacher.warmup_steps = 50
  c.optim.teacher.ema_decay = 0.999 if preset == 'storyworld' else 0.0
  return c
