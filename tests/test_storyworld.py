"""StoryWorld: deterministic bytes, hidden attributes, valid sizes, the tfds builder."""

import os

import numpy as np
import pytest

from configs import data as data_cfg
from shotstream_jax.data import storyworld as sw
from shotstream_jax.data import storyworld_builder as swb


def test_same_seed_same_bytes():
  a = sw.make_example(7, 'train', 3)
  b = sw.make_example(7, 'train', 3)
  assert a['frames'].tobytes() == b['frames'].tobytes()
  assert a['shot_captions'] == b['shot_captions'] and a['global_caption'] == b['global_caption']
  assert sw.make_example(7, 'train', 4)['frames'].tobytes() != a['frames'].tobytes()
  assert sw.make_example(7, 'heldout', 3)['story_id'] != a['story_id']
  assert sw.make_example(8, 'train', 3)['frames'].tobytes() != a['frames'].tobytes()


def test_story_structure_and_hidden_attributes():
  for i in range(20):
    st = sw.sample_story(0, 'train', i, (2, 4))
    assert 2 <= len(st.shots) <= 4
    for prev, nxt in zip(st.shots, st.shots[1:]):
      assert prev.framing != nxt.framing           # every cut is visible
    text = ' '.join([st.global_caption()] + st.shot_captions()).lower()
    p, s = st.protagonist, st.setting
    assert p.colour in text and p.shape in text and s.kind in text
    for hidden in (p.texture, p.texture_colour, s.colour, s.pattern_colour):
      assert hidden not in text
    for shot, cap in zip(st.shots, st.shot_captions()):
      assert sw.parse_shot_caption(cap) == (shot.framing, shot.motion)
    d = st.as_json()
    assert list(d) == ['global_caption'] + [f'shot{k + 1}' for k in range(len(st.shots))]
  ex = sw.make_example(0, 'train', 0, height=32, width=48, frames_per_shot=5)
  n = len(ex['shot_captions'])
  assert ex['frames'].shape == (5 * n, 32, 48, 3) and ex['frames'].dtype == np.uint8
  np.testing.assert_array_equal(ex['shot_index'], np.repeat(np.arange(n), 5))


def test_motion_is_smooth_inside_shots():
  st = sw.Story(sw.Protagonist('circle', 'red', 'solid', 'blue'),
                sw.Setting('room', 'white', 'green'),
                (sw.Shot('medium', 'pan right'), sw.Shot('close-up', 'static')))
  frames = sw.render_story(st, 32, 32, 9).astype(np.float32)
  d = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
  assert d[:8].max() < 0.5 * d[8]      # no within-shot change is half as large as the cut
  assert d[9:].max() == 0              # static camera: identical frames


@pytest.mark.parametrize('kw,needle', [
    (dict(frames_per_shot=8), 'odd'),
    (dict(height=31), 'even'),
])
def test_bad_sizes(kw, needle):
  args = dict(height=32, width=32, frames_per_shot=9)
  args.update(kw)
  with pytest.raises(ValueError, match=needle):
    sw.check_sizes(**args)


def test_bad_preset():
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    data_cfg.get_config('huge')


def _tiny_cfg():
  cfg = data_cfg.get_config('tiny').storyworld
  cfg.num_train, cfg.num_heldout = 6, 3
  return cfg


def test_builder_deterministic_and_matches_renderer(tmp_path):
  cfg = _tiny_cfg()
  paths = []
  for name in ('a', 'b'):
    b = swb.StoryWorld(cfg=cfg, data_dir=str(tmp_path / name))
    b.download_and_prepare()
    paths.append(str(b.data_dir))
  src = b.as_data_source()
  assert len(src['train']) == 6 and len(src['heldout']) == 3
  ex = src['heldout'][0]
  split, seed, index = ex['story_id'].decode().split('-')
  want = sw.make_example(int(seed), split, int(index), cfg.height, cfg.width, cfg.frames_per_shot,
                         (cfg.min_shots, cfg.max_shots), cfg.supersample)
  np.testing.assert_array_equal(ex['frames'], want['frames'])
  assert [c.decode() for c in ex['shot_captions']] == want['shot_captions']
  np.testing.assert_array_equal(ex['framing'], want['framing'])
  # Same config, same seed: byte-identical array_record files.
  for f in sorted(os.listdir(paths[0])):
    if '.array_record' in f:
      with open(os.path.join(paths[0], f), 'rb') as x, open(os.path.join(paths[1], f), 'rb') as y:
        assert x.read() == y.read(), f


def test_mean_by_camera_splits_rows_by_kind():
  cameras = ['pan', 'static', 'pan', '', 'zoom']   # '': a caption that states no motion
  got = sw.mean_by_camera([1.0, 0.0, 0.5, 9.0, 0.25], cameras)
  assert got == {'static': 0.0, 'pan': 0.75, 'zoom': 0.25}   # the unstated row is in none
  rows = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]
  assert sw.mean_by_camera(rows, cameras) == {'static': [3.0, 4.0], 'pan': [3.0, 4.0],
                                               'zoom': [9.0, 10.0]}
  assert sw.mean_by_camera([1.0, 2.0], ['static', 'static']) == {'static': 1.5}
