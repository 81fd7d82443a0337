"""Stages 3-4 (DMD) through train_loop.train on tiny StoryWorld, one CPU device: finite losses,
the generator (params and AdamW state) updated only every `dmd.generator_every` steps, the
critic every step, the teacher never; LoRA trains only adapters; bad configs fail clearly."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.train import dmd_inter
from configs.train import dmd_intra
from shotstream_jax.models import dit
from shotstream_jax.models import lora as lora_lib
from shotstream_jax.models import vae as vae_lib
from shotstream_jax.training import dmd_stage
from shotstream_jax.training import losses
from shotstream_jax.training import metrics as metrics_lib
from shotstream_jax.training import rollout
from shotstream_jax.training import sharding as sharding_lib
from shotstream_jax.training import train_loop

sys.path.insert(0, os.path.dirname(__file__))
import train_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return train_fixtures.shared_data_dir(tmp_path_factory)


def _config(module, data_dir, **overrides):
  stage = module.__name__.rsplit('.', 1)[-1]
  return train_fixtures.tiny_config(data_dir, stage, **{
      'train.tensorboard': False, 'train.checkpoint_every': 1000, 'train.num_steps': 3,
      **overrides})


def _train(config, workdir):
  """Runs `config`; returns (initial params, [(params, opt_state, metrics)] per step) on host."""
  stage = dmd_stage.DmdStage(config, workdir)
  load = stage.dit_params
  # Wan's init zeroes some layers (the DiT outputs 0): perturb it, the same for every network.
  stage.dit_params = lambda *a, **k: _perturbed(load(*a, **k))
  tx = stage.optimizer()
  mesh = sharding_lib.make_mesh(config.mesh)
  _, shardings = train_loop.state_shardings(stage, tx, mesh, sharding_lib.logical_rules(config))
  init_key, _ = jax.random.split(jax.random.key(config.train.seed))
  initial = jax.device_get(stage.init_params(init_key, shardings.params))
  steps = []
  hook = lambda step, state, m: steps.append(
      (jax.device_get(state.params), jax.device_get(state.opt_state), m))
  train_loop.train(config, workdir, stage=stage, step_hook=hook)
  return initial, steps


def _perturbed(params):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def _same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def _gen_opt(opt_state, net='generator'):
  return opt_state.inner_states[net]


def _check_schedule(initial, steps, gen='generator', critic='critic'):
  """generator_every=2: steps 1 and 3 update the generator, step 2 does not."""
  assert [m['generator_step'] for _, _, m in steps] == [1.0, 0.0, 1.0]
  for params, _, m in steps:
    assert np.isfinite(m['loss']) and np.isfinite(m['critic_loss']) and m['finite'] == 1.0
    assert _same(params['teacher'], initial['teacher'])
  (p1, o1, m1), (p2, o2, m2), (p3, o3, m3) = steps
  # A critic-only step does not measure the generator's loss: NaN, left out of the log.
  assert m1['dmd_loss'] > 0 and np.isnan(m2['dmd_loss']) and m2[f'grad_norm/{gen}'] == 0
  assert not _same(p1[gen], initial[gen])
  assert _same(p2[gen], p1[gen]) and _same(_gen_opt(o2, gen), _gen_opt(o1, gen))
  assert not _same(p3[gen], p2[gen]) and not _same(_gen_opt(o3, gen), _gen_opt(o2, gen))
  for before, after in ((initial, p1), (p1, p2), (p2, p3)):
    assert not _same(after[critic], before[critic])


def test_dmd_intra_schedule(data_dir, tmp_path):
  initial, steps = _train(_config(dmd_intra, data_dir, **{'train.log_every': 2}), str(tmp_path))
  _check_schedule(initial, steps)
  # Logged rows average the window: every row shows the generator's loss of the generator
  # steps in it (the reference's parity never met the log interval: always 0 before).
  rows = metrics_lib.read_jsonl(str(tmp_path))
  assert [r['step'] for r in rows] == [2, 3]
  assert rows[0]['dmd_loss'] == pytest.approx(steps[0][2]['dmd_loss'])
  assert rows[1]['dmd_loss'] == pytest.approx(steps[2][2]['dmd_loss'])
  assert rows[0]['generator_step'] == 0.5 and rows[1]['generator_step'] == 1.0
  assert _same(initial['generator'], initial['teacher'])   # '' = the teacher's weights
  counts = [int(np.max(jax.tree.leaves(
      jax.tree_util.tree_map_with_path(lambda p, x: x if 'count' in str(p) else 0,
                                       _gen_opt(o)))[0])) for _, o, _ in steps]
  assert counts == [1, 1, 2]    # AdamW's step count counts generator updates only


def test_dmd_inter_schedule(data_dir, tmp_path):
  initial, steps = _train(_config(dmd_inter, data_dir), str(tmp_path))
  _check_schedule(initial, steps)
  assert _same(steps[-1][0]['vae'], initial['vae'])


def test_generator_gradient_shot_by_shot_equals_the_joint_loss(data_dir, tmp_path):
  """Stage 4's `_generator_grads` sums per-shot gradients (one shot's residuals alive at a
  time); the reference here is the gradient of the joint loss, every shot's rollout in one
  graph. Three shots, one of them masked in a story of two."""
  num_shots = 3
  config = _config(dmd_inter, data_dir, **{'dmd.num_shots': num_shots})
  stage = dmd_stage.DmdStage(config, str(tmp_path))
  load = stage.dit_params
  stage.dit_params = lambda *a, **k: _perturbed(load(*a, **k))
  mesh = sharding_lib.make_mesh(config.mesh)
  _, shardings = train_loop.state_shardings(stage, stage.optimizer(), mesh,
                                            sharding_lib.logical_rules(config))
  params = stage.init_params(jax.random.key(0), shardings.params)
  batches = iter(stage.train_iterator(0, 1, 2))
  for _ in range(20):   # a batch with a two-shot story, whose third shot is masked
    batch = jax.tree.map(jnp.asarray, next(batches))
    if float(jnp.sum(batch['shot_mask'])) < batch['shot_mask'].size:
      break
  assert float(jnp.sum(batch['shot_mask'])) < batch['shot_mask'].size
  key = jax.random.key(3)
  loss, shots, _, grads = jax.jit(stage._generator_grads)(params, batch, key)

  sg = jax.lax.stop_gradient
  teacher = params['teacher']
  critic = dmd_stage.merged_params(config, params, 'critic')

  def joint(train_p):
    p = dmd_stage.merged_params(config, dict(params, generator=train_p))
    k_roll, k_score = jax.random.split(key)
    k_exit, k_roll = jax.random.split(k_roll)
    exits = stage._exit_steps(k_exit, num_shots)
    decoded, total, weight = [], 0.0, 0.0
    for s in range(num_shots):
      ctx, choice = rollout.history_context(stage.vae, params['vae'], decoded,
                                            config.model.context_frames,
                                            (batch['text'].shape[0],) + stage.latent_hw +
                                            (config.model.in_channels,))
      plan, table = rollout.shot_plan(config.model, sg(p), ctx, choice, batch['text'])
      mask = batch['shot_mask'][:, s]
      x = rollout.rollout_shot(stage.sampler, p, plan, jax.random.fold_in(k_roll, s),
                               exits[s]).latents
      frames_mask = jnp.broadcast_to(mask[:, None], x.shape[:2])
      shot_loss, _ = losses.generator_dmd_loss(
          config.model, x, teacher, critic, rollout.frameconcat(plan, x.shape[1]), table,
          stage.uncond_text, jax.random.fold_in(k_score, s), stage.score_cfg, mask=frames_mask)
      total, weight = total + jnp.sum(mask) * shot_loss, weight + jnp.sum(mask)
      decoded.append(sg(vae_lib.decode(stage.vae, params['vae'], sg(x))))
    return total / jnp.maximum(weight, 1.0)

  ref_loss, ref_grads = jax.jit(jax.value_and_grad(joint))(params['generator'])
  assert len(shots) == num_shots
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grads))
  assert scale > 0
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5 * scale)


def test_lora_trains_only_adapters_and_exports_merged(data_dir, tmp_path):
  config = _config(dmd_intra, data_dir, **{'lora.enabled': True, 'train.num_steps': 2,
                                           'dmd.generator_every': 1})
  initial, steps = _train(config, str(tmp_path))
  params = steps[-1][0]
  for net in ('generator', 'critic', 'teacher'):
    assert _same(params[net], initial[net])
  for net in ('generator_lora', 'critic_lora'):
    assert not _same(params[net], initial[net])
  merged = dmd_stage.merged_params(config, params)
  cfg = lora_lib.as_config(config.lora)
  q = params['generator_lora']['blocks']['self_attn']['q']
  np.testing.assert_allclose(
      merged['blocks']['self_attn']['q']['kernel'],
      params['generator']['blocks']['self_attn']['q']['kernel'] +
      lora_lib.delta(q['lora_a'], q['lora_b'], lora_lib.scale(cfg)), atol=1e-6)
  m = config.model
  x = jax.random.normal(jax.random.key(0), (1, 3, 4, 4, m.in_channels))
  t, text = np.full((1, 3), 500.0, np.float32), np.zeros((1, 5, m.text_dim), np.float32)
  run = lambda p: dit.WanDiT(m).apply({'params': p}, x, t, text)
  assert float(np.max(np.abs(run(merged) - run(params['generator'])))) > 0
  exported = dmd_stage.export_merged(config, params)
  assert all(np.all(np.isfinite(v)) for v in exported.values())


@pytest.mark.parametrize('field,value,match', [
    ('dmd.generator_every', 0, 'dmd.generator_every'),
    ('dmd.negative', 'none', 'dmd.negative'),
    ('dmd.max_timestep', 10.0, 'dmd.min_timestep/max_timestep'),
    ('stage', 'teacher', 'stage'),
])
def test_bad_config(data_dir, tmp_path, field, value, match):
  with pytest.raises(ValueError, match=match):
    dmd_stage.DmdStage(_config(dmd_intra, data_dir, **{field: value}), str(tmp_path))


def test_bad_lora_rank(data_dir, tmp_path):
  config = _config(dmd_inter, data_dir, **{'lora.enabled': True, 'lora.rank': 0})
  with pytest.raises(ValueError, match='lora.rank'):
    dmd_stage.DmdStage(config, str(tmp_path))
