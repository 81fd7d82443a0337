"""The reference's prompt formats: story JSON, testset/train CSV, and the per-shot prompt string.

A story JSON holds `global_caption` and `shot1..shotN` (1-based keys). The reference encodes shot
i (0-based) as `global_caption + f"shot{i}:" + <caption of key shot{i+1}>`, direct concatenation
with no separator (DESIGN 4.3); `shot_prompts` reproduces that exactly.

CSV files (`testset.csv`: shot_num_from_caption,json_path,frame_number; `train_sample.csv` adds
video_path) list per shot [start, end) pixel-frame ranges, e.g. "[[0, 81], [81, 162]]"; gaps
between ranges are allowed. Relative paths are resolved against the CSV's folder (see
`resolve_path`). Every malformed input raises PromptFormatError naming file, line and field.
"""

import ast
import csv
import dataclasses
import json
import os
import re
from typing import Callable, List, Optional, Sequence, Tuple


class PromptFormatError(ValueError):
  """Malformed prompt JSON/CSV; the message names the file, the line and the field."""


@dataclasses.dataclass(frozen=True)
class Story:
  """A multi-shot story: one global caption and one caption per shot, in order."""
  global_caption: str
  shots: Tuple[str, ...]
  source: str = ''

  def prompts(self) -> List[str]:
    return shot_prompts(self.global_caption, self.shots)


@dataclasses.dataclass(frozen=True)
class Row:
  """One CSV row. `frame_ranges` are [start, end) pixel-frame ranges, one per shot."""
  line: int
  num_shots: int
  json_path: str
  frame_ranges: Tuple[Tuple[int, int], ...]
  video_path: Optional[str] = None
  story: Optional[Story] = None


def shot_prompt(global_caption: str, index: int, caption: str) -> str:
  """The reference's text for shot `index` (0-based): global + 'shot{index}:' + caption."""
  return f'{global_caption}shot{index}:{caption}'


def fit_shot_prompt(global_caption: str, index: int, caption: str,
                    num_tokens: Callable[[str], int], budget: int) -> Tuple[str, int]:
  """(prompt, tokens cut): `shot_prompt` itself when it fits `budget` tokens, else the same
  text with whole words cut from the end of the global caption until it does.

  The reference appends the shot prompt after the global caption and truncates the total, so a
  long global caption silently erases every shot prompt (all shots then get the same
  conditioning). Cutting the global caption instead keeps what differs between shots; a prompt
  that fits is untouched, so every reference story encodes exactly as before. If the shot part
  alone is over budget the tokenizer truncates it; the count says how much was lost.
  """
  full = shot_prompt(global_caption, index, caption)
  total = num_tokens(full)
  if total <= budget:
    return full, 0
  words = global_caption.split(' ')
  keep = lambda k: (' '.join(words[:k]).rstrip() + ' ') if k else ''
  lo, hi = 0, len(words) - 1       # most words of the caption that still fit: in [lo, hi]
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if num_tokens(shot_prompt(keep(mid), index, caption)) <= budget:
      lo = mid
    else:
      hi = mid - 1
  prompt = shot_prompt(keep(lo), index, caption)
  return prompt, total - min(num_tokens(prompt), budget)


def shot_prompts(global_caption: str, captions: Sequence[str]) -> List[str]:
  return [shot_prompt(global_caption, i, c) for i, c in enumerate(captions)]


def story_from_dict(d, source: str = '<dict>', num_shots: Optional[int] = None) -> Story:
  """Validate a story dict. `num_shots` = how many shots the caller needs (default: all keys)."""
  if not isinstance(d, dict):
    raise PromptFormatError(f'{source}: a story must be a JSON object, got {type(d).__name__}')
  g = d.get('global_caption')
  if g is None:
    raise PromptFormatError(f'{source}: field global_caption: missing')
  if not isinstance(g, str) or not g.strip():
    raise PromptFormatError(f'{source}: field global_caption: must be a non-empty string')
  keys = sorted((int(m.group(1)) for k in d if (m := re.fullmatch(r'shot(\d+)', k))))
  if keys and keys[0] == 0:
    raise PromptFormatError(f'{source}: field shot0: shots are numbered from shot1 (the '
                            'reference\'s format); rename shot0..shotN-1 to shot1..shotN')
  n = keys[-1] if keys else 0
  if num_shots is not None:
    n = num_shots
  if n <= 0:
    raise PromptFormatError(f'{source}: empty story: no shot1..shotN fields')
  shots = []
  for i in range(1, n + 1):
    key = f'shot{i}'
    if key not in d:
      raise PromptFormatError(f'{source}: field {key}: missing (story needs shot1..shot{n})')
    c = d[key]
    if not isinstance(c, str) or not c.strip():
      raise PromptFormatError(f'{source}: field {key}: empty prompt (need a non-empty string)')
    shots.append(c)
  return Story(global_caption=g, shots=tuple(shots), source=source)


def load_story(path: str, num_shots: Optional[int] = None) -> Story:
  """Parse a story JSON file; errors name the file (and line for JSON syntax errors)."""
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except OSError as e:
    raise PromptFormatError(f'{path}: cannot read story JSON ({e.strerror})') from None
  try:
    d = json.loads(text)
  except json.JSONDecodeError as e:
    raise PromptFormatError(f'{path}:{e.lineno}: invalid JSON ({e.msg})') from None
  return story_from_dict(d, source=path, num_shots=num_shots)


def parse_frame_ranges(text: str, where: str = 'frame_number') -> Tuple[Tuple[int, int], ...]:
  """'[[0, 81], [81, 162]]' -> ((0, 81), (81, 162)); ranges non-empty and increasing."""
  try:
    value = ast.literal_eval(text.strip())
  except (ValueError, SyntaxError):
    raise PromptFormatError(f'{where}: unparsable frame ranges {text!r}; '
                            'expected e.g. "[[0, 81], [81, 162]]"') from None
  ok = isinstance(value, (list, tuple)) and value and all(
      isinstance(r, (list, tuple)) and len(r) == 2 and
      all(isinstance(v, int) and not isinstance(v, bool) for v in r) for r in value)
  if not ok:
    raise PromptFormatError(f'{where}: frame ranges must be a non-empty list of [start, end] '
                            f'integer pairs, got {text!r}')
  ranges = tuple((int(a), int(b)) for a, b in value)
  prev_end = 0
  for i, (a, b) in enumerate(ranges):
    if a < prev_end or b <= a:
      raise PromptFormatError(f'{where}: range {i} [{a}, {b}) must be non-empty and start at or '
                              f'after the previous end {prev_end} (non-increasing ranges)')
    prev_end = b
  return ranges


def resolve_path(path: str, csv_dir: str) -> Optional[str]:
  """Find `path` named in a CSV, or None.

  Tried in order: absolute as-is; relative to the CSV's folder and then each parent (the
  reference's paths are relative to its repo root); finally shorter tails of the path (leading
  folders dropped) under the CSV's folder, so a copied demo folder such as `demo/testdata/` keeps
  working without rewriting its CSV.
  """
  if os.path.isabs(path):
    return path if os.path.exists(path) else None
  base = os.path.abspath(csv_dir)
  bases = [base]
  while os.path.dirname(bases[-1]) != bases[-1]:
    bases.append(os.path.dirname(bases[-1]))
  candidates = [os.path.join(b, path) for b in bases]
  parts = [p for p in re.split(r'[\\/]+', path) if p and p != '.']
  candidates += [os.path.join(base, *parts[k:]) for k in range(1, len(parts))]
  for c in candidates:
    if os.path.exists(c):
      return os.path.normpath(c)
  return None


def read_csv(csv_path: str, require_video: bool = False, resolve: bool = True,
             load_stories: bool = True) -> List[Row]:
  """Parse a testset/train CSV into Rows, validating every row before anything else runs.

  resolve:       resolve json_path/video_path (see resolve_path); a json_path that does not
                 exist is an error. A missing *video* is not: the builder skips and reports it.
  load_stories:  also parse each row's story JSON and check it has the row's shots.
  """
  try:
    with open(csv_path, encoding='utf-8', newline='') as f:
      text = f.read()
  except OSError as e:
    raise PromptFormatError(f'{csv_path}: cannot read CSV ({e.strerror})') from None
  lines = text.splitlines(keepends=True)
  reader = csv.reader(lines)
  try:
    header = next(reader)
  except StopIteration:
    raise PromptFormatError(f'{csv_path}:1: empty CSV (no header)') from None
  header = [h.strip() for h in header]
  needed = ['shot_num_from_caption', 'json_path', 'frame_number']
  if require_video:
    needed.append('video_path')
  for col in needed:
    if col not in header:
      raise PromptFormatError(f'{csv_path}:1: header lacks column {col}; '
                              f'expected columns {",".join(needed)}')
  csv_dir = os.path.dirname(os.path.abspath(csv_path))
  rows = []
  line = reader.line_num + 1
  try:
    records = list(_records(reader))
  except csv.Error as e:
    raise PromptFormatError(f'{csv_path}:{reader.line_num}: malformed CSV ({e})') from None
  for record, end_line in records:
    where = f'{csv_path}:{line}'
    if not any(c.strip() for c in record):
      line = end_line + 1
      continue
    if len(record) != len(header):
      raise PromptFormatError(f'{where}: expected {len(header)} fields ({",".join(header)}), '
                              f'got {len(record)}')
    r = dict(zip(header, (c.strip() for c in record)))
    try:
      num_shots = int(r['shot_num_from_caption'])
    except ValueError:
      num_shots = 0
    if num_shots <= 0:
      raise PromptFormatError(f'{where}: field shot_num_from_caption: must be a positive int, '
                              f'got {r["shot_num_from_caption"]!r}')
    ranges = parse_frame_ranges(r['frame_number'], where=f'{where}: field frame_number')
    if len(ranges) != num_shots:
      raise PromptFormatError(f'{where}: field frame_number: {len(ranges)} ranges but '
                              f'shot_num_from_caption is {num_shots}')
    json_path = r['json_path']
    if not json_path:
      raise PromptFormatError(f'{where}: field json_path: empty')
    video_path = r.get('video_path')
    if require_video and not video_path:
      raise PromptFormatError(f'{where}: field video_path: empty')
    story = None
    if resolve:
      found = resolve_path(json_path, csv_dir)
      if found is None:
        raise PromptFormatError(f'{where}: field json_path: {json_path} not found relative to '
                                f'{csv_dir} or its parents')
      json_path = found
      if video_path:
        video_path = resolve_path(video_path, csv_dir) or os.path.join(csv_dir, video_path)
      if load_stories:
        try:
          story = load_story(json_path, num_shots=num_shots)
        except PromptFormatError as e:
          raise PromptFormatError(f'{where}: field json_path: {e}') from None
    rows.append(Row(line=line, num_shots=num_shots, json_path=json_path,
                    frame_ranges=ranges, video_path=video_path or None, story=story))
    line = end_line + 1
  if not rows:
    raise PromptFormatError(f'{csv_path}: no data rows after the header')
  return rows


def _records(reader):
  for record in reader:
    yield record, reader.line_num
