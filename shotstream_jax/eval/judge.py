"""A pixel-only judge for StoryWorld videos (data/storyworld.py), analytic: no learned weights.

    scores = judge_video(frames, shot_captions, global_caption=...)   # frames uint8 [T, H, W, 3]
    scores.overall, scores.identity, scores.adherence, scores.cuts, scores.smoothness

Because we know the renderer's palette and geometry, every shot is *parsed* back into the
story's attributes, and a score is earned only by what the parse finds:
  * scene: most pixels must be palette colours (noise, blur, grey or blank frames are not);
    the frame border must show exactly two palette colours (the setting's); the protagonist is
    the largest connected blob of other pixels, of a plausible size, near the centre, compact;
  * attributes of a found shot: the setting's two colours and its kind (vertical stripes =
    room, checker = street, dots = field), the protagonist's shape (its rotational symmetry,
    from blur-invariant moments of its soft mass), its colours (body, plus the texture's if
    any: stripes split the body half and half, so the two are a set) and texture kind (solid /
    stripes / dot);
  * identity: every later shot against the first, the share of the five attributes that agree
    (colour sets by Jaccard; 0 for a shot that shows no scene). The texture, its colour and
    the setting's colours are never captioned, so only a model that remembers earlier shots
    keeps them;
    framing and camera motion are not attributes, so a cut costs nothing;
  * prompt adherence: framing from the protagonist's area-equivalent radius at mid-shot, camera
    motion from the trend of its centroid (pan) and log size (zoom), and, when the global caption
    is given, shape / colour / setting as captioned;
  * cut placement: frame-difference spikes must sit exactly at shot boundaries (F1);
  * smoothness: the temporal second difference inside shots (flicker, jumps) beyond what smooth
    constant-speed motion leaves; a shot that shows no scene scores 0.
Each score is in [0, 1]; `overall` is their mean. Shots are assumed equally long unless
`shot_lengths` is given.
"""

import dataclasses
import functools
from typing import List, Optional, Sequence

import numpy as np
from scipy import ndimage

from shotstream_jax.data import storyworld as sw
from shotstream_jax.io import video as video_io

_VALID_DIST = 60.0       # a pixel within this RGB distance of a palette colour gets its label
_BG_DIST = 40.0          # ... and is background if this close to the bg colours' blend segment
_SMOOTH_TOL, _SMOOTH_SCALE = 0.04, 0.03   # second-difference tolerance, decay
_CANON = 12              # canonical silhouette size of the shape-likeness gate
# Scene tests (fractions): palette pixels in a shot, bg colours on the border ring, the blob's
# share of all non-background pixels, its area / bounding box, its centre's offset from the
# frame centre (of the frame size), and the area-equivalent radius range (of the frame height).
_MIN_VALID, _MIN_RING, _MIN_BLOB, _MIN_FILL, _MAX_OFFSET = 0.6, 0.85, 0.7, 0.35, 0.25
_RADIUS_RANGE = (0.06, 0.45)
_MIN_SHAPE_IOU = 0.6     # silhouette vs its best canonical shape (is the blob a shape at all)
_MIN_TEXTURE = 0.08      # share of the blob in a second colour for a texture to count
_DOT_SPREAD = 0.75       # texture pixels' mean radius / the blob's: below = dot, above = stripes
ATTRIBUTES = ('shape', 'colours', 'texture', 'bg', 'setting')
# What a shot that shows no scene lacked, in the order the parse tests it (ShotMeasure.miss).
MISSES = ('palette', 'setting', 'protagonist', 'blob', 'shape')


@dataclasses.dataclass
class ShotMeasure:
  found: bool                 # the shot shows a StoryWorld scene (see module doc)
  why: str                    # what was missing when not found ('' when found)
  framing: Optional[str]      # measured
  motion: Optional[str]
  radius: float               # area-equivalent radius / frame height, mid-shot
  pan: float                  # centroid shift over the shot / frame width (+: scene moves right)
  zoom: float                 # log size change over the shot
  framing_ok: bool
  motion_ok: bool
  subject_ok: Optional[bool]  # shape, colour, setting as the global caption says (None: none)
  attributes: dict            # ATTRIBUTES -> parsed value (None where not found)
  miss: str = ''              # the MISSES kind of `why` ('' when found)


@dataclasses.dataclass
class Scores:
  identity: float
  adherence: float
  framing_accuracy: float
  motion_accuracy: float
  subject_accuracy: Optional[float]
  cuts: float
  smoothness: float
  found: float                # fraction of shots that show a scene
  overall: float
  identity_to_first: List[float]   # per shot k >= 2: attribute agreement with shot 1
  shots: List[ShotMeasure]

  def summary(self) -> dict:
    keys = ('overall', 'identity', 'adherence', 'framing_accuracy', 'motion_accuracy',
            'subject_accuracy', 'cuts', 'smoothness', 'found')
    return {k: round(float(getattr(self, k)), 3) for k in keys if getattr(self, k) is not None}


def judge_video(frames: np.ndarray, shot_captions: Sequence[str],
                shot_lengths: Optional[Sequence[int]] = None,
                global_caption: Optional[str] = None) -> Scores:
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
  if len(shot_lengths) != n or sum(shot_lengths) != frames.shape[0] or min(shot_lengths) < 1:
    raise ValueError(f'shot_lengths: {list(shot_lengths)} must have {n} positive entries summing '
                     f'to {frames.shape[0]}')
  subject = parse_global_caption(global_caption) if global_caption is not None else None
  x = frames.astype(np.float32)
  bounds = np.cumsum([0] + list(shot_lengths))
  shots = [x[bounds[i]:bounds[i + 1]] for i in range(n)]
  measures = [measure_shot(s, cap, subject) for s, cap in zip(shots, shot_captions)]

  to_first = [attribute_agreement(measures[0], m) for m in measures[1:]]
  identity = float(np.mean(to_first)) if to_first else float(measures[0].found)
  framing_acc = float(np.mean([m.framing_ok for m in measures]))
  motion_acc = float(np.mean([m.motion_ok for m in measures]))
  parts = [framing_acc, motion_acc]
  subject_acc = None
  if subject is not None:
    subject_acc = float(np.mean([bool(m.subject_ok) for m in measures]))
    parts.append(subject_acc)
  adherence = float(np.mean(parts))
  cuts = _cut_score(x, bounds[1:-1])
  smooth = float(np.mean([_smoothness(s) if m.found else 0.0 for s, m in zip(shots, measures)]))
  overall = float(np.mean([identity, adherence, cuts, smooth]))
  return Scores(identity, adherence, framing_acc, motion_acc, subject_acc, cuts, smooth,
                float(np.mean([m.found for m in measures])), overall, to_first, measures)


def attribute_agreement(a: ShotMeasure, b: ShotMeasure) -> float:
  """Share of ATTRIBUTES on which two shots agree (the background as a colour-set Jaccard);
  0 unless both show a scene."""
  if not (a.found and b.found):
    return 0.0
  parts = []
  for k in ATTRIBUTES:
    u, v = a.attributes[k], b.attributes[k]
    parts.append(len(u & v) / len(u | v) if k in ('colours', 'bg') else float(u == v))
  return float(np.mean(parts))


def parse_global_caption(caption: str) -> dict:
  """{'shape', 'colour', 'setting'} named by a StoryWorld global caption (None if absent)."""
  words = caption.lower().replace('.', ' ').split()
  pick = lambda names: next((w for w in words if w in names), None)
  return {'shape': pick(sw.SHAPES), 'colour': pick(sw.COLOURS), 'setting': pick(sw.SETTINGS)}


# ------------------------------------------------------------------------------- one shot


def _labels(x):
  d = np.linalg.norm(x[..., None, :] - sw.PALETTE_RGB, axis=-1)   # [..., P]
  lab = d.argmin(-1)
  return lab, np.take_along_axis(d, lab[..., None], -1)[..., 0] < _VALID_DIST


def _border_ring(h, w):
  ring = np.zeros((h, w), bool)
  k = max(1, min(h, w) // 16)
  ring[:k], ring[-k:], ring[:, :k], ring[:, -k:] = True, True, True, True
  return ring


def _blend_distance(x, i, j):
  """RGB distance of pixels x [..., 3] to the blends of palette colours i and j."""
  a, b = sw.PALETTE_RGB[i], sw.PALETTE_RGB[j]
  ab = b - a
  u = np.clip(((x - a) @ ab) / float(ab @ ab), 0, 1)
  return np.linalg.norm(x - (a + u[..., None] * ab), axis=-1)


def _setting_colours(x, lab, valid):
  """The palette pair whose blends explain the most border pixels (a pattern's anti-aliased
  edges blend its two colours, and a blend may look like a third palette colour), ties going
  to the pair with the most pure pixels; and the border's label histogram."""
  hist = np.bincount(lab[valid], minlength=len(sw.COLOURS)) / max(valid.sum(), 1)
  pairs = [(i, j) for i in range(len(sw.COLOURS)) for j in range(i + 1, len(sw.COLOURS))]
  score = [(float(np.mean(_blend_distance(x, i, j) <= _BG_DIST)), hist[i] + hist[j])
           for i, j in pairs]
  return list(pairs[max(range(len(pairs)), key=score.__getitem__)]), hist


def _blob(mask):
  """The largest 8-connected component of a cleaned [H, W] mask and its share of the mask.

  Anti-aliased edges blend two colours, and a blend can look like a third palette colour or
  like the background: closing bridges one-pixel gaps inside the protagonist (between texture
  stripes), hole filling restores its inside, opening drops one-pixel lines along the
  setting's pattern edges; the kept component then gets back the outline opening took (one
  dilation, within the closed mask), so thin corners of small shapes survive.
  """
  k = np.ones((3, 3), bool)
  closed = ndimage.binary_fill_holes(ndimage.binary_closing(mask, k, border_value=0))
  comp, count = ndimage.label(ndimage.binary_opening(closed, k), structure=k)
  if not count:
    return np.zeros_like(mask), 0.0
  sizes = np.bincount(comp.ravel())[1:]
  big = comp == 1 + int(np.argmax(sizes))
  return closed & ndimage.binary_dilation(big, k), float(sizes.max() / sizes.sum())


def measure_shot(x: np.ndarray, caption: str, subject: Optional[dict] = None) -> ShotMeasure:
  """Parse one shot [T, H, W, 3] (float RGB 0..255) and measure it against its caption."""
  t, h, w = x.shape[:3]
  lab, valid = _labels(x)
  want_framing, want_motion = sw.parse_shot_caption(caption)
  none = dict.fromkeys(ATTRIBUTES)

  def not_found(miss, why):
    return ShotMeasure(False, why, None, None, 0.0, 0.0, 0.0, False, False,
                       False if subject is not None else None, none, miss)

  if valid.mean() < _MIN_VALID:
    return not_found('palette', f'{valid.mean():.0%} of pixels are palette colours')
  ring = _border_ring(h, w)
  bg, hist = _setting_colours(x[:, ring], lab[:, ring], valid[:, ring])
  on_blend = _blend_distance(x, *bg) <= _BG_DIST                                  # [T, H, W]
  if min(hist[bg]) < 0.05 or on_blend[:, ring].mean() < _MIN_RING:
    return not_found('setting', 'the border does not show a two-colour setting')
  # Off the blend of the two setting colours, or a region (not a one-pixel edge blend) of
  # another palette colour: a body colour may lie on that blend line (orange between red and
  # yellow). Then cleaned: see _blob.
  other = np.stack([ndimage.binary_opening(m, np.ones((3, 3), bool))
                    for m in valid & ~np.isin(lab, bg)])
  fg = ~on_blend | other

  blobs = [_blob(fg[i]) for i in range(t)]
  area = np.array([m.sum() for m, _ in blobs], np.float64)
  mid = t // 2
  body, share = blobs[mid]
  radius = float(np.sqrt(area[mid] / np.pi) / h)
  if area[mid] == 0:
    return not_found('protagonist', 'no protagonist')
  ys, xs = np.nonzero(body)
  offset = max(abs(ys.mean() + 0.5 - h / 2) / h, abs(xs.mean() + 0.5 - w / 2) / w)
  fill = area[mid] / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
  if not (_RADIUS_RANGE[0] <= radius <= _RADIUS_RANGE[1] and share >= _MIN_BLOB and
          offset <= _MAX_OFFSET and fill >= _MIN_FILL):
    return not_found('blob', f'no protagonist-like blob (radius {radius:.2f}, share '
                     f'{share:.2f}, offset {offset:.2f}, fill {fill:.2f})')
  best, iou = _silhouette_match(body)
  if iou < _MIN_SHAPE_IOU:
    return not_found('shape', f'the blob matches no shape (best {best}, IoU {iou:.2f})')
  shape = _classify_shape(body, _blend_distance(x[mid], *bg))

  colours, texture = _protagonist_colours(lab[mid], valid[mid], body, set(bg))
  setting = _classify_setting(lab[mid], valid[mid], body, bg)
  attributes = dict(shape=shape, colours=colours, texture=texture,
                    bg=frozenset(sw.COLOURS[i] for i in bg), setting=setting)

  framing = _classify_framing(radius)
  ys_, xs_ = np.mgrid[:h, :w]
  cx = np.array([(m * xs_).sum() / max(m.sum(), 1) for m, _ in blobs])
  ok = area > 0
  ts = np.arange(t, dtype=np.float64)
  if ok.sum() >= 2 and t > 1:
    pan = float(np.polyfit(ts[ok], cx[ok], 1)[0] * (t - 1) / w)
    zoom = float(np.polyfit(ts[ok], 0.5 * np.log(area[ok]), 1)[0] * (t - 1))
  else:
    pan = zoom = 0.0
  motion = _classify_motion(pan, zoom)
  subject_ok = None
  if subject is not None:
    subject_ok = (subject['shape'] == shape and subject['setting'] == setting and
                  subject['colour'] in colours)
  return ShotMeasure(True, '', framing, motion, radius, pan, zoom, framing == want_framing,
                     motion == want_motion, subject_ok, attributes)


@functools.lru_cache(maxsize=None)
def _canonical_shapes():
  """Each shape's silhouette, cropped to its bounding box, at _CANON x _CANON."""
  return {s: _silhouette(m) for s, m in _shape_masks(256, 1.6).items()}


def _shape_masks(n: int, extent: float):
  """Each shape (area pi, centred on its centroid) rasterised on an n x n grid of pixel
  centres spanning [-extent, extent]^2 in the renderer's world units."""
  g = ((np.arange(n) + 0.5) / (n / 2) - 1.0) * extent
  yy, xx = np.meshgrid(g, g, indexing='ij')
  return {s: sw._inside_shape(s, xx, yy) for s in sw.SHAPES}  # pylint: disable=protected-access


def _silhouette(mask):
  ys, xs = np.nonzero(mask)
  crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
  return video_io.resize_frames(crop[..., None], (_CANON, _CANON))[..., 0] > 0.5


def _silhouette_match(body):
  """(best shape, IoU) of the blob's bounding-box silhouette against the canonical ones: the
  gate that the blob is shape-like at all. Not the shape's reading: one stray pixel widens
  the box and makes a square read rounder (see _classify_shape)."""
  sil = _silhouette(body)
  ious = {s: (sil & c).sum() / max((sil | c).sum(), 1) for s, c in _canonical_shapes().items()}
  best = max(ious, key=ious.get)
  return best, float(ious[best])


def _shape_moments(weight):
  """Scale-free complex moments (mu3, mu4) of a [H, W] mass: mu_n = sum w z^n / a^(1 + n/2),
  z = x + iy about the mass centroid (y down), a = sum w.

  Why these: the four shapes are told apart by their rotational symmetry alone (circle: both
  0; square / diamond: mu4 = -1/60 / +1/60; the apex-up triangle: mu3 imaginary, mu4 0), and
  a pure moment sum w z^n is unchanged by convolving w with any isotropic kernel (the kernel's
  own z^k moments vanish for k >= 1), so a blurred or anti-aliased edge does not move it.
  """
  ys, xs = np.mgrid[:weight.shape[0], :weight.shape[1]]
  a = weight.sum()
  z = (xs - (weight * xs).sum() / a) + 1j * (ys - (weight * ys).sum() / a)
  return np.array([(weight * z ** 3).sum() / a ** 2.5, (weight * z ** 4).sum() / a ** 3])


@functools.lru_cache(maxsize=None)
def _canonical_moments():
  return {s: _shape_moments(m.astype(np.float64)) for s, m in _shape_masks(512, 2.0).items()}


def _classify_shape(body, bg_distance):
  """The shape whose moments (_shape_moments) are nearest to the blob's soft mass.

  The mass is 1 inside the blob (eroded by a pixel) and, on its outline and one pixel beyond,
  the pixel's distance from the setting's colour blend relative to the blob's typical one: an
  edge pixel half body, half background counts about half. A hard mask would threshold the
  edge and round the corners of a slightly blurred square (a close-up square read as a circle).
  """
  core = ndimage.binary_erosion(body)
  ref = np.median(bg_distance[core if core.sum() >= 3 else body])
  edge = np.clip(bg_distance / max(float(ref), 1e-6), 0.0, 1.0)
  weight = np.where(core, 1.0, np.where(ndimage.binary_dilation(body), edge, 0.0))
  m = _shape_moments(weight)
  dist = {s: float(np.abs(m - c).sum()) for s, c in _canonical_moments().items()}
  return min(dist, key=dist.get)


def _protagonist_colours(lab, valid, body, bg):
  """(frozenset of the blob's colours, texture kind) from its palette labels."""
  inside = lab[body & valid]
  hist = np.bincount(inside, minlength=len(sw.COLOURS)) / max(len(inside), 1)
  order = [int(i) for i in np.argsort(-hist)]
  colour = order[0]
  second = next((i for i in order[1:] if i not in bg), None)
  if second is None or hist[second] < _MIN_TEXTURE:
    return frozenset([sw.COLOURS[colour]]), 'solid'
  ys, xs = np.nonzero(body)
  cy, cx = ys.mean(), xs.mean()
  ty, tx = np.nonzero(body & valid & (lab == second))
  spread = np.hypot(ty - cy, tx - cx).mean() / max(np.hypot(ys - cy, xs - cx).mean(), 1e-6)
  return (frozenset([sw.COLOURS[colour], sw.COLOURS[second]]),
          'dot' if spread < _DOT_SPREAD else 'stripes')


def _classify_setting(lab, valid, body, bg):
  """room (columns constant), street (checker: every row mixed), field (sparse dots)."""
  keep = valid & ~ndimage.binary_dilation(body, iterations=1) & np.isin(lab, bg)
  other = lab == bg[1]
  cols = [other[keep[:, j], j] for j in range(lab.shape[1]) if keep[:, j].sum() >= 2]
  constant = np.mean([c.mean() in (0.0, 1.0) or min(c.mean(), 1 - c.mean()) < 0.05
                      for c in cols]) if cols else 0.0
  if constant >= 0.8:
    return 'room'
  minority = min(other[keep].mean(), 1 - other[keep].mean()) if keep.any() else 0.0
  rows = [other[i, keep[i]] for i in range(lab.shape[0]) if keep[i].sum() >= 2]
  mixed = np.mean([0 < r.mean() < 1 for r in rows]) if rows else 0.0
  return 'street' if minority >= 0.36 and mixed >= 0.8 else 'field'


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


def _cut_score(x, boundaries):
  """F1 of detected cuts (difference spikes) against the shot boundaries."""
  if x.shape[0] < 2:
    return 1.0
  d = np.abs(np.diff(x, axis=0)).mean(axis=(1, 2, 3)) / 255.0     # d[t-1]: frame t-1 -> t
  is_b = np.zeros(len(d), bool)
  is_b[np.asarray(boundaries, int) - 1] = True
  # A cut is a spike: over twice every difference within 3 frames of it and over 0.04, so
  # motion inside a shot (pans and zooms over fine patterns change many pixels, in steps a
  # few frames apart) is no cut.
  r = 3
  dp = np.pad(d, r)
  local = np.max([dp[r + o:r + o + len(d)] for o in range(-r, r + 1) if o], axis=0)
  detected = d > np.maximum(2.0 * local, 0.04)
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
