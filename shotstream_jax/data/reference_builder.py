"""tfds builder for the reference training format (CSV + story JSON + mp4), array_record, no TF.

    builder = ShotstreamReference(csv_paths={'train': 'data/train.csv'}, height=480, width=832,
                                  data_dir='~/tensorflow_datasets')
    builder.download_and_prepare()
    source = builder.as_data_source()['train']      # random access, read by grain
    print(builder.skipped_report())                  # videos that were missing or corrupt

Per example: `frames` uint8 [T, H, W, 3] holding only frames inside the shot ranges (frames in
gaps between ranges are dropped, so none is mislabelled — the reference labels them with the
neighbouring shot), `shot_index` [T], the source `frame_index` [T], `frame_ranges` [S, 2],
`shot_captions` [S], `global_caption`, `video_path`, `json_path`, `line`. Frames are kept as
decoded (no 4k+1 trimming): the precompute step chooses the frames each stage needs.

A malformed CSV row or story JSON stops the build before any decoding, naming its line; a missing
or corrupt video (or one shorter than its ranges) is skipped, logged, counted in `skipped` and
written to `skipped.json` next to the data.
"""

import json
import logging
import os
import tempfile
from typing import Dict, List, Mapping, Union

import numpy as np
import tensorflow_datasets as tfds

from shotstream_jax.data import prompts
from shotstream_jax.io import video

FRAMES_FORMATS = ('raw', 'mp4')
SKIPPED_FILE = 'skipped.json'


class ShotstreamReference(tfds.core.GeneratorBasedBuilder):
  """Multi-shot videos in the reference's training format, one example per CSV row."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Frames, per-frame shot index (gaps dropped), captions.'}
  # No download checksums to look up; tfds' lookup of them imports `importlib_resources`, which
  # is not installed on Python >= 3.9.
  code_path = None

  def __init__(self, *, csv_paths: Union[str, Mapping[str, str]], height: int = 480,
               width: int = 832, frames_format: str = 'raw', **kwargs):
    if isinstance(csv_paths, str):
      csv_paths = {'train': csv_paths}
    if not csv_paths:
      raise ValueError('csv_paths: need at least one split, e.g. {"train": "train.csv"}')
    if height <= 0 or width <= 0 or height % 2 or width % 2:
      raise ValueError(f'height/width: must be positive and even, got {height}x{width}')
    if frames_format not in FRAMES_FORMATS:
      raise ValueError(f'frames_format: {frames_format!r}; accepted: {", ".join(FRAMES_FORMATS)}')
    self._csv_paths = dict(csv_paths)
    self._size = (height, width)
    self._frames_format = frames_format
    self.skipped: List[Dict] = []
    kwargs.setdefault('file_format', 'array_record')
    config = tfds.core.BuilderConfig(name=f'{height}x{width}_{frames_format}')
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    h, w = self._size
    if self._frames_format == 'raw':
      frames = tfds.features.Tensor(shape=(None, h, w, 3), dtype=np.uint8)
    else:
      frames = tfds.features.Tensor(shape=(), dtype=np.object_)  # mp4 bytes
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split('\n')[0],
        features=tfds.features.FeaturesDict({
            'frames': frames,
            'shot_index': tfds.features.Tensor(shape=(None,), dtype=np.int32),
            'frame_index': tfds.features.Tensor(shape=(None,), dtype=np.int32),
            'frame_ranges': tfds.features.Tensor(shape=(None, 2), dtype=np.int32),
            'shot_captions': tfds.features.Sequence(tfds.features.Text()),
            'global_caption': tfds.features.Text(),
            'video_path': tfds.features.Text(),
            'json_path': tfds.features.Text(),
            'line': np.int32,
        }))

  def _split_generators(self, dl_manager):
    # Validate every CSV (rows, ranges, story JSONs) before decoding anything.
    rows = {split: prompts.read_csv(path, require_video=True)
            for split, path in self._csv_paths.items()}
    return {split: self._generate_examples(split, self._csv_paths[split], split_rows)
            for split, split_rows in rows.items()}

  def _generate_examples(self, split, csv_path, rows):
    for row in rows:
      try:
        frames, shot_index, frame_index = load_row_frames(row, self._size)
      except video.VideoError as e:
        self._skip(split, csv_path, row, str(e))
        continue
      if self._frames_format == 'mp4':
        frames = encode_mp4(frames)
      yield f'{split}-{row.line:09d}', {
          'frames': frames,
          'shot_index': shot_index,
          'frame_index': frame_index,
          'frame_ranges': np.asarray(row.frame_ranges, np.int32),
          'shot_captions': list(row.story.shots),
          'global_caption': row.story.global_caption,
          'video_path': row.video_path,
          'json_path': row.json_path,
          'line': row.line,
      }

  def _skip(self, split, csv_path, row, reason):
    entry = {'split': split, 'csv': csv_path, 'line': row.line, 'video_path': row.video_path,
             'reason': reason}
    self.skipped.append(entry)
    logging.warning('skipping %s:%d (%s): %s', csv_path, row.line, row.video_path, reason)

  def download_and_prepare(self, *args, **kwargs):
    """As tfds, then writes `skipped.json` (the skipped rows of this build) beside the data."""
    self.skipped = []
    super().download_and_prepare(*args, **kwargs)
    path = os.path.join(str(self.data_dir), SKIPPED_FILE)
    if self.skipped or not os.path.exists(path):
      with open(path, 'w') as f:
        json.dump(self.skipped, f, indent=1)
    if self.skipped:
      logging.warning('%s: skipped %d example(s) with missing or corrupt videos; see %s',
                      self.name, len(self.skipped), path)

  def skipped_report(self) -> List[Dict]:
    """The skipped rows of the build on disk (also valid when this process did not build it)."""
    path = os.path.join(str(self.data_dir), SKIPPED_FILE)
    if not os.path.exists(path):
      return list(self.skipped)
    with open(path) as f:
      return json.load(f)


def load_row_frames(row: prompts.Row, size):
  """Decode a row's video up to its last range end; keep only in-range frames, resized."""
  stop = row.frame_ranges[-1][1]
  decoded = video.read_video(row.video_path, size=size, stop=stop)
  frame_index = np.concatenate([np.arange(a, b) for a, b in row.frame_ranges]).astype(np.int32)
  shot_index = np.concatenate([np.full(b - a, i) for i, (a, b) in enumerate(row.frame_ranges)])
  return decoded[frame_index], shot_index.astype(np.int32), frame_index


def encode_mp4(frames: np.ndarray, fps: int = 16) -> bytes:
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, 'clip.mp4')
    video.write_video(path, frames, fps=fps, quality=10)
    with open(path, 'rb') as f:
      return f.read()


def decode_frames(value) -> np.ndarray:
  """An example's `frames` as uint8 [T, H, W, 3], whichever frames_format it was built with."""
  if isinstance(value, np.ndarray) and value.dtype == np.uint8:
    return value
  data = value.item() if isinstance(value, np.ndarray) else value
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, 'clip.mp4')
    with open(path, 'wb') as f:
      f.write(data)
    return video.read_video(path)
