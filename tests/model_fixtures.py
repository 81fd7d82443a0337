"""Shared model helpers of the tests."""

import jax
import jax.numpy as jnp

from shotstream_jax.models import dit


def random_dit(cfg, seed: int = 0):
  """Wan's init plus N(0, 0.2^2) on every param: its zero head and modulation would hide most
  of the network from any comparison."""
  params = dit.init_params(cfg, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape, jnp.float32)
                                   for x, k in zip(leaves, keys)])
