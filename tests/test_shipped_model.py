"""The shipped StoryWorld model (weights/storyworld, made by launch/reproduce.py): it is the
embedded default, fits the repository, and what it generates beats fixed floors on the judge.

The floors guard the shipped model against regressions: they sit below what it scores on this
3-story sample (seed 0: overall 0.87, identity 0.86, adherence 0.63, found 1.0, i.e. 9 of 9
shots found; harness, 32 stories: 0.60 / 0.33 / 0.45 / 0.62), with room for two shots to flip
between machines (found 0.75 = 7 of 9), and far above anything an untrained or broken model
reaches (random weights score 0 on every one of them: no shot is found as a scene). They are
not the issue's targets (0.9 on the harness), which the shipped interim model does not meet
(README, "The StoryWorld default model").
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import shotstream
from shotstream_jax import embedded
from shotstream_jax import pipeline
from shotstream_jax.data import prompts
from shotstream_jax.eval import harness
from shotstream_jax.eval import judge
from shotstream_jax.io import video as video_lib
from shotstream_jax.models import vae as vae_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORY = os.path.join(REPO, 'configs', 'stories', 'storyworld.json')
FLOORS = {'overall': 0.7, 'identity': 0.55, 'adherence': 0.4, 'found': 0.75}   # story means
MAX_BYTES = 30 * 2 ** 20
_CFG = shotstream.get_config('storyworld')
FRAMES = vae_lib.pixel_frames(_CFG.vae, _CFG.sampling.shot_latent_frames)   # per shot


# A checkout without weights/storyworld (e.g. one that deleted it to test the random path)
# skips these tests, naming why.
pytestmark = pytest.mark.skipif(
    embedded.model_dir(shotstream.get_config('storyworld')) is None,
    reason='weights/storyworld is absent from this checkout (make it with launch/reproduce.py --ship)')


@pytest.fixture(scope='module')
def pipe():
  return pipeline.ShotStreamPipeline.embedded(shotstream.get_config('storyworld'))


def test_shipped_files():
  directory = embedded.model_dir(shotstream.get_config('storyworld'))
  assert directory is not None, 'weights/storyworld is missing: run launch/reproduce.py --ship'
  manifest = embedded.read_manifest(directory)
  assert manifest['preset'] == 'storyworld'
  assert sum(manifest['bytes'].values()) < MAX_BYTES
  assert manifest['harness']['rows']['stage 4 student']['overall'] >= 0.55   # measured 0.595


def _scores(video, story_dict):
  story = prompts.story_from_dict(story_dict)
  return judge.judge_video(video, list(story.shots), global_caption=story.global_caption)


def test_generated_stories_beat_floors(pipe):
  stories = harness.held_out_stories(3, seed=0, num_shots=(3, 3))
  scores = [_scores(pipe.generate(st.as_json(), seed=i), st.as_json())
            for i, st in enumerate(stories)]
  for key, floor in FLOORS.items():
    value = float(np.mean([getattr(s, key) for s in scores]))
    assert value >= floor, f'{key} {value:.3f} < floor {floor}'
  again = pipe.generate(stories[0].as_json(), seed=0)
  first = pipe.generate(stories[0].as_json(), seed=0)
  np.testing.assert_array_equal(again, first)    # same seed, same video


def test_readme_command_one(tmp_path):
  """`launch/generate.py` with no --config / --ckpt: the shipped model on the shipped story."""
  out = tmp_path / 'story.mp4'
  res = subprocess.run([sys.executable, 'launch/generate.py', f'--out={out}', '--nowarmup'],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert 'the shipped' in res.stderr
  with open(STORY) as f:
    story = json.load(f)
  video = video_lib.read_video(str(out))
  assert video.shape == ((len(story) - 1) * FRAMES, 32, 32, 3)
  s = _scores(video, story)    # through mp4 compression (measured: overall 0.92, found 1.0:
  assert s.overall >= 0.7 and s.found >= 0.75, s.summary()   # 4 of 4 shots; floors: 3 of 4)


def test_interactive_with_shipped_model(tmp_path):
  out = tmp_path / 'live.mp4'
  stdin = ('A blue square in a field. \nWide shot of the square; the camera is static.\n'
           'Close-up shot of the square; the camera pans left.\n\n')
  res = subprocess.run([sys.executable, 'launch/generate.py', '--interactive', '--nowarmup',
                        f'--out={out}'], cwd=REPO, input=stdin, capture_output=True, text=True,
                       timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert f'shot 2: {FRAMES} frames written' in res.stderr
  assert video_lib.read_video(str(out)).shape == (2 * FRAMES, 32, 32, 3)
