"""Random weights from parameter shapes, without running a module's initializers."""

import jax
import jax.numpy as jnp
import numpy as np

from shotstream_jax.models import dit
from shotstream_jax.models import umt5
from shotstream_jax.models import vae


def random_params(shapes, seed: int):
  """Scaled normal draws for a params tree of ShapeDtypeStructs, without running the module.

  For random-weight runs (the embedded default model, smoke tests): the modules' own init
  compiles every initializer and takes seconds to tens of seconds on CPU; this takes milliseconds. Kernels N(0, 1/fan_in), embeddings N(0, 1), scales 1, biases 0.
  """
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name == 'scale':
      return jnp.ones(s.shape, s.dtype)
    if name == 'bias':
      return jnp.zeros(s.shape, s.dtype)
    x = rng.standard_normal(s.shape, np.float32)
    if name == 'kernel':
      x /= np.sqrt(np.prod(s.shape[:-1]) if len(s.shape) >= 4 else s.shape[-2])
    return jnp.asarray(x, s.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


# The embedded default model's networks, one seed each: DiT `seed`, VAE `seed + 1`, umT5
# `seed + 2`. Random-encoder data (StoryWorld for `tiny` training, precompute without
# checkpoints) uses the same draws, so a student trained on it generates through the very VAE and
# text encoder its latents and captions came from.


def embedded_dit(model_cfg, seed: int):
  return random_params(dit.param_shapes(model_cfg), seed)


def embedded_vae(vae_cfg, seed: int):
  return random_params(vae.param_shapes(vae_cfg), seed + 1)


def embedded_text(text_cfg, seed: int):
  return random_params(umt5.param_shapes(text_cfg), seed + 2)
