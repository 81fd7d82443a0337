"""The StoryWorld harness end to end at a tiny size (random networks): every row, the long-story
identity curve, speed, and the report files; the rows that must be near 1 are."""

import dataclasses
import json
import os
import types

import numpy as np
from PIL import Image
import pytest

from configs import shotstream
from shotstream_jax.data import prompts
from shotstream_jax.data import storyworld as sw
from shotstream_jax.eval import harness
from shotstream_jax.eval import judge
from shotstream_jax.models import random_init
from shotstream_jax.models import tokenizer


def _tiny_storyworld(tmp_path):
  """The storyworld preset shrunk (1-layer DiT, base-4 VAE) with a vocabulary of its prompts."""
  c = shotstream.get_config('storyworld')
  c.model.update(dim=32, num_layers=1, num_heads=1, ffn_dim=64)
  c.vae.base_dim = 4
  lines = [prompts.shot_prompt(g, i, cap) for st in harness.held_out_stories(60, seed=5)
           for g, caps in [st.captions()] for i, cap in enumerate(caps)]
  tok = tokenizer.train_sentencepiece(lines + ['shot0: shot9:'], str(tmp_path / 'tok'),
                                      c.text.vocab_size)
  import sentencepiece  # pylint: disable=g-import-not-at-top
  c.text.vocab_size = sentencepiece.SentencePieceProcessor(
      model_file=os.path.join(tok, 'spiece.model')).get_piece_size()
  dit = lambda s: random_init.embedded_dit(c.model, s)
  return harness.Models(c, random_init.embedded_vae(c.vae, 0),
                        random_init.embedded_text(c.text, 0), tok,
                        {name: dit(i) for i, name in enumerate(harness.STUDENTS)}, dit(9),
                        teacher_guidance=2.0, teacher_steps=2)


def test_harness_end_to_end(tmp_path):
  models = _tiny_storyworld(tmp_path)
  ablations = ['global cache off', 'context budget 1', 'shots of 3 chunks, local window 1 chunk']
  result = harness.evaluate(models, num_stories=2, seed=0, ablations=ablations,
                            long_stories=1, long_shots=3, progress=False, sheet_stories=2)
  rows = result['rows']
  want = (['ground truth', 'VAE round trip', 'teacher (2 Euler steps, CFG 2)']
          + list(harness.STUDENTS) + [f'ablation: {a}' for a in ablations])
  assert list(rows) == want
  assert rows['ground truth']['overall'] > 0.95 and rows['ground truth']['found'] == 1.0
  for name in want[1:]:   # random networks show no StoryWorld scene
    assert rows[name]['identity'] < 0.2 and rows[name]['found'] < 0.2, name
  effects = result['ablation_effects']   # paired: their means are the rows' differences
  assert list(effects) == ablations
  for a in ablations:
    for k in harness.KEYS:
      np.testing.assert_allclose(effects[a][k]['mean'],
                                 rows[f'ablation: {a}'][k] - rows['stage 4 student'][k],
                                 atol=2e-4, err_msg=f'{a} {k}')
  assert set(result['identity_vs_first_shot']) == set(harness.STUDENTS[1:])
  assert all(len(v) == 2 for v in result['identity_vs_first_shot'].values())
  long = result['long_identity']   # one long story: means, no standard error
  assert set(long) == set(harness.STUDENTS[1:]) | {'stage 4 - stage 3'}
  for name in harness.STUDENTS[1:]:
    assert long[name]['se'] is None
    np.testing.assert_allclose(long[name]['mean'], np.mean(result['identity_vs_first_shot'][name]),
                               atol=1e-4)
  sp = result['speed']
  assert sp['fps'] > 0 and sp['first_frame_latency_s'] > 0
  assert all(n == 1 for k, n in sp['compile_counts'].items() if k != 'decode')
  paths = harness.write_report(result, str(tmp_path / 'eval'))
  with open(paths['json']) as f:
    saved = json.load(f)
  assert saved['rows'] == rows and 'sheet' not in saved
  text = open(paths['md']).read()
  assert '| ground truth |' in text and 'k=3' in text and 'FPS' in text
  assert '| global cache off | ' in text and 'paired story by story' in text
  assert 'found by chunk' in text
  assert list(result['diagnosis']) == want   # every row; random networks miss every shot
  for name in want[1:]:
    d = result['diagnosis'][name]
    assert sum(d['not_found'].values()) == pytest.approx(1 - rows[name]['found'], abs=1e-3)
  assert len(result['diagnosis']['ablation: shots of 3 chunks, local window 1 chunk'][
      'found_by_chunk']) == 3
  assert 'found by latent frame' in text
  assert len(result['diagnosis']['stage 4 student']['found_by_frame']) == \
      models.config.sampling.shot_latent_frames
  sheet = np.asarray(Image.open(paths['png']))
  # 2 stories x 6 rows of 32x32 frames (x3, 1-pixel borders), 3 frames per shot.
  assert sheet.shape[0] >= 2 * 6 * 34 * 3 and sheet.shape[2] == 3


def test_long_identity_summary():
  s3, s4 = np.array([0.2, 0.4, 0.6]), np.array([0.3, 0.4, 0.8])
  got = harness.long_identity_summary({harness.STUDENTS[1]: s3, harness.STUDENTS[2]: s4})
  assert got[harness.STUDENTS[1]] == {'mean': 0.4, 'se': round(0.2 / np.sqrt(3), 4)}
  # differences 0.1, 0, 0.2: mean 0.1, sample std 0.1
  assert got['stage 4 - stage 3'] == {'mean': 0.1, 'se': round(0.1 / np.sqrt(3), 4)}
  assert 'stage 4 - stage 3' not in harness.long_identity_summary({harness.STUDENTS[1]: s3})


def test_paired_differences():
  """Each key's mean and standard error of the story-by-story differences."""
  story = lambda **kw: types.SimpleNamespace(**{k: kw.get(k, 0.5) for k in harness.KEYS})
  ablated = [story(identity=0.3), story(identity=0.5), story(identity=0.9)]
  base = [story(identity=0.2), story(identity=0.5), story(identity=0.7)]
  got = harness.paired_differences(ablated, base)
  # differences 0.1, 0, 0.2: mean 0.1, sample std 0.1 (the rows' spread, 0.3 and 0.25, is gone)
  assert got['identity'] == {'mean': 0.1, 'se': round(0.1 / np.sqrt(3), 4)}
  assert got['overall'] == {'mean': 0.0, 'se': 0.0}
  assert set(got) == set(harness.KEYS)


def test_diagnose_tells_a_lost_scene_from_a_repainted_one():
  """Ground truth passes everywhere; a shot whose second chunk is grey misses the palette test
  (and its second chunk alone shows nothing); a shot whose second chunk repaints the setting's
  first colour is lost as a whole ('setting') although each chunk alone is a scene."""
  config = shotstream.get_config('storyworld')
  assert harness.chunk_bounds(config) == [(0, 5), (5, 11)]   # 11 frames: latents 0-2, 3-5
  assert harness.latent_bounds(config) == [(0, 1), (1, 3), (3, 5), (5, 7), (7, 9), (9, 11)]
  stories = harness.held_out_stories(3, seed=1)
  truth = [harness._render(config, st) for st in stories]

  def check(videos, missed, by_chunk):
    scores = [harness.judge_story(v, st) for v, st in zip(videos, stories)]
    got = harness.diagnose(videos, stories, scores, config)
    assert got['not_found'] == {k: missed.get(k, 0.0) for k in judge.MISSES}
    assert got['found_by_chunk'] == by_chunk
    cameras = [sw.camera(s.motion) for st in stories for s in st.shots]
    assert set(got['found_by_motion']) == set(cameras)
    whole = 1.0 - sum(missed.values())   # every shot of a video here fares alike
    assert all(v == whole for v in got['found_by_motion'].values())
    weighted = sum(cameras.count(c) * np.asarray(v)   # the split adds up to all shots
                   for c, v in got['found_by_frame_and_motion'].items()) / len(cameras)
    np.testing.assert_allclose(weighted, got['found_by_frame'], atol=1e-4)
    return got['found_by_frame']

  # A latent frame's one or two pixel frames alone: in one of these 9 shots (a field's sparse
  # dots, zooming in) the first two latent frames' border holds under 5% pattern colour.
  by_frame = check(truth, {}, [1.0, 1.0])
  assert min(by_frame) > 0.85 and by_frame[2:] == [1.0] * 4, by_frame
  grey = [v.copy() for v in truth]
  for v in grey:
    v.reshape(-1, 11, *v.shape[1:])[:, 5:] = 128
  assert check(grey, {'palette': 1.0}, [1.0, 0.0]) == by_frame[:3] + [0.0] * 3
  repainted = []
  for v, st in zip(truth, stories):
    used = {st.setting.colour, st.setting.pattern_colour, st.protagonist.colour,
            st.protagonist.texture_colour}
    other = next(c for c in sw.COLOURS if c not in used)
    recoloured = dataclasses.replace(st, setting=dataclasses.replace(st.setting, colour=other))
    v, w = (harness._render(config, s).reshape(-1, 11, 32, 32, 3) for s in (st, recoloured))
    v[:, 5:] = w[:, 5:]
    repainted.append(v.reshape(-1, 32, 32, 3))
  assert check(repainted, {'setting': 1.0}, [1.0, 1.0]) == by_frame   # each frame a scene
