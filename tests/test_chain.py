"""The reproduce chain end to end at a miniature size (every step, 2 training steps each):
the model directory it writes loads as the embedded model and generates; a rerun skips
everything; a killed step resumes."""

import json
import os

import numpy as np
from safetensors import numpy as st_numpy

from shotstream_jax import embedded
from shotstream_jax import pipeline
from shotstream_jax.convert import dit as dit_convert
from shotstream_jax.training import chain as chain_lib
from shotstream_jax.training import init as init_lib

# A shrunken storyworld preset: a 1-layer DiT, a base-4 VAE, 8 + 4 stories, 2 steps a stage.
OVERRIDES = {
    'data': {'num_train': 8, 'num_heldout': 4},
    'model': {'model.dim': 32, 'model.num_layers': 1, 'model.num_heads': 1,
              'model.ffn_dim': 64, 'vae.base_dim': 4},
    'vae': {'train.num_steps': 2, 'train.eval_every': 2, 'vae_train.stat_clips': 4,
            'optim.vae.warmup_steps': 1},
    'teacher_image': {'train.num_steps': 2, 'data.batch_size': 4,
                      'optim.teacher.warmup_steps': 1},
    'teacher': {'train.num_steps': 2, 'train.eval_every': 2, 'data.batch_size': 4,
                'optim.teacher.warmup_steps': 1},
    'ode': {'train.num_steps': 2, 'train.eval_every': 0, 'data.batch_size': 2},
    'dmd_intra': {'train.num_steps': 2, 'data.batch_size': 2},
    'dmd_inter': {'train.num_steps': 2, 'data.batch_size': 2, 'dmd.num_shots': 2},
}


def test_chain_end_to_end(tmp_path):
  root = str(tmp_path / 'chain')
  logs = []
  # First run stops after the teacher (as a kill would), the second finishes.
  chain_lib.run_chain(root, 'storyworld', OVERRIDES, steps=chain_lib.STEPS[:6], log=logs.append)
  times = chain_lib.run_chain(root, 'storyworld', OVERRIDES, log=logs.append)
  assert list(times) == list(chain_lib.STEPS)
  assert any('teacher done' in l for l in logs)           # not trained twice
  again = []
  chain_lib.run_chain(root, 'storyworld', OVERRIDES, log=again.append)
  assert len(again) == len(chain_lib.STEPS) and all('skipped' in l for l in again)

  ch = chain_lib.Chain(root, 'storyworld', OVERRIDES)
  manifest = embedded.read_manifest(ch.model_dir)
  assert manifest['preset'] == 'storyworld' and set(manifest['bytes']) == set(
      embedded.FILES.values())
  config = ch.model_config()
  pipe = pipeline.ShotStreamPipeline.load(config, **embedded.paths(ch.model_dir))
  video = pipe.generate({'global_caption': 'A red circle in a street. ',
                         'shot1': 'Wide shot of the circle; the camera is static.',
                         'shot2': 'Close-up shot of the circle; the camera pans left.'})
  assert video.shape == (42, 32, 32, 3) and video.dtype == np.uint8
  with open(os.path.join(ch.path('precomputed', 'train'), 'meta.json')) as f:
    meta = json.load(f)
  assert meta['num_examples'] == 8 and meta['weights']['vae'].endswith('vae.safetensors')

  # A carried stage-0 export (as weights/storyworld_progress holds) finishes stage 0 in a new
  # root: the next steps run on it, the VAE is not trained again, the bytes are the carried ones.
  carry = tmp_path / 'carry' / 'export'
  carry.mkdir(parents=True)
  for name in ('vae.safetensors', 'vae.stats.json'):
    carry.joinpath(name).write_bytes(open(ch.path('export', name), 'rb').read())
  fresh, later = str(tmp_path / 'fresh'), []
  chain_lib.run_chain(fresh, 'storyworld', OVERRIDES, steps=['vae', 'vae_export', 'text'],
                      log=later.append, carry=str(tmp_path / 'carry'))
  assert 'carried in' in later[0] and 'vae done' in later[1] and 'vae_export done' in later[2]
  assert not os.path.exists(os.path.join(fresh, 'vae'))
  assert open(os.path.join(fresh, 'export', 'vae.safetensors'), 'rb').read() == \
      carry.joinpath('vae.safetensors').read_bytes()

  # A carried stage-1a teacher (launch/export.py's layout) finishes stage 1a: stage 1 starts
  # from that file and no image stage runs.
  params = init_lib.restore_networks(ch.workdir('teacher_image'), ['teacher'])['teacher']
  state = {'model.' + k: np.ascontiguousarray(v)
           for k, v in dit_convert.dit_to_torch(params, config.model).items()}
  st_numpy.save_file(state, str(carry / 'teacher_image.safetensors'))
  later = []
  chain_lib.run_chain(fresh, 'storyworld', OVERRIDES, steps=['precompute', 'teacher_image',
                                                             'teacher'],
                      log=later.append, carry=str(tmp_path / 'carry'))
  assert any('teacher_image done' in l for l in later)
  assert not os.path.exists(os.path.join(fresh, 'teacher_image'))
  fresh_chain = chain_lib.Chain(fresh, 'storyworld', OVERRIDES)
  assert fresh_chain.config('teacher').teacher.init_from == fresh_chain.teacher_image_file
  assert fresh_chain.done('teacher')
