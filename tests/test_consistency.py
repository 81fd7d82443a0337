"""eval/consistency.py against plain-loop numpy implementations written from the definitions.

The references below follow VBench's code line by line (Vchitect/VBench @45e79ec,
vbench/subject_consistency.py and background_consistency.py: normalise each frame feature, for
every frame after the first average max(0, cos) to the previous and to the first frame, divide the
clip's sum by T - 1), one shot at a time, in float64; ours scores all shots in one padded call.
Features are random and low-dimensional, so many cosines are negative and the clamp at 0 matters.
The last test checks the batched feature path that feeds these scores (eval/videos.py
FrameEncoder) split over two simulated devices against one plain call.
"""

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from shotstream_jax.eval import consistency

TOL = 1e-5


def _unit(v):
  return v / max(np.sqrt(np.sum(v * v)), 1e-12)


def _cos(a, b):
  return float(np.dot(_unit(a), _unit(b)))


def vbench_reference(frames, clamp=True):
  """VBench's per-video loop for one clip, frames [T, D] (`clamp=False`: without its max(0, .),
  to show the test can tell)."""
  floor = 0.0 if clamp else -math.inf
  video_sim = 0.0
  first = former = None
  for i, feature in enumerate(frames):
    if i == 0:
      first = feature
    else:
      sim_pre = max(floor, _cos(former, feature))
      sim_fir = max(floor, _cos(first, feature))
      video_sim += (sim_pre + sim_fir) / 2
    former = feature
  return video_sim / (len(frames) - 1) if len(frames) > 1 else math.nan


def inter_shot_reference(shots):
  """Mean over unordered pairs of shots of cos(mean unit feature, mean unit feature), and the
  cosine of each shot's mean against the first's."""
  means = [np.mean([_unit(f) for f in shot], axis=0) for shot in shots]
  pairs = [_cos(means[j], means[k]) for j in range(len(means)) for k in range(j + 1, len(means))]
  return (float(np.mean(pairs)) if pairs else math.nan), [_cos(means[0], m) for m in means]


def text_reference(frames, text):
  return float(np.mean([_cos(f, text) for f in frames])) if len(frames) else math.nan


def _random_shots(rng, lengths, dim=8, drift=0.6):
  """Shots of random-walk features (neighbouring frames correlated, as in video) with random
  scales, so that the normalisation is exercised too, and a quarter of the frames negated, so
  that cosines below 0 (clamped by VBench) are common."""
  shots = []
  for n in lengths:
    steps = rng.standard_normal((n, dim)) * drift
    steps[0] = rng.standard_normal(dim)
    scale = rng.uniform(0.1, 10.0, (n, 1)) * np.where(rng.random((n, 1)) < 0.25, -1.0, 1.0)
    shots.append(np.cumsum(steps, axis=0) * scale)
  return shots


def test_vbench_consistency_matches_reference_on_ragged_shots():
  rng = np.random.default_rng(0)
  lengths = [2, 5, 17, 1, 33, 9]
  shots = _random_shots(rng, lengths)
  padded, lens = consistency.pad_shots(shots)
  padded[0, 2:] = rng.standard_normal(padded[0, 2:].shape) * 100  # padding must not matter
  ours = np.asarray(consistency.vbench_consistency(padded, lens))[:len(shots)]
  ref = np.array([vbench_reference(s) for s in shots])
  assert np.isnan(ours[3]) and np.isnan(ref[3])          # one frame: undefined, as in VBench
  keep = ~np.isnan(ref)
  np.testing.assert_allclose(ours[keep], ref[keep], atol=TOL)
  # The clamp is exercised: without it the scores move well beyond the tolerance.
  unclamped = np.array([vbench_reference(s, clamp=False) for s in shots])
  assert np.abs(unclamped - ref)[keep].max() > 0.05


def test_vbench_consistency_hand_made():
  e = np.eye(3)
  shot = np.stack([e[0], e[0], -e[0], e[1]])[None]
  # t=1: prev 1, first 1 -> 1; t=2: prev max(0,-1)=0, first 0 -> 0; t=3: 0, 0 -> 0.
  np.testing.assert_allclose(consistency.vbench_consistency(shot, [4]), [1 / 3], atol=1e-7)
  np.testing.assert_allclose(consistency.vbench_consistency(shot, [2]), [1.0], atol=1e-7)


def test_inter_shot_matches_reference():
  rng = np.random.default_rng(1)
  stories = [[4, 7, 3], [5], [2, 9, 6, 4, 8], [3, 3]]
  shots = [s for story in stories for s in _random_shots(rng, story)]
  padded, lens = consistency.pad_shots(shots)
  means = np.asarray(consistency.shot_means(padded, lens))[:len(shots)]
  grouped, counts = consistency.pad_stories(means, [len(s) for s in stories])
  pairs, vs_first = (np.asarray(x) for x in consistency.inter_shot(grouped, counts))
  start = 0
  for s, story in enumerate(stories):
    ref_pairs, ref_first = inter_shot_reference(shots[start:start + len(story)])
    start += len(story)
    if math.isnan(ref_pairs):
      assert np.isnan(pairs[s])
    else:
      assert pairs[s] == pytest.approx(ref_pairs, abs=TOL)
    np.testing.assert_allclose(vs_first[s, :len(story)], ref_first, atol=TOL)
    assert np.isnan(vs_first[s, len(story):]).all()


def test_text_alignment_matches_reference():
  rng = np.random.default_rng(2)
  shots = _random_shots(rng, [3, 11, 1, 20], dim=6)
  texts = rng.standard_normal((len(shots), 6)) * 5
  padded, lens = consistency.pad_shots(shots)
  rows = np.zeros((len(padded), 6), np.float32)
  rows[:len(texts)] = texts
  ours = np.asarray(consistency.text_alignment(padded, lens, rows))[:len(shots)]
  ref = [text_reference(s, t) for s, t in zip(shots, texts)]
  np.testing.assert_allclose(ours, ref, atol=TOL)


def test_padding_rounds_shapes_and_rejects_bad_input():
  padded, lens = consistency.pad_shots([np.ones((3, 4)), np.ones((20, 4))])
  assert padded.shape == (16, 32, 4) and lens.tolist()[:3] == [3, 20, 0]
  with pytest.raises(ValueError, match='one width'):
    consistency.pad_shots([np.ones((3, 4)), np.ones((3, 5))])
  with pytest.raises(ValueError, match='at least one shot'):
    consistency.pad_shots([])
  with pytest.raises(ValueError, match='shots_per_story'):
    consistency.pad_stories(np.ones((3, 4)), [2, 2])


_SHARDED = textwrap.dedent("""
    import dataclasses, jax, numpy as np
    from shotstream_jax.eval import consistency, videos, vit
    assert jax.device_count() == 2, jax.devices()
    cfg = dataclasses.replace(vit.tiny_dino(), image_size=224, patch=32)
    params = vit.init_params(cfg, jax.random.key(0))
    frames = np.random.default_rng(0).integers(0, 256, (7, 40, 60, 3), dtype=np.uint8)
    enc = videos.FrameEncoder(params, cfg, 'dino', batch_size=3)   # rounded up to 4
    assert enc.batch_size == 4
    for part in (frames[:2], frames[2:2], frames[2:7]):             # any amounts, one shape
      enc.push(part)
    got = enc.finish()
    ref = consistency.l2_normalize(vit.image_features(params, cfg, vit.preprocess(frames, 'dino')))
    print('max diff', float(np.abs(got - np.asarray(ref)).max()))
    assert got.shape == (7, 64) and np.allclose(got, ref, atol=1e-5)
    """)


def test_frame_encoder_sharded_over_two_devices_matches_one_call():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu')
  res = subprocess.run([sys.executable, '-c', _SHARDED], env=env, capture_output=True,
                       text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
