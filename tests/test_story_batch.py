"""Whole stories in one jitted, batched call (sampling/story.py): its static context tables
against the reference rule, its videos against the interactive session path, one compilation
per (batch, shots), and a batch of 8 stories sharded over 8 simulated devices."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import shotstream
from shotstream_jax import context as context_lib
from shotstream_jax import pipeline as pipeline_lib
from shotstream_jax.sampling import story as story_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assert_same_video(a, b):
  """uint8 videos of the same floats up to summation order: at most 1 level apart, rarely."""
  assert a.shape == b.shape
  diff = np.abs(a.astype(int) - b)
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


@pytest.mark.parametrize('num_shots,frames,budget', [(5, 9, 6), (9, 21, 6), (3, 5, 2), (1, 9, 6)])
def test_tables_replay_the_reference_context_rule(num_shots, frames, budget):
  """Replaying the tables' buffer writes shot by shot, every context read finds exactly the
  frames (global indices) context.choose_context picks, written by an earlier shot."""
  tab = story_lib.story_tables(num_shots, frames, budget)
  holds = {}                                      # buffer row -> global frame index
  for s in range(num_shots):
    choice = context_lib.choose_context([frames] * s, budget)
    assert bool(tab.has_context[s]) == (s > 0)
    if s:
      assert [holds[r] for r in tab.ctx_slot[s]] == list(choice.frame_indices)
    assert tuple(tab.ctx_shot[s]) == choice.ctx_shot
    assert tuple(tab.ctx_caption[s]) == choice.ctx_caption
    assert tuple(tab.caption_shots[s]) == choice.caption_shots
    assert (tab.gen_shot[s], tab.gen_caption[s]) == (choice.gen_shot, choice.gen_caption)
    for f, r in zip(tab.keep_frame[s], tab.keep_slot[s]):
      if r != tab.num_slots - 1:                  # the last row is the padding's trash row
        holds[int(r)] = s * frames + int(f)
  assert len(holds) == tab.num_slots - 1 == len(context_lib.context_candidates(
      [frames] * num_shots, budget))
  off = story_lib.story_tables(num_shots, frames, budget, context='none')
  assert not off.has_context.any()
  for s in range(num_shots):
    assert tuple(off.caption_shots[s]) == context_lib.no_context(s, budget).caption_shots


@pytest.fixture(scope='module')
def pipe():
  return pipeline_lib.ShotStreamPipeline.from_random(shotstream.get_config('tiny'), seed=0)


def test_batch_equals_the_session_path_and_compiles_once(pipe):
  stories = [{'global_caption': 'A fox story. ', 'shot1': 'a red fox in snow',
              'shot2': 'the fox jumps'}, ['one', 'two']]
  videos = pipe.generate_batch(stories, [3, 5])
  assert videos.shape == (2, 2 * pipe.frames_per_shot, 64, 96, 3) and videos.dtype == np.uint8
  for story, seed, video in zip(stories, [3, 5], videos):
    _assert_same_video(video, pipe.generate(story, seed, streaming=False))
  assert not np.array_equal(videos[0], videos[1])
  again = pipe.generate_batch([['four', 'five'], stories[0]], [7, 3])
  _assert_same_video(again[1], videos[0])          # a story's video ignores its batch-mates
  (gen,) = pipe._story_generators.values()
  assert gen.compile_count == 1                    # new prompts and seeds: no new trace
  with pytest.raises(ValueError, match='same number of shots'):
    pipe.generate_batch([['a', 'b'], ['a', 'b', 'c']], [0, 1])
  with pytest.raises(ValueError, match='one seed per story'):
    pipe.generate_batch([['a', 'b']], [0, 1])


WORKER = r'''
import json, sys
import jax, numpy as np
from configs import shotstream
from shotstream_jax import pipeline as pipeline_lib
pipe = pipeline_lib.ShotStreamPipeline.from_random(shotstream.get_config('tiny'), seed=0)
mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
stories = [[f'story {i} opens', f'story {i} ends'] for i in range(8)]
seeds = list(range(10, 18))
out = pipe.generate_batch(stories, seeds, mesh=mesh)
(gen,) = pipe._story_generators.values()
raw = gen(pipe.dit_params, pipe.vae_params,
          np.stack([np.asarray(pipe.prompt_encoder(
              [pipeline_lib.shot_text(pipe.prompt_encoder, '', j, c)[0]
               for j, c in enumerate(s)])) for s in stories]), np.asarray(seeds))
refs = {i: pipe.generate(stories[i], seeds[i], streaming=False) for i in (0, 7)}
diffs = [int(np.abs(out[i].astype(int) - refs[i]).max()) for i in refs]
frac = [float((out[i] != refs[i]).mean()) for i in refs]
try:
  gen(pipe.dit_params, pipe.vae_params, np.zeros((3, 2, 4, 4), np.float32), np.arange(3))
  bad = ''
except ValueError as e:
  bad = str(e)
print(json.dumps(dict(devices=jax.device_count(), shape=list(out.shape),
                      shards=len(raw.sharding.device_set),
                      shard_rows=sorted({s.data.shape[0] for s in raw.addressable_shards}),
                      diffs=diffs, frac=frac, bad=bad)))
'''


def test_batch_of_8_stories_sharded_over_8_devices():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu', PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run([sys.executable, '-c', WORKER], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads([l for l in proc.stdout.splitlines() if l.startswith('{')][-1])
  assert out['devices'] == 8 and out['shape'][:2] == [8, 2 * 21]
  assert out['shards'] == 8 and out['shard_rows'] == [1]     # one story per device
  assert max(out['diffs']) <= 1 and max(out['frac']) < 1e-3, out
  assert 'do not split over' in out['bad']
