"""VBench-style consistency and text alignment on frame features, many shots per jitted call.

    feats, lengths = pad_shots([dino_features_of_shot for each shot])   # [N, T, D], [N]
    subject = vbench_consistency(feats, lengths)                         # [N], one per shot
    means = shot_means(feats, lengths)                                   # [N, D]
    pairs, vs_first = inter_shot(*pad_stories(means, shots_per_story))   # [S], [S, K]
    clip_text = text_alignment(clip_feats, lengths, text_feats)          # [N]

Shots of different lengths share one padded array: `lengths` [N] says how many leading frames of
each row are real (frames t < length; the rest are ignored, whatever they hold), so one compiled
call scores every shot of every video. Features come in as the models return them (any scale):
every function normalises them itself. A score that is undefined (a one-frame shot, a story with
one shot) comes back NaN, for the caller to report as skipped rather than as a number.

Definitions (sources next to each function):
  * subject / background consistency of one shot (VBench, Huang et al. 2024): the same formula on
    DINO (subject) or CLIP image (background) features;
  * inter-shot consistency of one story: cosine between the mean features of its shots, over all
    pairs of shots (and of each shot against the first);
  * text alignment of one shot: mean over its frames of the cosine of the frame's CLIP image
    feature with the CLIP text feature of the shot's prompt.
"""

from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# Padded frame / shot counts are rounded up to a multiple of this, so runs over similar videos
# reuse one compiled program instead of compiling one per longest shot.
PAD_MULTIPLE = 16


def l2_normalize(x, axis: int = -1):
  """Unit vectors along `axis` (zero stays zero: the 1e-12 floor, as F.normalize's eps)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def frame_mask(lengths, num_frames: int):
  """bool [N, T]: frame t of shot n is real iff t < lengths[n]."""
  return jnp.arange(num_frames)[None, :] < jnp.asarray(lengths)[:, None]


@jax.jit
def vbench_consistency(features, lengths):
  """[N] VBench subject / background consistency of each shot (NaN for shots under 2 frames).

  VBench (Vchitect/VBench @45e79ec, vbench/subject_consistency.py and
  background_consistency.py): with f_t the L2-normalised feature of frame t of a clip of T frames,

      score = 1 / (T - 1) * sum_{t=1}^{T-1} (max(0, cos(f_{t-1}, f_t)) + max(0, cos(f_0, f_t))) / 2

  i.e. each frame after the first is compared with the previous and with the first frame, each
  cosine clamped at 0, the two averaged; the clip's score is the mean over its T - 1 frames
  (VBench's `video_results`). VBench applies it to whole videos; here each shot is one clip, since
  across a cut the previous-frame term measures the cut, not consistency. The same function
  serves both dimensions: DINO ViT-B/16 features -> subject, CLIP ViT-B/32 image features ->
  background (VBench's choice of models and preprocessing lives in eval/vit.py `preprocess`).

  Args:
    features: [N, T, D] frame features, shot n's frames in rows 0..lengths[n] - 1.
    lengths: [N] int frame counts.
  """
  f = l2_normalize(jnp.asarray(features, jnp.float32))
  lengths = jnp.asarray(lengths, jnp.int32)
  cur = f[:, 1:]
  to_prev = jnp.maximum(0.0, jnp.sum(f[:, :-1] * cur, axis=-1))
  to_first = jnp.maximum(0.0, jnp.sum(f[:, :1] * cur, axis=-1))
  valid = frame_mask(lengths, f.shape[1])[:, 1:]
  total = jnp.sum(jnp.where(valid, (to_prev + to_first) / 2, 0.0), axis=1)
  count = lengths - 1
  return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)


@jax.jit
def shot_means(features, lengths):
  """[N, D] mean of each shot's unit frame features over its real frames (zeros if none).

  The appearance of a shot as one vector: averaging unit features keeps what stays put over the
  shot (the subject, the set) and washes out what moves.
  """
  f = l2_normalize(jnp.asarray(features, jnp.float32))
  mask = frame_mask(lengths, f.shape[1])
  total = jnp.sum(jnp.where(mask[..., None], f, 0.0), axis=1)
  return total / jnp.maximum(jnp.asarray(lengths, jnp.float32), 1.0)[:, None]


@jax.jit
def inter_shot(shot_features, num_shots):
  """(pairs [S], vs_first [S, K]): inter-shot consistency of S stories of up to K shots.

  pairs[s] is the mean, over all unordered pairs of distinct shots j < k of story s, of
  cos(m_j, m_k), m_k the mean unit feature of shot k (`shot_means`); NaN for one-shot stories.
  vs_first[s, k] is cos(m_0, m_k) (1 at k = 0, NaN past the story's shots). No clamp at 0 (the
  cosines compared here are of shot prototypes, not VBench's per-frame terms).

  Why all pairs: a story's shots legitimately differ in framing and may alternate between
  characters (shot-reverse-shot), so no single shot is the reference; averaging over every pair
  asks whether the story stays in one world, treats all shots alike and does not depend on their
  order. `vs_first` keeps the per-shot view used for error accumulation (how far shot k has
  drifted from the opening, as the StoryWorld harness reports identity against shot 1). Values
  are relative: compare models on the same stories, not against an absolute level.

  Args:
    shot_features: [S, K, D] per-shot features (e.g. `shot_means`), story s in rows < num_shots[s].
    num_shots: [S] int shot counts.
  """
  g = l2_normalize(jnp.asarray(shot_features, jnp.float32))
  n = jnp.asarray(num_shots, jnp.int32)
  k = g.shape[1]
  sim = jnp.einsum('sjd,skd->sjk', g, g)
  real = frame_mask(n, k)
  pair = real[:, :, None] & real[:, None, :] & ~jnp.eye(k, dtype=bool)[None]
  count = n * (n - 1)             # ordered pairs: each unordered pair is counted twice
  pairs = jnp.sum(jnp.where(pair, sim, 0.0), axis=(1, 2)) / jnp.maximum(count, 1)
  pairs = jnp.where(n > 1, pairs, jnp.nan)
  vs_first = jnp.where(real, sim[:, 0, :], jnp.nan)
  return pairs, vs_first


@jax.jit
def text_alignment(features, lengths, text_features):
  """[N] mean over each shot's real frames of cos(CLIP image feature, CLIP text feature).

  The per-frame term of VBench's text-frame dimension (vbench/appearance_style.py: CLIP's
  logits_per_text / 100, i.e. exp(logit_scale) / 100 * cosine, which is the cosine itself for
  OpenAI's weights, exp(logit_scale) = 100), averaged over the frames of a shot against that shot's
  prompt. Reported as a cosine in [-1, 1]; 100 x this (clamped at 0) is CLIPScore's scale as
  torchmetrics computes it. NaN for empty shots.

  Args:
    features: [N, T, D] CLIP image features; lengths: [N]; text_features: [N, D], one per shot.
  """
  f = l2_normalize(jnp.asarray(features, jnp.float32))
  t = l2_normalize(jnp.asarray(text_features, jnp.float32))
  lengths = jnp.asarray(lengths, jnp.int32)
  cos = jnp.einsum('ntd,nd->nt', f, t)
  total = jnp.sum(jnp.where(frame_mask(lengths, f.shape[1]), cos, 0.0), axis=1)
  return jnp.where(lengths > 0, total / jnp.maximum(lengths, 1), jnp.nan)


# ------------------------------------------------------------------------------ padding (numpy)


def _round_up(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def pad_shots(shots: Sequence[np.ndarray], multiple: int = PAD_MULTIPLE
              ) -> Tuple[np.ndarray, np.ndarray]:
  """([N', T, D] zero-padded features, [N'] lengths) of N per-shot arrays [T_n, D].

  N and T are rounded up to `multiple` (extra rows have length 0 and score NaN: slice them off
  with [:N]), so that similar runs hit one compiled shape.
  """
  if not shots:
    raise ValueError('shots: need at least one shot of features')
  dims = {np.shape(s)[-1] for s in shots}
  if len(dims) != 1 or any(np.ndim(s) != 2 for s in shots):
    raise ValueError(f'shots: need [T, D] arrays of one width D, got shapes '
                     f'{sorted({tuple(np.shape(s)) for s in shots})}')
  lengths = np.array([len(s) for s in shots], np.int32)
  out = np.zeros((_round_up(len(shots), multiple), _round_up(int(lengths.max()), multiple),
                  dims.pop()), np.float32)
  for i, s in enumerate(shots):
    out[i, :len(s)] = s
  return out, np.pad(lengths, (0, len(out) - len(shots)))


def pad_stories(shot_rows: np.ndarray, shots_per_story: Sequence[int],
                multiple: int = PAD_MULTIPLE) -> Tuple[np.ndarray, np.ndarray]:
  """([S', K, D], [S']) for `inter_shot`: consecutive rows of `shot_rows` [N, D] grouped into
  stories of shots_per_story[s] shots (they must sum to at most N), S and K rounded up."""
  shot_rows = np.asarray(shot_rows, np.float32)
  counts = np.asarray(shots_per_story, np.int32)
  if not len(counts) or counts.min() < 1 or counts.sum() > len(shot_rows):
    raise ValueError(f'shots_per_story: need positive counts summing to at most '
                     f'{len(shot_rows)} rows, got {counts.tolist()}')
  out = np.zeros((_round_up(len(counts), multiple), _round_up(int(counts.max()), multiple),
                  shot_rows.shape[-1]), np.float32)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  for s, (a, n) in enumerate(zip(starts, counts)):
    out[s, :n] = shot_rows[a:a + n]
  return out, np.pad(counts, (0, len(out) - len(counts)))
