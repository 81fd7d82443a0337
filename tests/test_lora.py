"""LoRA: merged weights vs adapters applied at run time (an independent formulation through
`nn.intercept_methods`), training only the adapter, PEFT state-dict round trips, export."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import shotstream
from shotstream_jax.convert import common
from shotstream_jax.convert import dit as dit_convert
from shotstream_jax.models import dit
from shotstream_jax.models import lora as lora_lib

CFG = lora_lib.LoraConfig(rank=4, alpha=8.0)


def _setup(seed=0):
  m = shotstream.get_config('tiny').model
  params = dit.init_params(m, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  rng = np.random.default_rng(seed)
  inputs = (jnp.asarray(rng.standard_normal((1, 3, 4, 6, 16)), jnp.float32),
            jnp.asarray([[900.0, 500.0, 10.0]]),
            jnp.asarray(rng.standard_normal((1, 7, m.text_dim)), jnp.float32))
  return m, params, inputs


def _random_adapter(params, cfg, seed):
  """A trained-looking adapter: both A and B non-zero."""
  lora = lora_lib.init_lora(params, cfg, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(lora)
  keys = jax.random.split(jax.random.key(seed + 7), len(leaves))
  return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for x, k in
                                   zip(leaves, keys)])


def _adapter_interceptor(params, lora, s):
  """Adds s * x @ A_l @ B_l to the output of each adapted Dense. Inside `nn.scan` the layer
  index is not visible, so it is recovered from the (per-layer slice of the) kernel itself."""
  adapters = {path: ab for path, ab in lora_lib._adapters(lora).items()}  # pylint: disable=protected-access

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod = context.module
    if not isinstance(mod, nn.Dense) or context.method_name != '__call__':
      return out
    path = tuple(mod.path)
    if path not in adapters:
      return out
    ab = adapters[path]
    kernel = mod.variables['params']['kernel']
    stacked = params
    for p in path:
      stacked = stacked[p]
    stacked = stacked['kernel']
    layer = jnp.argmin(jnp.sum((stacked - kernel) ** 2, axis=(-2, -1)))
    return out + s * (args[0] @ ab['lora_a'][layer]) @ ab['lora_b'][layer]

  return interceptor


def test_targets_match_every_block_linear():
  _, params, _ = _setup()
  paths = lora_lib.target_paths(params, CFG)
  assert ['/'.join(p) for p in paths] == sorted(
      [f'blocks/{a}/{p}' for a in ('cross_attn', 'self_attn') for p in 'koqv'] +
      ['blocks/ffn_0', 'blocks/ffn_2'])
  fresh = lora_lib.init_lora(params, CFG, jax.random.key(0))
  a, b = fresh['blocks']['self_attn']['q']['lora_a'], fresh['blocks']['self_attn']['q']['lora_b']
  assert a.shape == (2, 64, 4) and b.shape == (2, 4, 64)
  assert not np.any(b) and np.all(np.abs(a) <= 1 / np.sqrt(64))
  merged = lora_lib.merge(params, fresh, CFG)   # B = 0: a fresh adapter changes nothing
  jax.tree.map(np.testing.assert_array_equal, merged, params)


def test_merged_weights_equal_base_plus_adapters():
  m, params, inputs = _setup()
  lora = _random_adapter(params, CFG, 3)
  model = dit.WanDiT(m)
  merged_out = model.apply({'params': lora_lib.merge(params, lora, CFG)}, *inputs)
  with nn.intercept_methods(_adapter_interceptor(params, lora, CFG.alpha / CFG.rank)):
    side_out = model.apply({'params': params}, *inputs)
  base_out = model.apply({'params': params}, *inputs)
  err = float(jnp.max(jnp.abs(merged_out - side_out)))
  assert err < 1e-4 * float(jnp.max(jnp.abs(merged_out))), err
  assert float(jnp.max(jnp.abs(merged_out - base_out))) > 1e-2  # the adapter matters


def test_merge_matches_peft_formula_per_layer():
  """PyTorch layout: W' = W + (alpha / r) * B @ A for each layer (PEFT's merge)."""
  m, params, _ = _setup()
  lora = _random_adapter(params, CFG, 4)
  merged = dit_convert.dit_to_torch(lora_lib.merge(params, lora, CFG), m)
  base = dit_convert.dit_to_torch(params, m)
  peft = lora_lib.to_peft(lora)
  s = CFG.alpha / CFG.rank
  for i in range(m.num_layers):
    for name in (f'blocks.{i}.cross_attn.v', f'blocks.{i}.ffn.0', f'blocks.{i}.self_attn.o'):
      a = peft[f'base_model.model.{name}.lora_A.weight']
      b = peft[f'base_model.model.{name}.lora_B.weight']
      np.testing.assert_allclose(merged[name + '.weight'], base[name + '.weight'] + s * b @ a,
                                 rtol=1e-5, atol=1e-5)
      np.testing.assert_array_equal(merged[name + '.bias'], base[name + '.bias'])


def test_training_only_lora_changes_only_lora():
  m, params, inputs = _setup()
  model = dit.WanDiT(m)
  lora = lora_lib.init_lora(params, CFG, jax.random.key(1))
  target = jnp.ones_like(inputs[0])

  def loss(adapter, base):
    return jnp.mean((model.apply({'params': lora_lib.merge(base, adapter, CFG)}, *inputs)
                     - target) ** 2)

  grad_fn = jax.jit(jax.grad(loss))
  grads = grad_fn(lora, params)
  g = grads['blocks']['ffn_2']
  assert not np.any(g['lora_a']) and np.any(g['lora_b'])  # B = 0 -> dL/dA = 0 at init
  opt = optax.adam(1e-2)
  state = opt.init(lora)
  base_before = jax.tree.map(np.array, params)
  new = lora
  for _ in range(3):
    grads = grad_fn(new, params)
    updates, state = opt.update(grads, state, new)
    new = optax.apply_updates(new, updates)
  assert float(loss(new, params)) < float(loss(lora, params))
  jax.tree.map(np.testing.assert_array_equal, params, base_before)   # base untouched
  merged = lora_lib.merge(params, new, CFG)
  flat_m, flat_p = common.flatten(merged), common.flatten(params)
  targets = {p + ('kernel',) for p in lora_lib.target_paths(params, CFG)}
  for path, value in flat_p.items():
    if path in targets:
      assert np.any(np.asarray(flat_m[path]) != np.asarray(value)), path
    else:
      np.testing.assert_array_equal(flat_m[path], value, err_msg='/'.join(path))


def test_peft_round_trip_and_torch_tensors():
  torch = pytest.importorskip('torch')
  _, params, _ = _setup()
  lora = _random_adapter(params, CFG, 5)
  sd = lora_lib.to_peft(lora)
  assert len(sd) == 2 * 2 * 10    # 2 layers x 10 Linears x (A, B)
  assert sd['base_model.model.blocks.1.ffn.0.lora_A.weight'].shape == (4, 64)
  assert sd['base_model.model.blocks.1.ffn.0.lora_B.weight'].shape == (128, 4)
  back = lora_lib.from_peft({k: torch.from_numpy(v) for k, v in sd.items()}, params, CFG)
  jax.tree.map(np.testing.assert_array_equal, back, lora)


def test_peft_import_errors_name_the_keys():
  _, params, _ = _setup()
  sd = lora_lib.to_peft(_random_adapter(params, CFG, 6))
  del sd['base_model.model.blocks.0.self_attn.k.lora_B.weight']
  sd['base_model.model.blocks.0.self_attn.q.lora_A.weight'] = np.zeros((8, 64), np.float32)
  with pytest.raises(ValueError, match=r'missing keys: .*self_attn\.k\.lora_B.*wrong shapes'):
    lora_lib.from_peft(sd, params, CFG)
  with pytest.raises(ValueError, match='lora.targets'):
    lora_lib.target_paths(params, lora_lib.LoraConfig(4, 4, 'blocks/nothing'))
  with pytest.raises(ValueError, match='lora.rank'):
    lora_lib.as_config({'rank': 0})


def test_export_merged_reads_back_through_the_importer():
  m, params, inputs = _setup()
  lora = _random_adapter(params, CFG, 8)
  sd = dit_convert.shotstream_state_dict(lora_lib.merge(params, lora, {'rank': 4, 'alpha': 8.0}), m)
  assert all(k.startswith('model.') for k in sd)
  back = dit_convert.dit_from_torch({'generator': sd}, m)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               back, lora_lib.merge(params, lora, CFG))
