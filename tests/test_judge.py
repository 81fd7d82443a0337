"""The StoryWorld judge: ground truth scores near 1, each corruption clearly lower."""

import numpy as np
import pytest

from shotstream_jax.data import storyworld as sw
from shotstream_jax.eval import judge

NUM_STORIES = 12
RENDER = dict(height=32, width=32, frames_per_shot=9)


def _scores():
  rows = {k: [] for k in ('ground truth', 'shuffled shots', 'swapped protagonist',
                          'mismatched captions', 'flicker')}
  for i in range(NUM_STORIES):
    st = sw.sample_story(0, 'heldout', i, (2, 4))
    caps = st.shot_captions()
    frames = sw.render_story(st, **RENDER)
    rng = np.random.default_rng(i)
    rows['ground truth'].append(judge.judge_video(frames, caps))
    rows['shuffled shots'].append(judge.judge_video(judge.shuffled_shots(st, **RENDER), caps))
    rows['swapped protagonist'].append(
        judge.judge_video(judge.swapped_protagonist(st, rng, **RENDER), caps))
    other = next(o for k in range(100)
                 if len((o := sw.sample_story(1, 'heldout', 1000 * i + k, (2, 4))).shots)
                 == len(st.shots))
    rows['mismatched captions'].append(judge.judge_video(frames, other.shot_captions()))
    rows['flicker'].append(judge.judge_video(judge.flickering(frames, rng), caps))
  return rows


@pytest.fixture(scope='module')
def scores():
  rows = _scores()
  keys = ('overall', 'identity', 'adherence', 'cuts', 'smoothness')
  print(f'\nStoryWorld judge, {NUM_STORIES} held-out stories at 32x32, 9 frames/shot (means):')
  print(f'{"video":22s}' + ''.join(f'{k:>11s}' for k in keys))
  for name, s in rows.items():
    print(f'{name:22s}' + ''.join(f'{np.mean([getattr(x, k) for x in s]):11.3f}' for k in keys))
  return rows


def test_ground_truth_near_perfect(scores):
  gt = scores['ground truth']
  assert min(s.overall for s in gt) > 0.97
  assert np.mean([s.overall for s in gt]) > 0.98
  assert all(s.adherence == 1.0 and s.cuts == 1.0 for s in gt)


def test_corruptions_clearly_lower(scores):
  gt = scores['ground truth']
  for name in ('shuffled shots', 'swapped protagonist', 'mismatched captions', 'flicker'):
    assert np.mean([s.overall for s in scores[name]]) < np.mean([s.overall for s in gt]) - 0.08
  for g, s in zip(gt, scores['shuffled shots']):       # every shot shows its neighbour's framing
    assert s.framing_accuracy == 0 and s.overall < g.overall - 0.1
  for g, s in zip(gt, scores['swapped protagonist']):
    assert s.identity < g.identity - 0.2 and s.overall < g.overall - 0.05
  assert np.mean([s.adherence for s in scores['mismatched captions']]) < 0.5
  assert np.mean([s.smoothness for s in scores['flicker']]) < 0.5


def test_shot_measures_and_errors():
  st = sw.Story(sw.Protagonist('triangle', 'red', 'stripes', 'white'),
                sw.Setting('field', 'green', 'blue'),
                (sw.Shot('wide', 'zoom in'), sw.Shot('close-up', 'pan left'),
                 sw.Shot('medium', 'pan right'), sw.Shot('wide', 'zoom out'),
                 sw.Shot('medium', 'static')))
  frames = sw.render_story(st, 64, 64, 13)
  s = judge.judge_video(frames, st.shot_captions())
  assert [(m.framing, m.motion) for m in s.shots] == [(x.framing, x.motion) for x in st.shots]
  with pytest.raises(ValueError, match='equal shots'):
    judge.judge_video(frames[:-1], st.shot_captions())
  with pytest.raises(ValueError, match='empty story'):
    judge.judge_video(frames, [])
  s2 = judge.judge_video(frames[:-1], st.shot_captions(), shot_lengths=[13, 13, 13, 13, 12])
  assert s2.adherence == 1.0
