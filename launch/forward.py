r"""Run one DiT forward pass with random weights and print what came out.

  python launch/forward.py --config=configs/shotstream.py:tiny

This is the placeholder main job until streaming generation lands: it builds the model of the
chosen preset, runs a jitted forward over a small multi-shot latent sequence under the
student's block-causal mask, and reports shapes, the output scale and the timing.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from shotstream_jax import cli
from shotstream_jax.models import dit

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/shotstream.py:tiny',
                                          'Model config: configs/shotstream.py:<preset>.')
_LATENT = flags.DEFINE_list('latent_hw', ['8', '12'], 'Latent height,width.')


def forward_demo(config, latent_hw=(8, 12)):
  """Context frames + two chunks with shot ids, per-frame timesteps, two captions."""
  m = config.model
  key = jax.random.key(config.seed)
  h, w = (int(x) for x in latent_hw)
  f = m.context_frames + 2 * m.chunk_frames
  params = dit.init_params(m, key, (f, h, w))
  k1, k2, k3 = jax.random.split(key, 3)
  # Wan zero-initialises the output head; give it random weights so the output is informative.
  head = params['head']['head']
  head['kernel'] = 0.02 * jax.random.normal(k3, head['kernel'].shape)
  latents = jax.random.normal(k1, (1, f, h, w, m.in_channels))
  text = jax.random.normal(k2, (2, m.text_len, m.text_dim))
  t = jnp.concatenate([jnp.zeros(m.context_frames), jnp.full(2 * m.chunk_frames, 737.59)])[None]
  shot = jnp.concatenate([jnp.zeros(m.context_frames, jnp.int32),
                          jnp.ones(2 * m.chunk_frames, jnp.int32)])[None]
  fwd = jax.jit(lambda p, x: dit.WanDiT(m).apply(
      {'params': p}, x, t, text, frame_shot=shot, frame_caption=shot, attention='block_causal'))
  start = time.perf_counter()
  out = jax.block_until_ready(fwd(params, latents))
  first = time.perf_counter() - start
  start = time.perf_counter()
  out = jax.block_until_ready(fwd(params, latents))
  again = time.perf_counter() - start
  return out, first, again


def main(argv):
  del argv
  out, first, again = cli.exit_on_user_error(forward_demo, _CONFIG.value, _LATENT.value)
  print(f'preset {_CONFIG.value.preset}: DiT forward (random weights, block-causal, '
        f'{out.shape[1]} latent frames) -> velocity {tuple(out.shape)}, '
        f'mean |v| {float(jnp.abs(out).mean()):.4f}; compile+run {first:.2f}s, run {again*1e3:.1f}ms '
        f'on {jax.devices()[0].platform}')
  print('note: streaming multi-shot generation to mp4 is not implemented yet; this is a forward '
        'pass only.')


if __name__ == '__main__':
  app.run(main)
