"""A pixel-only judge for StoryWorld videos (data/storyworld.py), analytic: no learned weights.

    scores = judge_video(frames, shot_captions)     # frames uint8 [T, H, W, 3]
    scores.overall, scores.identity, scores.adherence, scores.cuts, scores.smoothness

Because we know the renderer's palette and geometry, everything is measured directly:
  * segmentation: the background is the two palette colours (and their blends) that dominate the
    frame border in a shot; the protagonist is everything else;
  * identity consistency: across every pair of shots, the same background colours, the same
    protagonist colour histogram (body + hidden texture colour) and the same silhouette (mask
    scaled to a canonical box, IoU);
  * prompt adherence: framing from the protagonist's area-equivalent radius at mid-shot, camera
    motion from the trend of its centroid (pan) and of its log size (zoom), against the caption;
  * cut placement: frame-difference spikes must sit exactly at shot boundaries (F1);
  * smoothness: the temporal second difference inside shots (flicker, jumps) beyond what smooth
    constant-speed motion leaves.
Each score is in [0, 1]; `overall` is their mean. Shots are assumed equally long unless
`shot_lengths` is given.
"""

import dataclasses
from typing import List, Optional, Sequence

import numpy as np

from shotstream_jax.data import storyworld as sw
from shotstream_jax.io import video as video_io

_VALID_DIST = 60.0       # a pixel within this RGB distance of a palette colour gets its label
_BG_DIST = 40.0          # ... and is background if this close to the bg colours' blend segment
_SMOOTH_TOL, _SMOOTH_SCALE = 0.04, 0.03   # second-difference tolerance, decay
_CANON = 12              # canonical silhouette size for shape comparison


@dataclasses.dataclass
class ShotMeasure:
  framing: Optional[str]      # measured
  motion: Optional[str]
  radius: float               # area-equivalent radius / frame height, mid-shot
  pan: float                  # centroid shift over the shot / frame width (+: scene moves right)
  zoom: float                 # log size change over the shot
  framing_ok: bool
  motion_ok: bool


@dataclasses.dataclass
class Scores:
  identity: float
  adherence: float
  framing_accuracy: float
  motion_accuracy: float
  cuts: float
  smoothness: float
  overall: float
  shots: List[ShotMeasure]

  def summary(self) -> dict:
    return {k: round(float(getattr(self, k)), 3) for k in (
        'overall', 'identity', 'adherence', 'framing_accuracy', 'motion_accuracy', 'cuts',
        'smoothness')}


def judge_video(frames: np.ndarray, shot_captions: Sequence[str],
                shot_lengths: Optional[Sequence[int]] = None) -> Scores:
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f'frames: need [T, H, W, 3], got {frames.shape}')
  n = len(shot_captions)
  if n == 0:
    raise ValueError('shot_captions: empty story')
  if shot_lengths is None:
    if frames.shape[0] % n:
      raise ValueError(f'frames: {frames.shape[0]} frames do not split into {n} equal shots; '
                       'pass shot_lengths')
    shot_lengths = [frames.shape[0] // n] * n
  if len(shot_lengths) != n or sum(shot_lengths) != frames.shape[0]:
    raise ValueError(f'shot_lengths: {list(shot_lengths)} must have {n} entries summing to '
                     f'{frames.shape[0]}')
  x = frames.astype(np.float32)
  bounds = np.cumsum([0] + list(shot_lengths))
  shots = [x[bounds[i]:bounds[i + 1]] for i in range(n)]

  segs = [_segment_shot(s) for s in shots]
  measures = [_measure_shot(seg, cap) for seg, cap in zip(segs, shot_captions)]
  identity = _identity(segs)
  framing_acc = float(np.mean([m.framing_ok for m in measures]))
  motion_acc = float(np.mean([m.motion_ok for m in measures]))
  adherence = (framing_acc + motion_acc) / 2
  cuts = _cut_score(x, bounds[1:-1])
  smooth = float(np.mean([_smoothness(s) for s in shots]))
  overall = float(np.mean([identity, adherence, cuts, smooth]))
  return Scores(identity, adherence, framing_acc, motion_acc, cuts, smooth, overall, measures)


# ------------------------------------------------------------------------------- segmentation


def _labels(x):
  d = np.linalg.norm(x[..., None, :] - sw.PALETTE_RGB, axis=-1)   # [..., P]
  lab = d.argmin(-1)
  return lab, np.take_along_axis(d, lab[..., None], -1)[..., 0] < _VALID_DIST


def _segment_shot(x):
  """Background colours from the border ring; protagonist mask = not background."""
  lab, valid = _labels(x)
  t, h, w = lab.shape
  ring = np.zeros((h, w), bool)
  k = max(1, min(h, w) // 16)
  ring[:k], ring[-k:], ring[:, :k], ring[:, -k:] = True, True, True, True
  hist = np.bincount(lab[:, ring][valid[:, ring]], minlength=len(sw.COLOURS)).astype(np.float64)
  hist /= max(hist.sum(), 1)
  order = [int(i) for i in np.argsort(-hist)[:2] if hist[i] >= 0.1]
  bg = order or [int(np.argmax(hist))]
  a = sw.PALETTE_RGB[bg[0]]
  b = sw.PALETTE_RGB[bg[-1]]
  ab = b - a
  u = np.clip(((x - a) @ ab) / max(float(ab @ ab), 1e-6), 0, 1)
  dist = np.linalg.norm(x - (a + u[..., None] * ab), axis=-1)
  mask = dist > _BG_DIST
  colour = np.bincount(lab[mask & valid], minlength=len(sw.COLOURS)).astype(np.float64)
  colour /= max(colour.sum(), 1)
  return {'bg': frozenset(bg), 'mask': mask, 'colour': colour, 'h': h, 'w': w}


def _measure_shot(seg, caption):
  mask = seg['mask']
  t, h, w = mask.shape
  area = mask.reshape(t, -1).sum(-1).astype(np.float64)
  ys, xs = np.mgrid[:h, :w]
  cx = (mask * xs).reshape(t, -1).sum(-1) / np.maximum(area, 1)
  mid = t // 2
  radius = float(np.sqrt(area[mid] / np.pi) / h)
  framing = _classify_framing(radius)
  ts = np.arange(t, dtype=np.float64)
  ok = area > 0
  if ok.sum() >= 2 and t > 1:
    pan = float(np.polyfit(ts[ok], cx[ok], 1)[0] * (t - 1) / w)
    zoom = float(np.polyfit(ts[ok], 0.5 * np.log(area[ok]), 1)[0] * (t - 1))
  else:
    pan = zoom = 0.0
  motion = _classify_motion(pan, zoom)
  want_framing, want_motion = sw.parse_shot_caption(caption)
  return ShotMeasure(framing, motion, radius, pan, zoom, framing == want_framing,
                     motion == want_motion)


def _classify_framing(radius):
  if radius <= 0:
    return None
  names = list(sw.FRAMING_RADIUS)
  logs = np.log([sw.FRAMING_RADIUS[f] for f in names])
  return names[int(np.argmin(np.abs(logs - np.log(radius))))]


def _classify_motion(pan, zoom):
  zoom_full, pan_full = np.log(sw.ZOOM_FACTOR), sw.PAN_FRACTION
  if abs(zoom) > zoom_full / 2 and abs(zoom) / zoom_full >= abs(pan) / pan_full:
    return 'zoom in' if zoom > 0 else 'zoom out'
  if abs(pan) > pan_full / 2:
    return 'pan left' if pan > 0 else 'pan right'   # camera left -> scene slides right
  return 'static'


# ------------------------------------------------------------------------------------ scores


def _silhouette(mask):
  ys, xs = np.nonzero(mask)
  if len(ys) < 4:
    return None
  crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
  canon = video_io.resize_frames(crop[..., None], (_CANON, _CANON))[..., 0]
  return canon > 0.5


def _identity(segs):
  if len(segs) < 2:
    return 1.0
  sils = [_silhouette(s['mask'][s['mask'].shape[0] // 2]) for s in segs]
  sims = []
  for i in range(len(segs)):
    for j in range(i + 1, len(segs)):
      a, b = segs[i], segs[j]
      bg = len(a['bg'] & b['bg']) / len(a['bg'] | b['bg'])
      col = 1 - 0.5 * np.abs(a['colour'] - b['colour']).sum()
      if sils[i] is None or sils[j] is None:
        shape = 0.0
      else:
        iou = (sils[i] & sils[j]).sum() / max((sils[i] | sils[j]).sum(), 1)
        shape = float(np.clip((iou - 0.5) / 0.35, 0, 1))   # same shape >= 0.85 at 32 px
      sims.append((bg + col + shape) / 3)
  return float(np.mean(sims))


def _cut_score(x, boundaries):
  """F1 of detected cuts (difference spikes) against the shot boundaries."""
  if x.shape[0] < 2:
    return 1.0
  d = np.abs(np.diff(x, axis=0)).mean(axis=(1, 2, 3)) / 255.0     # d[t-1]: frame t-1 -> t
  is_b = np.zeros(len(d), bool)
  is_b[np.asarray(boundaries, int) - 1] = True
  within = d[~is_b]
  ref = float(np.median(within)) if within.size else 0.0
  detected = d > max(3.0 * ref, 0.03)
  tp = int((detected & is_b).sum())
  if not is_b.any():
    return 1.0 if not detected.any() else 0.0
  if tp == 0:
    return 0.0
  precision, recall = tp / detected.sum(), tp / is_b.sum()
  return float(2 * precision * recall / (precision + recall))


def _smoothness(x):
  """1 for smooth constant-speed motion; falls with flicker and jumps inside the shot.

  The second temporal difference is taken on Gaussian-blurred frames (sigma = size / 16), where
  an edge moving at constant sub-blur speed changes almost linearly in time, while flicker and
  jumps do not.
  """
  if x.shape[0] < 3:
    return 1.0
  sigma = min(x.shape[1], x.shape[2]) / 16
  x = _blur(_blur(x, sigma, axis=1), sigma, axis=2)
  acc = np.abs(x[2:] - 2 * x[1:-1] + x[:-2]).mean(axis=(1, 2, 3)) / 255.0
  return float(np.mean(np.exp(-np.maximum(acc - _SMOOTH_TOL, 0) / _SMOOTH_SCALE)))


def _blur(x, sigma, axis):
  r = int(np.ceil(3 * sigma))
  k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
  k /= k.sum()
  pad = [(0, 0)] * x.ndim
  pad[axis] = (r, r)
  xp = np.pad(x, pad, mode='edge')
  n = x.shape[axis]
  return sum(w * np.take(xp, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))


# ------------------------------------------------------------------------------- corruptions


def shuffled_shots(story: sw.Story, **render) -> np.ndarray:
  """Shots rotated by one (shot i shows shot i+1): every shot's framing contradicts its caption."""
  shots = story.shots[1:] + story.shots[:1]
  return sw.render_story(story, shots=shots, **render)


def swapped_protagonist(story: sw.Story, rng: np.random.Generator, **render) -> np.ndarray:
  """From the second shot on, a different protagonist: other shape, colours and texture."""
  p, s = story.protagonist, story.setting
  used = {p.colour, p.texture_colour, s.colour, s.pattern_colour}
  free = [c for c in sw.COLOURS if c not in used]
  colours = rng.permutation(free)[:2]
  other = sw.Protagonist(
      shape=str(rng.choice([x for x in sw.SHAPES if x != p.shape])),
      colour=str(colours[0]), texture=str(rng.choice([x for x in sw.TEXTURES if x != p.texture])),
      texture_colour=str(colours[1]))
  protagonists = [p] + [other] * (len(story.shots) - 1)
  return sw.render_story(story, protagonists=protagonists, **render)


def flickering(frames: np.ndarray, rng: np.random.Generator, amount: float = 0.25) -> np.ndarray:
  """Per-frame brightness jitter of +-amount."""
  gain = 1 + rng.uniform(-amount, amount, size=(frames.shape[0], 1, 1, 1))
  return np.clip(frames * gain, 0, 255).astype(np.uint8)
