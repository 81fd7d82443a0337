"""The reproduce chain end to end at a miniature size (every step, 2 training steps each):
the model directory it writes loads as the embedded model and generates; a rerun skips
everything; a killed step resumes."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from shotstream_jax import embedded
from shotstream_jax.eval import compare
from shotstream_jax.eval import teacher_probe
from shotstream_jax import loading
from shotstream_jax import pipeline
from shotstream_jax.training import chain as chain_lib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import shotstream as model_configs  # pylint: disable=g-import-not-at-top,wrong-import-position
from launch import export as export_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

# A shrunken storyworld preset: a 1-layer DiT, a base-4 VAE, 8 + 4 stories, 2 steps a stage.
OVERRIDES = {
    'data': {'num_train': 8, 'num_heldout': 4},
    'model': {'model.dim': 32, 'model.num_layers': 1, 'model.num_heads': 1,
              'model.ffn_dim': 64, 'vae.base_dim': 4},
    'vae': {'train.num_steps': 2, 'train.eval_every': 2, 'vae_train.stat_clips': 4,
            'optim.vae.warmup_steps': 1},
    'vae_decoder': {'train.num_steps': 2, 'train.eval_every': 2, 'vae_train.stat_clips': 4,
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
  chain_lib.run_chain(root, 'storyworld', OVERRIDES,
                      steps=chain_lib.STEPS[:chain_lib.STEPS.index('teacher') + 1],
                      log=logs.append)
  times = chain_lib.run_chain(root, 'storyworld', OVERRIDES, log=logs.append)
  assert list(times) == list(chain_lib.STEPS)
  assert any('teacher done' in l for l in logs)           # not trained twice
  again = []
  chain_lib.run_chain(root, 'storyworld', OVERRIDES, log=again.append)
  assert len(again) == len(chain_lib.STEPS) and all('skipped' in l for l in again)

  # The root remembers its overrides: a reader that gives none gets the chain's sizes and
  # step counts (every step done), and a different model size is refused with its field named.
  ch = chain_lib.Chain(root, 'storyworld')
  assert ch.overrides == OVERRIDES and all(ch.done(s) for s in chain_lib.STEPS)
  assert ch.model_config().model.dim == 32
  with pytest.raises(ValueError, match=r'model:model.dim=64: .* was run with 32'):
    chain_lib.Chain(root, 'storyworld', {'model': {'model.dim': 64}})
  with pytest.raises(ValueError, match=r'model.eps=0.001: .* with the preset default'):
    chain_lib.Chain(root, 'storyworld', {'model': {'model.eps': 1e-3}})
  # Stage 0b trained the decoder on from stage 0 and left the encoder (the latents) bit for bit.
  first, second = (loading.restore_networks(ch.workdir(s), ['vae'])['vae']
                   for s in ('vae', 'vae_decoder'))
  for part in ('encoder', 'quant_conv'):
    for a, b in zip(jax.tree.leaves(first[part]), jax.tree.leaves(second[part])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0 for a, b in zip(
      jax.tree.leaves(first['decoder']), jax.tree.leaves(second['decoder'])))
  for stage in ('teacher_image', 'teacher'):   # the teacher probe runs on both stages' layouts
    out = teacher_probe.probe(root, stage, 2, 2.0, 2, str(tmp_path / 'probe'), 'storyworld',
                              OVERRIDES)
    assert set(out['x0_mse']) == {str(s) for s in teacher_probe.SIGMAS}
    assert all(np.isfinite(v) and v > 0 for v in out['x0_mse'].values())
    for s, by_frame in out['x0_mse_by_frame'].items():   # the per-frame split averages back
      assert len(by_frame) == len(out['data_var_by_frame'])
      np.testing.assert_allclose(np.mean(by_frame), out['x0_mse'][s], atol=2e-4)
    for s, by_motion in out['x0_mse_by_motion'].items():   # and so does the per-motion one
      weighted = sum(out['motions'][c] * v for c, v in by_motion.items()) / out['num']
      np.testing.assert_allclose(weighted, out['x0_mse'][s], atol=2e-4)
      for c, frames in out['x0_mse_by_frame_and_motion'][s].items():   # both, to each one
        assert len(frames) == len(by_frame)
        np.testing.assert_allclose(np.mean(frames), by_motion[c], atol=2e-4)
    scores = {k: v for k, v in out['judge'].items() if k != 'not_found'}
    assert set(scores) == {'found', 'subject', 'shape', 'framing', 'identity'}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    columns = 2 if stage == 'teacher_image' else 1 + 6 + 6   # [context,] GT, sampled frames
    assert Image.open(out['samples_png']).size == (3 * 32 * columns, 3 * 32 * 2)
  manifest = embedded.read_manifest(ch.model_dir)
  assert manifest['preset'] == 'storyworld' and set(manifest['bytes']) == set(
      embedded.FILES.values())
  config = ch.model_config()
  pipe = pipeline.ShotStreamPipeline.load(config, **embedded.paths(ch.model_dir))
  video = pipe.generate({'global_caption': 'A red circle in a street. ',
                         'shot1': 'Wide shot of the circle; the camera is static.',
                         'shot2': 'Close-up shot of the circle; the camera pans left.'})
  assert video.shape == (2 * pipe.frames_per_shot, 32, 32, 3) and pipe.frames_per_shot == 11
  assert video.dtype == np.uint8
  # launch/compare.py reads a chain's steps and its teacher: the model directory holds the
  # stage-4 generator, so its videos (and scores) are the dmd_inter step's, to the bit.
  models, entries = compare.load({'stage 4': f'{root}:dmd_inter', 'model dir': ch.model_dir,
                                  'teacher': f'{root}:teacher'}, config)
  assert entries['teacher'][1] is not None and entries['stage 4'][1] is None
  got = compare.compare(models, entries, num_stories=1, progress=False)
  assert got['rows']['model dir'] == got['rows']['stage 4'] and set(got['rows']) == {
      'stage 4', 'model dir', 'teacher'}
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
  chain_lib.run_chain(fresh, 'storyworld', OVERRIDES,
                      steps=['vae', 'vae_decoder', 'vae_export', 'text'],
                      log=later.append, carry=str(tmp_path / 'carry'))
  assert 'carried in' in later[0] and 'vae done' in later[1]
  assert 'vae_decoder done' in later[2] and 'vae_export done' in later[3]
  assert not os.path.exists(os.path.join(fresh, 'vae'))
  assert not os.path.exists(os.path.join(fresh, 'vae_decoder'))
  assert open(os.path.join(fresh, 'export', 'vae.safetensors'), 'rb').read() == \
      carry.joinpath('vae.safetensors').read_bytes()

  # A carried stage-1a teacher (launch/export.py's layout) finishes stage 1a: stage 1 starts
  # from that file and no image stage runs.
  export_lib.export(ch.config('teacher_image'), ch.workdir('teacher_image'), 'teacher',
                    str(carry / 'teacher_image.safetensors'))
  later = []
  chain_lib.run_chain(fresh, 'storyworld', OVERRIDES, steps=['precompute', 'teacher_image',
                                                             'teacher'],
                      log=later.append, carry=str(tmp_path / 'carry'))
  assert any('teacher_image done' in l for l in later)
  assert not os.path.exists(os.path.join(fresh, 'teacher_image'))
  fresh_chain = chain_lib.Chain(fresh, 'storyworld', OVERRIDES)
  assert fresh_chain.config('teacher').teacher.init_from == fresh_chain.teacher_image_file
  assert fresh_chain.done('teacher')
  assert fresh_chain.config('ode').ode.init_from == fresh_chain.workdir('teacher')

  # A carried stage-1 teacher file finishes stage 1 in a root that never trained it; stages
  # 2-4 and the harness load it from there.
  export_lib.export(ch.config('teacher'), ch.workdir('teacher'), 'teacher',
                    str(carry / 'teacher.safetensors'))
  third = str(tmp_path / 'third')
  chain_lib.carry_in(str(tmp_path / 'carry'), third, log=lambda *_: None)
  third_chain = chain_lib.Chain(third, 'storyworld', OVERRIDES)
  assert third_chain.done('teacher') and not os.path.exists(third_chain.workdir('teacher'))
  assert third_chain.config('ode').ode.init_from == third_chain.teacher_file
  assert third_chain.config('dmd_inter').dmd.teacher_init == third_chain.teacher_file
  assert third_chain.source('ode') == third_chain.workdir('ode')


def test_parse_overrides():
  got = chain_lib.parse_overrides(['teacher:train.num_steps=5', 'teacher:teacher.init_from=a/b',
                                   'model:model.rope.theta=0.5'])
  assert got == {'teacher': {'train.num_steps': 5, 'teacher.init_from': 'a/b'},
                 'model': {'model.rope.theta': 0.5}}
  with pytest.raises(ValueError, match='expected step:dotted.field=value'):
    chain_lib.parse_overrides(['teacher.train.num_steps=5'])


def test_apply_overrides_tuples_and_types():
  c = model_configs.get_config('tiny')
  got = chain_lib.apply_overrides(
      c, chain_lib.parse_overrides(['model:model.patch_size=[1,2,2]'])['model'])
  assert got.model.patch_size == (1, 2, 2)   # a JSON list sets a tuple field
  with pytest.raises(ValueError, match=r"override model.dim: 'wide' is not of type int"):
    chain_lib.apply_overrides(c, {'model.dim': 'wide'})


def test_bad_override_records_nothing(tmp_path):
  root = str(tmp_path / 'r')
  with pytest.raises(ValueError, match='override model.patch_size'):
    chain_lib.run_chain(root, 'storyworld', {'model': {'model.patch_size': '(1,2,2)'}},
                        steps=['text'])
  assert not os.path.exists(os.path.join(root, chain_lib.OVERRIDES))   # a fixed rerun may run
  with pytest.raises(ValueError, match=r"no config for step\(s\) \['text'\]"):
    chain_lib.run_chain(root, 'storyworld', {'text': {'train.num_steps': 3}}, steps=['text'])


def test_merge_overrides():
  recorded = {'model': {'model.dim': 192}, 'teacher': {'train.num_steps': 5}}
  # Step fields: the given value wins, recorded ones stay; shared fields may be repeated.
  got = chain_lib.merge_overrides(recorded, {'teacher': {'train.num_steps': 7},
                                             'model': {'model.dim': 192}})
  assert got == {'model': {'model.dim': 192}, 'teacher': {'train.num_steps': 7}}
  assert chain_lib.merge_overrides(None, {'data': {'num_train': 8}}) == {'data': {'num_train': 8}}
  with pytest.raises(ValueError, match=r'data:num_train=8: r was run with'):
    chain_lib.merge_overrides({}, {'data': {'num_train': 8}}, 'r')
