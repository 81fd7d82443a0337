"""The reference-format tfds builder: gaps dropped, captions kept, bad videos skipped and reported."""

import json
import os
import sys

import numpy as np
import pytest

from shotstream_jax.data import prompts
from shotstream_jax.data import reference_builder as rb
from shotstream_jax.io import video

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'reference',
                    'shotstream_demo')
MONTAGE = os.path.join(DEMO, 'project_page_montage.mp4')
HEADER = 'shot_num_from_caption,json_path,video_path,frame_number\n'


def _text(x):
  return x.decode() if isinstance(x, bytes) else str(x)


def _build(tmp_path, csv_path, **kw):
  b = rb.ShotstreamReference(csv_paths={'train': str(csv_path)}, data_dir=str(tmp_path / 'tfds'),
                             **kw)
  b.download_and_prepare()
  return b, b.as_data_source()['train']


@pytest.fixture()
def written_set(tmp_path):
  """Two good videos (one with a gap between shots), one corrupt, one missing."""
  d = tmp_path / 'set'
  (d / 'videos').mkdir(parents=True)
  rng = np.random.RandomState(0)
  # Each frame is a flat grey level = its index * 8, so decoded frames identify themselves.
  levels = (np.arange(24) * 8 + 20).astype(np.uint8)
  frames = np.broadcast_to(levels[:, None, None, None], (24, 32, 48, 3)).copy()
  video.write_video(str(d / 'videos' / 'a.mp4'), frames)
  video.write_video(str(d / 'videos' / 'b.mp4'), rng.randint(0, 255, (10, 32, 48, 3), np.uint8))
  (d / 'videos' / 'corrupt.mp4').write_bytes(b'\x00\x00\x00\x18ftypmp42' + b'\x07' * 5000)
  for name, n in (('a', 3), ('b', 2)):
    story = {'global_caption': f'Story {name}. '}
    story.update({f'shot{i + 1}': f'{name} shot {i + 1}' for i in range(n)})
    (d / f'{name}.json').write_text(json.dumps(story))
  rows = [
      '3,a.json,videos/a.mp4,"[[0, 5], [8, 14], [14, 21]]"',   # gap: frames 5..7 dropped
      '2,b.json,videos/corrupt.mp4,"[[0, 4], [4, 8]]"',
      '2,b.json,videos/b.mp4,"[[0, 4], [4, 10]]"',
      '2,b.json,videos/missing.mp4,"[[0, 4], [4, 8]]"',
  ]
  (d / 'train.csv').write_text(HEADER + '\n'.join(rows) + '\n')
  return d / 'train.csv', levels


@pytest.mark.parametrize('frames_format', ['raw', 'mp4'])
def test_builder_on_written_set(tmp_path, written_set, frames_format):
  csv_path, levels = written_set
  b, source = _build(tmp_path, csv_path, height=16, width=24, frames_format=frames_format)
  assert len(source) == 2
  by_line = {int(source[i]['line']): source[i] for i in range(len(source))}
  ex = by_line[2]
  frames = rb.decode_frames(ex['frames'])
  assert frames.shape == (5 + 6 + 7, 16, 24, 3)
  np.testing.assert_array_equal(ex['shot_index'], [0] * 5 + [1] * 6 + [2] * 7)
  np.testing.assert_array_equal(ex['frame_index'], list(range(5)) + list(range(8, 21)))
  # The frame after the gap is source frame 8, not 5: compare grey levels.
  np.testing.assert_allclose(frames.mean(axis=(1, 2, 3)), levels[ex['frame_index']], atol=3)
  assert [_text(c) for c in ex['shot_captions']] == ['a shot 1', 'a shot 2', 'a shot 3']
  assert _text(ex['global_caption']) == 'Story a. '
  assert _text(ex['video_path']).endswith(os.path.join('videos', 'a.mp4'))
  np.testing.assert_array_equal(ex['frame_ranges'], [[0, 5], [8, 14], [14, 21]])
  ex = by_line[4]
  assert rb.decode_frames(ex['frames']).shape == (10, 16, 24, 3)
  np.testing.assert_array_equal(ex['shot_index'], [0] * 4 + [1] * 6)

  skipped = b.skipped_report()
  assert [(s['line'], os.path.basename(s['video_path'])) for s in skipped] == [
      (3, 'corrupt.mp4'), (5, 'missing.mp4')]
  assert 'corrupt' in skipped[0]['reason'] and 'not found' in skipped[1]['reason']
  # A second builder on the same directory reuses the data and still reports the skips.
  b2, _ = _build(tmp_path, csv_path, height=16, width=24, frames_format=frames_format)
  assert len(b2.skipped_report()) == 2
  assert 'tensorflow' not in sys.modules   # built and read without TensorFlow


def test_malformed_row_stops_before_decoding(tmp_path, written_set):
  csv_path, _ = written_set
  csv_path.write_text(csv_path.read_text() + '2,b.json,videos/b.mp4,"[[0, 4], [3, 8]]"\n')
  with pytest.raises(prompts.PromptFormatError, match=r'train\.csv:6: field frame_number'):
    _build(tmp_path, csv_path, height=16, width=24)


def test_bad_builder_args():
  with pytest.raises(ValueError, match='frames_format'):
    rb.ShotstreamReference(csv_paths='x.csv', frames_format='gif')
  with pytest.raises(ValueError, match='even'):
    rb.ShotstreamReference(csv_paths='x.csv', height=15)


@pytest.mark.skipif(not os.path.isfile(MONTAGE), reason=f'reference montage absent: {MONTAGE}')
def test_builder_on_reference_montage(tmp_path):
  """A hand-written CSV over the first 60 of the montage's 910 frames, with a gap."""
  (tmp_path / 'montage.json').write_text(json.dumps(
      {'global_caption': 'The ShotStream project page. ', 'shot1': 'Opening frames.',
       'shot2': 'Next frames.', 'shot3': 'Later frames.'}))
  ranges = [[0, 17], [17, 33], [45, 60]]
  csv_path = tmp_path / 'montage.csv'
  csv_path.write_text(HEADER + f'3,montage.json,{os.path.abspath(MONTAGE)},"{ranges}"\n')
  b, source = _build(tmp_path, csv_path, height=54, width=72)
  assert len(source) == 1 and b.skipped_report() == []
  ex = source[0]
  assert ex['frames'].shape == (17 + 16 + 15, 54, 72, 3) and ex['frames'].dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(ex['shot_index']), [17, 16, 15])
  assert ex['frame_index'][33] == 45
  want = video.read_video(MONTAGE, size=(54, 72), stop=60)
  np.testing.assert_array_equal(ex['frames'], want[ex['frame_index']])
  assert [_text(c) for c in ex['shot_captions']] == ['Opening frames.', 'Next frames.',
                                                      'Later frames.']
