"""Video I/O: write/read round trip, slicing, resize, and clear errors for bad files."""

import os

import numpy as np
import pytest

from shotstream_jax.io import video

MONTAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared',
                       'reference', 'shotstream_demo', 'project_page_montage.mp4')


def _ramp(t=12, h=32, w=48):
  y, x = np.mgrid[:h, :w]
  frames = [np.stack([(x * 5 + 7 * i) % 256, y * 7 % 256, np.full_like(x, 40 + 10 * i)], -1)
            for i in range(t)]
  return np.asarray(frames, np.uint8)


def test_round_trip_and_slice(tmp_path):
  frames = _ramp()
  path = str(tmp_path / 'a' / 'clip.mp4')
  video.write_video(path, frames, fps=16)
  meta = video.probe_video(path)
  assert meta['fps'] == 16 and tuple(meta['size']) == (48, 32)
  back = video.read_video(path)
  assert back.shape == frames.shape and back.dtype == np.uint8
  assert np.abs(back.astype(int) - frames).mean() < 12  # lossy h264, smooth content
  part = video.read_video(path, start=3, stop=7)
  np.testing.assert_array_equal(part, back[3:7])
  small = video.read_video(path, size=(16, 24))
  assert small.shape == (12, 16, 24, 3)


def test_errors(tmp_path):
  with pytest.raises(video.VideoError, match='not found'):
    video.read_video(str(tmp_path / 'nope.mp4'))
  bad = tmp_path / 'bad.mp4'
  bad.write_bytes(b'\x00\x00\x00 ftypisom' + os.urandom(3000))
  with pytest.raises(video.VideoError, match='bad.mp4: corrupt'):
    video.read_video(str(bad))
  path = str(tmp_path / 'c.mp4')
  video.write_video(path, _ramp(t=5))
  with pytest.raises(video.VideoError, match='has 5 decodable frames'):
    video.read_video(path, stop=9)
  with pytest.raises(ValueError, match='even H, W'):
    video.write_video(path, np.zeros((2, 31, 32, 3), np.uint8))
  with pytest.raises(ValueError, match='uint8'):
    video.write_video(path, np.zeros((2, 32, 32, 3), np.float32))


def test_resize_frames():
  frames = _ramp(t=2, h=64, w=96)
  out = video.resize_frames(frames, (16, 24))
  assert out.shape == (2, 16, 24, 3) and out.dtype == np.uint8
  # A 4x integer downscale is a block average.
  want = frames.astype(np.float32).reshape(2, 16, 4, 24, 4, 3).mean((2, 4))
  np.testing.assert_allclose(out, np.rint(want), atol=1)
  up = video.resize_frames(out.astype(np.float32), (20, 30))
  assert up.shape == (2, 20, 30, 3) and up.dtype == np.float32


@pytest.mark.skipif(not os.path.isfile(MONTAGE), reason='reference montage absent')
def test_montage_slice():
  frames = video.read_video(MONTAGE, size=(54, 72), start=100, stop=110)
  assert frames.shape == (10, 54, 72, 3)
  assert frames.std() > 5


def test_plain_mp4_appears_only_when_complete(tmp_path):
  frames = np.full((3, 16, 16, 3), 128, np.uint8)
  path = str(tmp_path / 'a.mp4')
  with video.VideoWriter(path) as w:
    w.write(frames)
    assert not os.path.exists(path)              # being written under a temporary name
  assert video.read_video(path).shape == (3, 16, 16, 3)
  assert os.listdir(tmp_path) == ['a.mp4']
  with pytest.raises(RuntimeError, match='boom'):
    with video.VideoWriter(str(tmp_path / 'b.mp4')) as w:
      w.write(frames)
      raise RuntimeError('boom')
  assert os.listdir(tmp_path) == ['a.mp4']       # a failed write leaves nothing behind
