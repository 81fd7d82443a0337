"""loading.py: a network's params from a training workdir, a step dir, an orbax dir or a
Wan-layout safetensors file; stage 1 initialised from a workdir through it."""

import os
import sys

import jax
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from configs import shotstream
from shotstream_jax import checkpoints
from shotstream_jax.convert import dit as convert_dit
from shotstream_jax import loading
from shotstream_jax.training import sharding
from shotstream_jax.training import teacher_stage
from shotstream_jax.training import train_loop

sys.path.insert(0, os.path.dirname(__file__))
import train_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position


def _assert_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_load_from_workdir_step_dir_and_orbax_dir(tmp_path_factory, tmp_path):
  data_dir = train_fixtures.shared_data_dir(tmp_path_factory)
  c = train_fixtures.tiny_config(data_dir, **{'train.num_steps': 1, 'train.checkpoint_every': 1})
  workdir = str(tmp_path / 'teacher')
  state = train_loop.train(c, workdir)
  want = state.params['teacher']
  _assert_equal(loading.load_network_params(workdir, 'teacher', c.model), want)
  _assert_equal(loading.load_network_params(os.path.join(workdir, 'checkpoints', '1'), 'teacher',
                                        c.model), want)
  with pytest.raises(ValueError, match=r"init_from: .* no network 'generator'"):
    loading.load_network_params(workdir, 'generator', c.model)

  # Stage 1 resumed from its own workdir through teacher.init_from.
  stage = teacher_stage.TeacherStage(c, str(tmp_path / 'again'))
  tx = stage.optimizer()
  _, sh = train_loop.state_shardings(stage, tx, sharding.make_mesh(c.mesh),
                                     sharding.logical_rules(c))
  c.teacher.init_from = workdir
  _assert_equal(stage.init_params(jax.random.key(0), sh.params)['teacher'], want)

  st_file = str(tmp_path / 'diffusion_pytorch_model.safetensors')
  safetensors_numpy.save_file(convert_dit.dit_to_torch(want, c.model), st_file)
  _assert_equal(loading.load_network_params(st_file, 'any', c.model), want)

  orbax_dir = checkpoints.save_params(str(tmp_path / 'params'), want)
  _assert_equal(loading.load_network_params(orbax_dir, 'teacher', c.model), want)
  other = c.model.copy_and_resolve_references()
  other.num_layers = c.model.num_layers + 1
  with pytest.raises(ValueError, match='ode.init_from: .*model config'):
    loading.load_network_params(orbax_dir, 'teacher', other, field='ode.init_from')


def test_missing_or_empty_path(tmp_path):
  cfg = shotstream.model_config('tiny')
  with pytest.raises(FileNotFoundError, match='x.init_from: .* does not exist'):
    loading.load_network_params(str(tmp_path / 'nope'), 'teacher', cfg, field='x.init_from')
  with pytest.raises(ValueError, match='x.init_from: empty path'):
    loading.load_network_params('', 'teacher', cfg, field='x.init_from')
  os.makedirs(tmp_path / 'empty' / 'checkpoints')
  with pytest.raises(FileNotFoundError, match='no complete checkpoint'):
    loading.load_network_params(str(tmp_path / 'empty'), 'teacher', cfg)
