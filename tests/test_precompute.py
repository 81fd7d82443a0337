"""Precompute: StoryWorld -> VAE latents + umT5 embeddings in array_record shards, resumable."""

import functools
import os
import pickle
import shutil
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import data as data_cfg
from configs import shotstream
from shotstream_jax import context as context_lib
from shotstream_jax import text as text_lib
from shotstream_jax.data import precompute as pc
from shotstream_jax.data import prompts
from shotstream_jax.data import storyworld_builder as swb
from shotstream_jax.models import tokenizer as tokenizer_lib
from shotstream_jax.models import vae as vae_lib

sys.path.insert(0, os.path.dirname(__file__))
import text_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = 5
PER_SHARD = 2     # -> 3 shards, the last one short


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  """Tiny encoders with random weights, a 5-story StoryWorld source, and one finished run."""
  root = tmp_path_factory.mktemp('precompute')
  tok = text_fixtures.write_tokenizer_folder(root / 'tok')
  cfg = shotstream.get_config('tiny')
  encoders = pc.build_encoders(cfg, tokenizer_path=str(tok))
  dcfg = data_cfg.get_config('tiny').storyworld
  dcfg.num_train, dcfg.num_heldout = NUM, 1
  builder = swb.StoryWorld(cfg=dcfg, data_dir=str(root / 'tfds'))
  builder.download_and_prepare()
  source = builder.as_data_source()['train']
  out = str(root / 'out')
  result = pc.precompute(source, out, encoders, context_frames=cfg.model.context_frames,
                         examples_per_shard=PER_SHARD, source_name='storyworld:train',
                         progress=False)
  return dict(cfg=cfg, encoders=encoders, source=source, out=out, result=result, root=root,
              tok=str(tok))


def _run(world, out, **kw):
  kw = dict(dict(context_frames=world['cfg'].model.context_frames, examples_per_shard=PER_SHARD,
                 source_name='storyworld:train', progress=False), **kw)
  return pc.precompute(world['source'], out, world['encoders'], **kw)


def _copy(world, name):
  dst = str(world['root'] / name)
  shutil.copytree(world['out'], dst)
  return dst


def _shards(out):
  return sorted(f for f in os.listdir(out) if f.startswith('shard-'))


def test_context_rule_by_hand():
  # 3 shots of 9 frames. Target 1: 6 frames of shot 0 at round(linspace(0, 8, 6)).
  # Target 2: 3 + 3 at linspace(0, 8, 3) and linspace(9, 17, 3).
  np.testing.assert_array_equal(context_lib.context_indices([9, 9, 9], 1, 6), [0, 2, 3, 5, 6, 8])
  np.testing.assert_array_equal(context_lib.context_indices([9, 9, 9], 2, 6), [0, 4, 8, 9, 13, 17])
  np.testing.assert_array_equal(context_lib.context_candidates([9, 9, 9], 6),
                                [0, 2, 3, 4, 5, 6, 8, 9, 13, 17])
  # 4 earlier shots: 1 each, the remainder (2) to the last two shots.
  assert context_lib.frame_budget(4, 6) == [1, 1, 2, 2]
  np.testing.assert_array_equal(context_lib.context_indices([5, 5, 5, 5, 5], 4, 6),
                                [0, 5, 10, 14, 15, 19])
  assert len(context_lib.context_candidates([9], 6)) == 0   # a single shot has no later target


def test_end_to_end_records_equal_direct_encodes(world):
  result, out, cfg, enc = world['result'], world['out'], world['cfg'], world['encoders']
  assert result.processed == [0, 1, 2] and result.skipped == [] and result.num_shards == 3
  assert _shards(out) == [pc.shard_name(i, 3) for i in range(3)]
  assert not [f for f in os.listdir(out) if f.endswith(pc.TMP_SUFFIX)]
  ds = pc.PrecomputedSource(out)
  assert len(ds) == NUM
  # Independent references: our own jits of the public functions, a fresh prompt cache.
  encode = jax.jit(functools.partial(vae_lib.encode, enc.vae))
  encode_image = jax.jit(functools.partial(vae_lib.encode_image, enc.vae))
  tok = tokenizer_lib.UMT5Tokenizer(world['tok'], cfg.text.text_len)
  text = text_lib.PromptEncoder(enc.prompt_encoder.params, cfg.text, tok)
  seen_shots = set()
  for i in range(NUM):
    ex, rec = world['source'][i], ds[i]
    frames = np.asarray(ex['frames'], np.float32) / 127.5 - 1
    n_shots = len(ex['shot_captions'])
    seen_shots.add(n_shots)
    f = 9                                              # tiny StoryWorld: 9 = 4k+1 frames a shot
    sid = ex['story_id']
    assert rec['id'] == (sid.decode() if isinstance(sid, bytes) else sid)
    np.testing.assert_array_equal(rec['shot_frames'], [f] * n_shots)
    np.testing.assert_array_equal(rec['shot_latent_frames'], [3] * n_shots)
    np.testing.assert_array_equal(rec['latent_shot'], np.repeat(np.arange(n_shots), 3))
    assert rec['latents'].shape == (3 * n_shots, 4, 4, 16) and rec['latents'].dtype == np.float32
    assert np.isfinite(rec['latents']).all() and rec['latents'].std() > 1e-3
    for s in range(n_shots):
      want = np.asarray(encode(enc.vae_params, jnp.asarray(frames[s * f:(s + 1) * f])[None]))[0]
      np.testing.assert_allclose(rec['latents'][3 * s:3 * s + 3], want, rtol=1e-5, atol=1e-5)
    idx = context_lib.context_candidates([f] * n_shots, cfg.model.context_frames)
    np.testing.assert_array_equal(rec['ctx_frame_index'], idx)
    np.testing.assert_array_equal(rec['ctx_shot'], idx // f)
    assert rec['ctx_latents'].shape == (len(idx), 4, 4, 16)
    for c, k in enumerate(idx):
      want = np.asarray(encode_image(enc.vae_params, jnp.asarray(frames[k])[None]))[0, 0]
      np.testing.assert_allclose(rec['ctx_latents'][c], want, rtol=1e-5, atol=1e-5)
    for t in range(1, n_shots):    # every target's reference choice is among the candidates
      assert set(context_lib.context_indices(rec['shot_frames'], t, 6)) <= set(rec['ctx_frame_index'])
    g = ex['global_caption'].decode()
    caps = [c.decode() for c in ex['shot_captions']]
    assert rec['prompts'] == [prompts.shot_prompt(g, s, c) for s, c in enumerate(caps)]
    assert rec['text'].shape == (n_shots, cfg.text.text_len, cfg.text.d_model)
    np.testing.assert_allclose(rec['text'], np.asarray(text(rec['prompts'])), atol=1e-6)
    lengths = tok(rec['prompts'])[1]
    np.testing.assert_array_equal(rec['text_lengths'], lengths)
    np.testing.assert_array_equal(rec['identity'], ex['identity'])
  assert len(seen_shots) > 1                         # examples of different shot counts
  np.testing.assert_allclose(ds.negative(), np.asarray(text(pc.NEGATIVE_PROMPT))[0], atol=1e-6)
  packed = pc.PrecomputedSource(out, pad_text=False)[0]
  assert packed['text_emb'].shape == (packed['text_lengths'].sum(), cfg.text.d_model)


def test_rerun_finds_nothing_to_do(world):
  out = _copy(world, 'rerun')
  stamps = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in _shards(out)}
  result = _run(world, out)
  assert result.processed == [] and result.skipped == [0, 1, 2]
  assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in _shards(out)} == stamps


def test_interrupted_run_is_completed(world):
  out = _copy(world, 'killed')
  # A killed run: shard 1 never finished (only a half-written temp file), shard 2 never began.
  os.remove(os.path.join(out, pc.shard_name(2, 3)))
  final = os.path.join(out, pc.shard_name(1, 3))
  os.replace(final, final + pc.TMP_SUFFIX)
  with open(final + pc.TMP_SUFFIX, 'r+b') as f:
    f.truncate(100)
  with pytest.raises(FileNotFoundError, match=r'incomplete, shards \[1, 2\] of 3 missing'):
    pc.PrecomputedSource(out)
  result = _run(world, out)
  assert result.processed == [1, 2] and result.skipped == [0]
  assert not [f for f in os.listdir(out) if f.endswith(pc.TMP_SUFFIX)]
  for name in _shards(out):   # deterministic: byte-identical to the uninterrupted run
    with open(os.path.join(out, name), 'rb') as a, open(os.path.join(world['out'], name),
                                                         'rb') as b:
      assert a.read() == b.read(), name


def test_processes_split_shards(world):
  out = str(world['root'] / 'hosts')
  one = _run(world, out, process_index=1, process_count=2)
  assert one.processed == [1] and _shards(out) == [pc.shard_name(1, 3)]
  zero = _run(world, out, process_index=0, process_count=2)
  assert zero.processed == [0, 2] and len(_shards(out)) == 3
  assert len(pc.PrecomputedSource(out)) == NUM


def test_grain_reads_it_and_settings_are_checked(world):
  ds = pc.PrecomputedSource(world['out'])
  ds = pickle.loads(pickle.dumps(ds))          # grain workers get a pickled copy
  got = list(grain.MapDataset.source(ds).shuffle(seed=0))
  assert sorted(r['id'] for r in got) == sorted(ds[i]['id'] for i in range(NUM))
  with pytest.raises(ValueError, match='different settings .*context_frames'):
    _run(world, world['out'], context_frames=4)
  with pytest.raises(ValueError, match='examples_per_shard'):
    _run(world, str(world['root'] / 'bad'), examples_per_shard=0)


@pytest.mark.parametrize('case', ['tokenizer', 'data', 'out'])
def test_cli_bad_input_is_one_line(tmp_path, case):
  (tmp_path / 'file').write_text('x')
  args, expected = {
      # tiny has an embedded tokenizer (no --tokenizer needed); wan_1_3b does not
      'tokenizer': (['--config=configs/shotstream.py:wan_1_3b', '--data=storyworld',
                     f'--out={tmp_path}/o'], "error: tokenizer: required at preset 'wan_1_3b'"),
      'data': ([f'--data={tmp_path}/nope', f'--out={tmp_path}/o'],
               "error: data: '" + str(tmp_path / 'nope') + "' is neither"),
      'out': (['--data=storyworld', f'--out={tmp_path}/file/o'], 'error: --out: cannot create'),
  }[case]
  res = subprocess.run([sys.executable, 'launch/precompute.py', *args], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 2, res.stderr[-2000:]
  assert res.stderr.strip().splitlines()[-1].startswith(expected), res.stderr[-500:]
  assert 'Traceback' not in res.stderr


def test_reference_format_trims_shots_to_4k_plus_1(world):
  """Shots of 7 and 12 frames (a reference-builder record) -> clips of 5 and 9 frames."""
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, (19, 32, 32, 3), dtype=np.uint8)
  ex = {'frames': frames, 'shot_index': np.repeat(np.int32([0, 1]), [7, 12]),
        'frame_index': np.concatenate([np.arange(7), np.arange(10, 22)]).astype(np.int32),
        'frame_ranges': np.int32([[0, 7], [10, 22]]), 'shot_captions': [b'a cat', b'a dog'],
        'global_caption': b'A story. ', 'video_path': b'v.mp4', 'line': np.int32(2)}
  out = str(world['root'] / 'reference')
  result = pc.precompute([ex], out, world['encoders'], context_frames=6, progress=False)
  assert result.processed == [0]
  rec = pc.PrecomputedSource(out)[0]
  enc = world['encoders']
  assert rec['id'] == 'v.mp4:2'
  np.testing.assert_array_equal(rec['shot_frames'], [7, 12])
  np.testing.assert_array_equal(rec['shot_latent_frames'], [2, 3])
  unit = frames.astype(np.float32) / 127.5 - 1
  want = np.concatenate([vae_lib.encode(enc.vae, enc.vae_params, jnp.asarray(unit[:5])[None])[0],
                         vae_lib.encode(enc.vae, enc.vae_params, jnp.asarray(unit[7:16])[None])[0]])
  np.testing.assert_allclose(rec['latents'], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(rec['ctx_frame_index'], [0, 1, 2, 4, 5, 6])  # linspace(0, 6, 6)
  np.testing.assert_array_equal(rec['frame_ranges'], ex['frame_ranges'])
  single = dict(ex, frames=frames[:7], shot_index=np.zeros(7, np.int32), shot_captions=[b'a'])
  rec = pc.encode_example(single, enc, 6)           # one shot: no later target, no candidates
  assert rec['ctx_latents'].shape == (0, 4, 4, 16) and rec['latents'].shape == (2, 4, 4, 16)
  with pytest.raises(ValueError, match='every one of the 3 captioned shots needs frames'):
    pc.encode_example(dict(ex, shot_captions=[b'a', b'b', b'c']), enc, 6)
