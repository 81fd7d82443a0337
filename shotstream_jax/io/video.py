"""mp4 in and out as uint8 RGB arrays [T, H, W, 3], through the static ffmpeg of imageio-ffmpeg.

    frames = read_video('clip.mp4', size=(480, 832), start=0, stop=81)
    write_video('out.mp4', frames, fps=16)

Decoding resizes inside ffmpeg (area filter), which is much cheaper than decoding at full size and
resizing in numpy; `resize_frames` is the array-side equivalent for frames already in memory.
"""

import logging
import os
import warnings
from typing import Optional, Sequence, Tuple

import imageio_ffmpeg
import numpy as np


class VideoError(IOError):
  """A video that is missing, unreadable, corrupt, or shorter than asked for."""


def to_unit(frames):
  """uint8 RGB -> float32 in [-1, 1], as the reference normalises (x / 255 * 2 - 1)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.asarray(frames, jnp.float32) / 127.5 - 1.0


def to_uint8(frames, xp=np):
  """[-1, 1] floats -> uint8 RGB, as the reference writes (x * 0.5 + 0.5, clamped, * 255).
  `xp=jax.numpy` inside a jitted function (sampling/story.py); the same numbers."""
  x = xp.clip(xp.asarray(frames, xp.float32) * 0.5 + 0.5, 0.0, 1.0)
  return xp.round(x * 255.0).astype(xp.uint8)


def probe_video(path: str) -> dict:
  """ffmpeg's metadata for `path`: at least 'size' (W, H), 'fps', 'duration' when known."""
  _check_exists(path)
  gen = imageio_ffmpeg.read_frames(path)
  try:
    return next(gen)
  except (RuntimeError, OSError, StopIteration) as e:
    raise VideoError(f'{path}: not a readable video ({_short(e)})') from None
  finally:
    gen.close()


def iter_video(path: str, block: int, size: Optional[Tuple[int, int]] = None):
  """uint8 RGB blocks [<= block, H, W, 3] of `path` in order, decoded once, resized to `size`.

  Frames are yielded as they are decoded, so a long video never sits in memory whole; stopping
  the iteration stops ffmpeg. Raises VideoError if the file is missing or corrupt.
  """
  _check_exists(path)
  if block < 1:
    raise ValueError(f'iter_video: need block >= 1 frame, got {block}')
  output_params = None
  if size is not None:
    h, w = _check_size(size)
    output_params = ['-vf', f'scale={w}:{h}:flags=area']
  # imageio-ffmpeg warns whenever the output size differs from the source: that is the point here.
  logging.getLogger('imageio_ffmpeg').setLevel(logging.ERROR)
  gen = imageio_ffmpeg.read_frames(path, output_params=output_params)
  frames = []
  try:
    with warnings.catch_warnings():  # JAX warns on any fork; ffmpeg is exec'd right away
      warnings.filterwarnings('ignore', message=r'os\.fork\(\) was called')
      meta = next(gen)
    if size is None:
      w, h = meta['size']
    frame_bytes = w * h * 3
    for i, buf in enumerate(gen):
      if len(buf) != frame_bytes:
        raise VideoError(f'{path}: frame {i} has {len(buf)} bytes, expected {frame_bytes}')
      frames.append(np.frombuffer(buf, np.uint8).reshape(h, w, 3))
      if len(frames) == block:
        yield np.stack(frames)
        frames = []
    if frames:
      yield np.stack(frames)
  except (RuntimeError, OSError, StopIteration) as e:
    if isinstance(e, VideoError):
      raise
    raise VideoError(f'{path}: corrupt or unreadable video ({_short(e)})') from None
  finally:
    gen.close()


def read_video(path: str, size: Optional[Tuple[int, int]] = None, start: int = 0,
               stop: Optional[int] = None) -> np.ndarray:
  """Frames [start, stop) of `path` as uint8 RGB [T, H, W, 3], resized to `size` = (H, W).

  Reading stops at `stop`, so a slice near the start of a long video costs only that slice.
  Raises VideoError if the file is missing or corrupt, or has fewer than `stop` frames.
  """
  if start < 0 or (stop is not None and stop < start):
    raise ValueError(f'read_video: need 0 <= start <= stop, got start={start} stop={stop}')
  frames = []
  for i, one in enumerate(iter_video(path, 1, size)):
    if stop is not None and i >= stop:
      break
    if i >= start:
      frames.append(one[0])
  got = start + len(frames)
  if stop is not None and got < stop:
    raise VideoError(f'{path}: has {got} decodable frames, frames [{start}, {stop}) were asked')
  if not frames:
    raise VideoError(f'{path}: no decodable frames')
  return np.stack(frames)


class VideoWriter:
  """Append uint8 RGB frames [n, H, W, 3] to an h264 mp4 as they are produced.

  `fragmented=True` writes a fragmented mp4 that players can open while it is still growing
  (interactive sessions: every finished fragment is playable even if the process dies); the
  default is a plain mp4, written to `<path>.part.mp4` and renamed on a clean close, so `path`
  is never a half-written file (a plain mp4 is unplayable until its index is written last).
  """

  def __init__(self, path: str, fps: int = 16, quality: int = 8, fragmented: bool = False):
    self.path, self.fps, self.quality, self.fragmented = path, fps, quality, fragmented
    self.frames_written = 0
    self._gen = None
    self._target = path if fragmented else path + '.part.mp4'

  def write(self, frames: np.ndarray) -> None:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
      raise ValueError(f'write_video: frames must be [T, H, W, 3], got shape {frames.shape}')
    if frames.dtype != np.uint8:
      raise ValueError(f'write_video: frames must be uint8, got {frames.dtype}')
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
      raise ValueError(f'write_video: need even H, W (yuv420p), got {frames.shape}')
    if self._gen is None:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      extra = ['-movflags', 'frag_keyframe+empty_moov'] if self.fragmented else None
      self._gen = imageio_ffmpeg.write_frames(
          self._target, (w, h), fps=self.fps, quality=self.quality, macro_block_size=1,
          ffmpeg_log_level='error', output_params=extra)
      with warnings.catch_warnings():  # JAX warns on any fork; ffmpeg is exec'd right away
        warnings.filterwarnings('ignore', message=r'os\.fork\(\) was called')
        self._gen.send(None)
    for frame in frames:
      self._gen.send(np.ascontiguousarray(frame))
    self.frames_written += t

  def close(self) -> None:
    if self._gen is not None:
      self._gen.close()
      self._gen = None
      if self._target != self.path:
        os.replace(self._target, self.path)

  def abort(self) -> None:
    """Stop without publishing: the partial file is removed (a fragmented one is kept: what
    it holds so far plays)."""
    if self._gen is not None:
      try:
        self._gen.close()
      except Exception:  # pylint: disable=broad-except  # ffmpeg may already be gone
        pass
      self._gen = None
      if self._target != self.path and os.path.exists(self._target):
        os.remove(self._target)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *exc):
    if exc_type is None:
      self.close()
    else:
      self.abort()


def write_video(path: str, frames: np.ndarray, fps: int = 16, quality: int = 8) -> None:
  """Write uint8 RGB frames [T, H, W, 3] (H, W even) to an h264 mp4 at `fps`."""
  frames = np.asarray(frames)
  if frames.ndim == 4 and frames.shape[0] == 0:
    raise ValueError(f'write_video: need >= 1 frame, got {frames.shape}')
  with VideoWriter(path, fps, quality) as writer:
    writer.write(frames)


def resize_frames(frames: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """Bilinear resize of uint8 or float frames [..., H, W, C] to `size` = (H, W), antialiased.

  Downscaling by an integer factor averages whole blocks first (as an area filter would), then a
  bilinear pass with half-pixel centres handles the remainder. Output keeps the input dtype.
  """
  frames = np.asarray(frames)
  h, w = _check_size(size)
  in_h, in_w = frames.shape[-3], frames.shape[-2]
  x = frames.astype(np.float32)
  fh, fw = max(in_h // h, 1), max(in_w // w, 1)
  if fh > 1 or fw > 1:
    ch, cw = in_h // fh * fh, in_w // fw * fw
    x = x[..., :ch, :cw, :]
    x = x.reshape(*x.shape[:-3], ch // fh, fh, cw // fw, fw, x.shape[-1]).mean(axis=(-4, -2))
  x = _linear_axis(x, h, axis=-3)
  x = _linear_axis(x, w, axis=-2)
  if frames.dtype == np.uint8:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
  return x.astype(frames.dtype)


def _linear_axis(x: np.ndarray, n: int, axis: int) -> np.ndarray:
  m = x.shape[axis]
  if m == n:
    return x
  pos = np.clip((np.arange(n) + 0.5) * m / n - 0.5, 0, m - 1)
  lo = np.floor(pos).astype(np.int64)
  hi = np.minimum(lo + 1, m - 1)
  frac = (pos - lo).astype(np.float32)
  shape = [1] * x.ndim
  shape[axis] = n
  frac = frac.reshape(shape)
  return np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, hi, axis=axis) * frac


def _check_size(size: Sequence[int]) -> Tuple[int, int]:
  if len(size) != 2 or any(int(s) != s or s <= 0 for s in size):
    raise ValueError(f'size must be (height, width) positive ints, got {size!r}')
  return int(size[0]), int(size[1])


def _check_exists(path: str) -> None:
  if not os.path.isfile(path):
    raise VideoError(f'{path}: video file not found')


def _short(e: BaseException) -> str:
  lines = [l for l in str(e).strip().splitlines() if l.strip()]
  return lines[-1][:200] if lines else type(e).__name__
