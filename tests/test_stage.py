"""training/stage.py and training/optim.py: the stage contract and who trains what."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.train import common
from shotstream_jax.training import optim as optim_lib
from shotstream_jax.training import stage as stage_lib


def _params():
  return {'student': {'attn': {'kernel': jnp.ones((2, 2))}, 'mlp': {'kernel': jnp.ones((2, 3))}},
          'adapter': {'attn': {'lora_a': jnp.ones((2, 1))}},
          'teacher': {'attn': {'kernel': jnp.ones((2, 2))}}}


def _optim(**sections):
  c = ml_collections.ConfigDict()
  for name, trainable in sections.items():
    c[name] = common.adamw(lr=0.1, clip=0.0, trainable=trainable)
  return c


def test_labels_freeze_every_network_outside_trained_and_read_the_role_section():
  optim = _optim(student='attn', generator='')
  labels = optim_lib.param_labels(_params(), optim, {'student': 'student', 'adapter': 'generator'})
  assert labels['student']['attn']['kernel'] == 'student'
  assert labels['student']['mlp']['kernel'] == optim_lib.FROZEN      # not matched by 'attn'
  assert labels['adapter']['attn']['lora_a'] == 'adapter'            # reads optim.generator
  assert labels['teacher']['attn']['kernel'] == optim_lib.FROZEN     # not trained at all


def test_frozen_params_do_not_move_and_hold_no_moments():
  params = _params()
  tx = optim_lib.make_optimizer(_optim(student=''), ['student'])
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(grads, state, params)
  assert all(float(jnp.max(jnp.abs(u))) > 0 for u in jax.tree.leaves(updates['student']))
  for net in ('adapter', 'teacher'):
    assert all(float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree.leaves(updates[net]))
  moments = [x for x in jax.tree.leaves(state) if np.ndim(x) == 2]
  assert sum(int(np.size(x)) for x in moments) == 2 * (4 + 6)   # mu and nu of 'student' only


def test_missing_section_is_named():
  with pytest.raises(ValueError, match=r"optim: no section for network\(s\) \['generator'\]"):
    optim_lib.make_optimizer(_optim(student=''), {'adapter': 'generator'})


class _Tiny(stage_lib.Stage):
  networks = ('student', 'teacher')

  def boxed_shapes(self):
    return {n: jax.eval_shape(lambda: p) for n, p in _params().items() if n in self.networks}

  def init_params(self, key, shardings):
    return {n: _params()[n] for n in self.networks}

  def train_iterator(self, shard_index, shard_count, batch_size):
    return iter([])

  def trained(self):
    return {'student': 'student'}


def test_the_contract_is_enforced():
  class Incomplete(stage_lib.Stage):
    networks = ('student',)

    def boxed_shapes(self):
      return {}
  with pytest.raises(TypeError, match='abstract'):
    Incomplete(ml_collections.ConfigDict(), '')
  c = ml_collections.ConfigDict({'stage': 'tiny', 'optim': _optim(student='')})
  tiny = _Tiny(c, '')
  with pytest.raises(NotImplementedError, match='_Tiny: define loss'):
    tiny.loss({}, {}, None)
  assert tiny.eval_batches(2) == []
  tiny.check_frozen_sections()                       # no section for the frozen teacher: fine
  c.optim.teacher = common.adamw(lr=0.0, clip=0.0, trainable='mlp')
  tiny.check_frozen_sections()                       # a section that matches none of its params
  c.optim.teacher.trainable = 'attn'
  with pytest.raises(ValueError, match=r"optim.teacher.trainable: must match no param .*'attn'"):
    tiny.check_frozen_sections()
