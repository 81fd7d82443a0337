"""launch/export.py: a training checkpoint (LoRA or not) -> the files `--ckpt` of generate.py reads
(load_dit for .safetensors, checkpoints.restore_params for orbax directories)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shotstream_jax import checkpoints
from shotstream_jax.convert import dit as dit_convert
from shotstream_jax import loading
from shotstream_jax.models import dit
from shotstream_jax.models import lora as lora_lib
from shotstream_jax.models import random_init
from shotstream_jax.training import train_loop

sys.path.insert(0, os.path.dirname(__file__))
import train_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, train_fixtures.REPO)
from configs.train import dmd_inter  # pylint: disable=g-import-not-at-top,wrong-import-position
from launch import export as export_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def _write_run(workdir, config, step=4):
  """A DMD-shaped training checkpoint: generator + adapters with non-zero B, critic, teacher."""
  shapes = dit.param_shapes(config.model)
  base = random_init.random_params(shapes, 0)
  adapters = lora_lib.init_lora(base, config.lora, jax.random.key(1))
  # init_lora zeroes B (merge would be a no-op); give it values so the merge is visible.
  adapters = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
      if 'lora_b' in jax.tree_util.keystr(p) else x, adapters)
  params = {'generator': base, 'generator_lora': adapters,
            'critic': random_init.random_params(shapes, 2),
            'teacher': random_init.random_params(shapes, 3)}
  state = train_loop.TrainState(step=jnp.int32(step), params=params, opt_state={},
                                rng=jax.random.key_data(jax.random.key(0)))
  ck = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'), interval=step)
  ck.save(step, state, {'position': 3})
  ck.close()
  return params


def test_export_merges_lora_and_the_loaders_read_it(tmp_path):
  config = dmd_inter.get_config('tiny')
  config.lora.enabled = True
  params = _write_run(str(tmp_path / 'run'), config)
  merged = lora_lib.merge(params['generator'], params['generator_lora'],
                          lora_lib.as_config(config.lora))
  # Merging really changed the weights, so the comparisons below can fail.
  assert not np.allclose(merged['blocks']['self_attn']['q']['kernel'],
                         params['generator']['blocks']['self_attn']['q']['kernel'])

  st = export_lib.export(config, str(tmp_path / 'run'), 'generator',
                         str(tmp_path / 'g.safetensors'))
  od = export_lib.export(config, str(tmp_path / 'run'), 'generator', str(tmp_path / 'g_orbax'))
  from_st = dit_convert.load_dit(st, config.model)
  from_od = checkpoints.restore_params(od)
  for got in (from_st, from_od):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(merged)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
  # Without LoRA the base generator itself comes out; other networks by name.
  config.lora.enabled = False
  critic = export_lib.export(config, str(tmp_path / 'run'), 'critic', str(tmp_path / 'c_orbax'))
  for a, b in zip(jax.tree.leaves(checkpoints.restore_params(critic)),
                  jax.tree.leaves(params['critic'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_cli_errors(tmp_path):
  config = dmd_inter.get_config('tiny')
  _write_run(str(tmp_path / 'run'), config)
  with pytest.raises(ValueError, match=r"--workdir: checkpoint .* has no network\(s\) \['vae'\]"):
    loading.restore_networks(str(tmp_path / 'run'), ['vae'])
  repo = train_fixtures.REPO
  cmd = [sys.executable, os.path.join(repo, 'launch', 'export.py'),
         f'--config={os.path.join(repo, "configs", "train", "dmd_inter.py")}:tiny']
  p = subprocess.run(cmd + [f'--workdir={tmp_path / "nope"}', f'--out={tmp_path / "x"}'],
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith(
      'error: --workdir:'), p.stderr[-2000:]
  p = subprocess.run(cmd + [f'--workdir={tmp_path / "run"}', f'--out={tmp_path / "g"}',
                            '--network=teacher', '--config.model.dim=128'],
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 2 and 'error: --config:' in p.stderr, p.stderr[-2000:]
  p = subprocess.run(cmd + [f'--workdir={tmp_path / "run"}', f'--out={tmp_path / "t"}',
                            '--network=teacher'], capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  assert 'export: teacher of' in p.stdout


def test_generation_runs_a_training_workdir_with_the_embedded_encoders(tmp_path):
  """--ckpt=<workdir> at tiny: the run's generator + the embedded VAE / text encoder (the draws
  StoryWorld was encoded with); a LoRA run is refused with the way out."""
  from configs import shotstream  # pylint: disable=g-import-not-at-top
  from shotstream_jax import pipeline  # pylint: disable=g-import-not-at-top
  from shotstream_jax import text as text_lib  # pylint: disable=g-import-not-at-top
  from shotstream_jax.models import tokenizer  # pylint: disable=g-import-not-at-top
  config = shotstream.get_config('tiny')
  config.sampling.shot_latent_frames = 3
  train_config = dmd_inter.get_config('tiny')
  params = _write_run(str(tmp_path / 'run'), train_config)
  with pytest.raises(ValueError, match=r"--ckpt: 'generator' .* LoRA .* launch/export.py"):
    pipeline.ShotStreamPipeline.with_embedded_encoders(config, str(tmp_path / 'run'))
  train_config.lora.enabled = False
  export_lib.export(train_config, str(tmp_path / 'run'), 'generator', str(tmp_path / 'g'))

  story = ['a red ball rolls', 'close-up of the ball']
  got = pipeline.ShotStreamPipeline.with_embedded_encoders(config, str(tmp_path / 'g'), seed=0)
  want = pipeline.ShotStreamPipeline(
      config, params['generator'], random_init.embedded_vae(config.vae, 0),
      text_lib.PromptEncoder(random_init.embedded_text(config.text, 0), config.text,
                             tokenizer.HashTokenizer(config.text.text_len,
                                                     config.text.vocab_size)))
  a, b = got.generate(story, seed=3), want.generate(story, seed=3)
  assert a.shape == (2 * 9, 64, 96, 3)
  np.testing.assert_array_equal(a, b)
