"""Stage 1 teacher: examples, w(t), masked (self-attention only) training, NaN policy,
held-out loss going down, metrics files, the launch/train.py CLI. One CPU device."""

import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shotstream_jax import context as context_lib
from shotstream_jax import loading
from shotstream_jax.models import dit
from shotstream_jax.models import random_init
from shotstream_jax.sampling import schedule
from shotstream_jax.training import metrics as metrics_lib
from shotstream_jax.training import sharding
from shotstream_jax.training import teacher_stage
from shotstream_jax.training import train_loop

sys.path.insert(0, os.path.dirname(__file__))
import train_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return train_fixtures.shared_data_dir(tmp_path_factory)


def _record(shot_frames=(9, 9, 9), latents_per_shot=3, text_len=5, dim=4):
  """A precomputed-format record whose values say where they came from."""
  s = len(shot_frames)
  lat = np.arange(s * latents_per_shot, dtype=np.float32)[:, None, None, None] * np.ones(
      (1, 2, 2, 16), np.float32)
  cand = context_lib.context_candidates(list(shot_frames), 6)
  ctx = (100.0 + cand.astype(np.float32))[:, None, None, None] * np.ones((1, 2, 2, 16),
                                                                         np.float32)
  text = (1.0 + np.arange(s, dtype=np.float32))[:, None, None] * np.ones((1, text_len, dim))
  return dict(id='r', shot_frames=np.asarray(shot_frames, np.int32), latents=lat,
              latent_shot=np.repeat(np.arange(s), latents_per_shot).astype(np.int32),
              ctx_latents=ctx, ctx_frame_index=cand, text=text.astype(np.float32))


def test_example_layout_last_shot():
  ex = teacher_stage.make_example(_record(), np.random.default_rng(0), context_frames=6,
                                  target_frames=4, target_shot='last')
  # Target shot 2: 3 frames each from shots 0 and 1 at round(linspace) (pixel frames 0,4,8 |
  # 9,13,17), ids 0,0,0,1,1,1; the target carries id 2 and its own caption.
  np.testing.assert_array_equal(ex['latents'][:6, 0, 0, 0], 100 + np.array([0, 4, 8, 9, 13, 17]))
  np.testing.assert_array_equal(ex['latents'][6:, 0, 0, 0], [6, 7, 8, 0])   # padded to 4
  np.testing.assert_array_equal(ex['target_mask'], [0] * 6 + [1, 1, 1, 0])
  np.testing.assert_array_equal(ex['frame_shot'], [0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
  np.testing.assert_array_equal(ex['frame_caption'], [0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
  np.testing.assert_array_equal(ex['text'][:, 0, 0], [1, 2, 3, 3, 3, 3, 3])  # table of 7 rows


def test_example_first_shot_has_zero_context():
  rng = np.random.default_rng(0)
  for _ in range(20):
    ex = teacher_stage.make_example(_record(), rng, context_frames=6, target_frames=3)
    if ex['frame_shot'][-1] == 1 and not ex['latents'][:6].any():
      break
  else:
    raise AssertionError('shot 0 never drawn as target')
  np.testing.assert_array_equal(ex['frame_shot'], [0] * 6 + [1] * 3)
  np.testing.assert_array_equal(ex['frame_caption'], [0] * 9)
  np.testing.assert_array_equal(ex['latents'][6:, 0, 0, 0], [0, 1, 2])
  np.testing.assert_array_equal(ex['text'][:, 0, 0], [1] * 7)
  with pytest.raises(ValueError, match='teacher.target_shot'):
    teacher_stage.make_example(_record(), rng, context_frames=6, target_frames=3,
                               target_shot='first')


def test_example_without_context_is_the_shot_alone():
  """context_frames=0 (teacher.use_context=False, pre-training): no context frames, the target shot
  routed as a first shot (id 1) but on its own caption (a table of that one row)."""
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(30):
    ex = teacher_stage.make_example(_record(), rng, context_frames=0, target_frames=1)
    s = int(ex['latents'][0, 0, 0, 0]) // 3        # latents count 0..8, 3 per shot
    seen.add(s)
    assert ex['latents'].shape == (1, 2, 2, 16) and ex['latents'][0, 0, 0, 0] == 3 * s
    np.testing.assert_array_equal(ex['frame_shot'], [1])
    np.testing.assert_array_equal(ex['frame_caption'], [0])
    np.testing.assert_array_equal(ex['target_mask'], [1])
    np.testing.assert_array_equal(ex['text'][:, 0, 0], [1 + s])
  assert seen == {0, 1, 2}


def test_context_free_teacher_trains(data_dir, tmp_path):
  c = train_fixtures.tiny_config(data_dir, **{
      'teacher.use_context': False, 'teacher.target_frames': 1, 'train.num_steps': 40,
      'train.eval_every': 40, 'train.log_every': 10, 'train.checkpoint_every': 40})
  workdir = str(tmp_path / 'run')
  train_loop.train(c, workdir)
  evals = [r['eval/flow_mse'] for r in metrics_lib.read_jsonl(workdir) if 'eval/flow_mse' in r]
  assert len(evals) == 2 and evals[1] < 0.8 * evals[0], evals
  batch = next(teacher_stage.TeacherStage(c, str(tmp_path / 'again')).train_iterator(0, 1, 4))
  assert batch['latents'].shape[1] == 1 and batch['text'].shape[1] == 1


def test_mixed_example_carries_stage1a_images_of_its_story():
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(10):
    ex = teacher_stage.make_mixed_example(_record(), rng, images=3, context_frames=6,
                                          target_frames=4, target_shot='last')
    np.testing.assert_array_equal(ex['latents'][6:, 0, 0, 0], [6, 7, 8, 0])   # the video part
    img = ex['images']
    assert img['latents'].shape == (3, 1, 2, 2, 16) and img['text'].shape == (3, 1, 5, 4)
    s = img['latents'][:, 0, 0, 0, 0].astype(int) // 3
    np.testing.assert_array_equal(img['latents'][:, 0, 0, 0, 0], 3 * s)   # a shot's first latent
    np.testing.assert_array_equal(img['text'][:, 0, 0, 0], 1 + s)          # on its own caption
    np.testing.assert_array_equal(img['frame_shot'], [[1]] * 3)
    seen.update(s.tolist())
  assert seen == {0, 1, 2}
  assert 'images' not in teacher_stage.make_mixed_example(_record(), rng, images=0,
                                                          context_frames=6, target_frames=4)


def test_image_mix_adds_the_image_stage_loss_and_trains(data_dir, tmp_path):
  """The mixed loss is the video loss plus image_weight x what stage 1a (use_context=False,
  target_frames=1, a separately built stage) computes on the same images; a run logs both."""
  c = train_fixtures.tiny_config(data_dir, **{
      'teacher.image_mix': 2, 'teacher.image_weight': 0.5, 'train.num_steps': 4,
      'train.log_every': 2, 'train.eval_every': 0, 'train.checkpoint_every': 4})
  stage = teacher_stage.TeacherStage(c, str(tmp_path / 'probe'))
  batch = next(stage.train_iterator(0, 1, 4))
  assert batch['images']['latents'].shape[:3] == (4, 2, 1)
  params = {'teacher': dit.init_params(c.model, jax.random.key(0))}
  key = jax.random.key(3)
  total, metrics = stage.loss(params, batch, key)
  c1a = train_fixtures.tiny_config(data_dir, **{'teacher.use_context': False,
                                                'teacher.target_frames': 1})
  image_stage = teacher_stage.TeacherStage(c1a, str(tmp_path / 'probe1a'))
  flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch['images'].items()}
  image_loss, _ = image_stage.loss(params, flat, jax.random.split(key)[1])
  np.testing.assert_allclose(total - metrics['video_loss'], 0.5 * image_loss, rtol=1e-5)
  assert float(image_loss) > 0
  workdir = str(tmp_path / 'run')
  train_loop.train(c, workdir)
  rows = [r for r in metrics_lib.read_jsonl(workdir) if 'image_flow_mse' in r]
  assert rows and all(np.isfinite(r['image_flow_mse']) for r in rows)
  with pytest.raises(ValueError, match='teacher.image_mix'):
    teacher_stage.TeacherStage(train_fixtures.tiny_config(data_dir, **{'teacher.image_mix': -1}),
                               str(tmp_path / 'bad'))


def test_heldout_split_smaller_than_a_batch_is_an_error(data_dir, tmp_path):
  # 8 held-out stories, batches of 16: evaluation would have no batch and be skipped silently.
  c = train_fixtures.tiny_config(data_dir, **{'data.batch_size': 16, 'train.eval_every': 1,
                                              'train.num_steps': 1})
  with pytest.raises(ValueError, match=r'data.batch_size: 16 per process is more than the 8'):
    train_loop.train(c, str(tmp_path / 'run'))


def test_image_stage_config():
  from configs.train import teacher_image  # pylint: disable=g-import-not-at-top
  c = teacher_image.get_config('storyworld')
  assert (c.train.num_steps, c.optim.teacher.decay_steps) == (10000, 0)
  assert not c.teacher.use_context and c.teacher.target_frames == 1
  c.train.num_steps = 20000      # extending the run leaves the schedule constant
  assert c.optim.teacher.decay_steps == 0


def test_loss_weights():
  t = schedule.shifted_grid(1000, 8.0) * 1000
  w = teacher_stage.loss_weights(t)
  assert abs(w.mean() - 1) < 1e-12 and w[0] == 0 and t[0] == 1000
  assert abs(t[np.argmax(w)] - 500) < 2
  np.testing.assert_allclose(teacher_stage.loss_weights(t, 'uniform'), 1.0)


def test_snr_clamp_caps_the_x0_error_factor():
  """With x0 prediction the flow error is the x0 error / sigma^2; 'snr_clamp' weights make the
  x0 error's factor min(1/sigma^2, gamma), up to the mean-1 normalisation."""
  t = schedule.shifted_grid(1000, 1.0) * 1000
  sigma = t / 1000
  w = teacher_stage.loss_weights(t, 'snr_clamp', snr_gamma=5.0)
  factor = w / np.maximum(sigma, 1e-3) ** 2
  expect = np.minimum(1 / np.maximum(sigma, 1e-3) ** 2, 5.0)
  np.testing.assert_allclose(factor / factor[0], expect / expect[0], rtol=1e-9)
  assert abs(w.mean() - 1) < 1e-12
  with pytest.raises(ValueError, match='teacher.snr_gamma: must be > 0'):
    teacher_stage.loss_weights(t, 'snr_clamp', snr_gamma=0.0)


def _state(stage, tx, mesh, params):
  _, sh = train_loop.state_shardings(stage, tx, mesh, sharding.logical_rules(stage.config))
  params = jax.device_put(params, sh.params)
  return sh, train_loop.TrainState(
      step=jnp.int32(0), params=params, opt_state=tx.init(params),
      rng=jax.random.key_data(jax.random.key(0)))


def test_only_self_attention_trains(data_dir, tmp_path):
  c = train_fixtures.tiny_config(data_dir, **{'optim.teacher.trainable': 'self_attn'})
  stage = teacher_stage.TeacherStage(c, str(tmp_path))
  tx = stage.optimizer()
  params = {'teacher': random_init.random_params(dit.param_shapes(c.model), 0)}
  _, state = _state(stage, tx, sharding.make_mesh(c.mesh), params)
  step = jax.jit(train_loop.guarded(stage.train_step(tx)))
  new, m = step(state, next(stage.train_iterator(0, 1, 4)))
  assert np.isfinite(m['loss'])
  changed = {jax.tree_util.keystr(p): bool(np.any(np.asarray(a) != np.asarray(b)))
             for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(new.params)[0],
                                  jax.tree.leaves(params))}
  trained = sorted(k for k, v in changed.items() if v)
  assert trained and all('self_attn' in k for k in trained), trained
  assert all(v for k, v in changed.items() if 'self_attn' in k)


def test_nonfinite_stops_or_skips(data_dir, tmp_path):
  def inject(step, batch):
    if step == 3:
      batch = dict(batch, latents=batch['latents'].copy())
      batch['latents'][0, -1, 0, 0, 0] = np.nan
    return batch
  c = train_fixtures.tiny_config(data_dir, **{'train.num_steps': 3, 'train.checkpoint_every': 1})
  with pytest.raises(train_loop.NonFiniteError, match='at step 3'):
    train_loop.train(c, str(tmp_path / 'stop'), batch_hook=inject)
  assert not os.path.exists(tmp_path / 'stop' / 'checkpoints' / '3')   # never saved

  c.train.skip_nonfinite = True
  skipped = train_loop.train(c, str(tmp_path / 'skip'), batch_hook=inject)
  c.train.num_steps = 2
  clean = train_loop.train(c, str(tmp_path / 'clean'))
  for a, b in zip(jax.tree.leaves(skipped.params), jax.tree.leaves(clean.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(skipped.opt_state), jax.tree.leaves(clean.opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(skipped.step) == 3
  last = metrics_lib.read_jsonl(str(tmp_path / 'skip'))[-1]
  assert last['step'] == 3 and last['finite'] == 0 and last['skipped_steps'] == 1


def _tb_scalars(folder):
  """tag -> [(step, value)] from TensorBoard event files, read without TensorFlow."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = {}
  for name in os.listdir(folder):
    with open(os.path.join(folder, name), 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_heldout_loss_goes_down(data_dir, tmp_path):
  steps = 150
  c = train_fixtures.tiny_config(data_dir, **{
      'train.num_steps': steps, 'train.eval_every': 50, 'train.log_every': 10,
      'train.checkpoint_every': 50})
  workdir = str(tmp_path / 'run')
  train_loop.train(c, workdir)
  records = metrics_lib.read_jsonl(workdir)
  evals = [(r['step'], r['eval/loss'], r['eval/flow_mse']) for r in records if 'eval/loss' in r]
  print('held-out (step, weighted flow loss, flow mse):', evals)
  assert [e[0] for e in evals] == [0, 50, 100, 150]
  assert evals[-1][1] < 0.5 * evals[0][1], evals
  train_losses = [r['loss'] for r in records if 'loss' in r]
  assert len(train_losses) == steps // 10 and np.all(np.isfinite(train_losses))
  tb = _tb_scalars(os.path.join(workdir, metrics_lib.TB_DIR))
  assert [s for s, _ in tb['eval/loss']] == [0, 50, 100, 150]
  np.testing.assert_allclose([v for _, v in tb['eval/loss']], [e[1] for e in evals], rtol=1e-6)


def test_cli_trains_resumes_and_rejects_bad_mesh(data_dir, tmp_path):
  repo = train_fixtures.REPO
  base = [sys.executable, os.path.join(repo, 'launch', 'train.py'),
          f'--config={os.path.join(repo, "configs", "train", "teacher.py")}:tiny',
          f'--workdir={tmp_path / "w"}', f'--config.data.dir={data_dir}',
          '--config.data.storyworld.num_train=24', '--config.data.storyworld.num_heldout=8',
          '--config.train.eval_every=0', '--config.train.checkpoint_every=2',
          '--config.train.log_every=1']
  run = lambda *extra: subprocess.run(base + list(extra), capture_output=True, text=True,
                                      cwd=str(tmp_path), timeout=300)
  p = run('--config.train.num_steps=2')
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'finished at step 2' in p.stdout
  p = run('--config.train.num_steps=4')
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'finished at step 4' in p.stdout
  steps = [r['step'] for r in metrics_lib.read_jsonl(str(tmp_path / 'w')) if 'loss' in r]
  assert steps == [1, 2, 3, 4]
  p = run('--config.mesh.tensor=3')
  assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith('error: mesh:'), \
      p.stderr[-2000:]


def test_ema_tracks_the_weights_and_loaders_read_it(data_dir, tmp_path):
  """optim.teacher.ema_decay > 0: the state keeps an EMA equal to the recurrence written out on
  the host from every step's params (rate min(decay, (1+n)/(10+n))); it is checkpointed,
  resumed, and what `load_network_params` / `restore_networks` give for the workdir."""
  decay = 0.6
  c = train_fixtures.tiny_config(data_dir, **{
      'optim.teacher.ema_decay': decay, 'train.num_steps': 6, 'train.checkpoint_every': 3})
  seen = []
  hook = lambda step, state, m: seen.append(jax.device_get((state.params, state.ema)))
  workdir = str(tmp_path / 'run')
  c.train.num_steps = 3
  train_loop.train(c, workdir, step_hook=hook)
  c.train.num_steps = 6
  final = train_loop.train(c, workdir, step_hook=hook)        # resumes at step 3
  assert len(seen) == 6
  stage = teacher_stage.TeacherStage(c, workdir)
  tx = stage.optimizer()
  _, sh = train_loop.state_shardings(stage, tx, sharding.make_mesh(c.mesh),
                                     sharding.logical_rules(c), ('teacher',))
  want = jax.device_get(train_loop.init_state(stage, tx, sh, c.train.seed).ema['teacher'])
  for n, (params, ema) in enumerate(seen):
    rate = min(decay, (1.0 + n) / (10.0 + n))
    want = jax.tree.map(lambda e, p, r=rate: r * e + (1 - r) * p, want, params['teacher'])
    for a, b in zip(jax.tree.leaves(ema['teacher']), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  ema = jax.device_get(final.ema['teacher'])
  raw = jax.device_get(final.params['teacher'])
  assert any(np.abs(a - b).max() > 1e-4 for a, b in zip(jax.tree.leaves(ema),
                                                         jax.tree.leaves(raw)))
  for loaded in (loading.load_network_params(workdir, 'teacher', c.model),
                 loading.restore_networks(workdir, ['teacher'])['teacher']):
    for a, b in zip(jax.tree.leaves(jax.device_get(loaded)), jax.tree.leaves(ema)):
      np.testing.assert_array_equal(a, b)


def test_ema_decay_out_of_range_is_an_error(data_dir, tmp_path):
  c = train_fixtures.tiny_config(data_dir, **{'optim.teacher.ema_decay': 1.0,
                                              'train.num_steps': 1})
  with pytest.raises(ValueError, match=r'optim.teacher.ema_decay: must be in \[0, 1\)'):
    train_loop.train(c, str(tmp_path / 'run'))
