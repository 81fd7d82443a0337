r"""Time our jitted streaming VAE decode of one latent chunk against diffusers on the same CPU.

  python launch/bench_vae.py --latent_hw=8,8 --chunk=3 --repeats=5

One steady-state chunk: `--chunk` latent frames -> 4x as many pixel frames, with a warm causal
cache (the first latent of the shot has already been decoded). Ours is one jitted `decode_step`;
diffusers' `AutoencoderKLWan` runs its own streaming path (post_quant_conv, then the decoder one
latent at a time with its feature cache, as Wan does). Same config and weights (diffusers'
default init, converted through our importer), fp32 by default. JAX timings use
block_until_ready after a warm-up call (compilation excluded); both report the median of
`--repeats` runs (and the fastest), taken in turns so that other load on a shared CPU hits
both alike.
Needs the test extras (torch, diffusers).
"""

import functools
import json
import statistics
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from shotstream_jax import cli

_CONFIG = cli.define_config_file('config', 'configs/shotstream.py:wan_1_3b',
                                 'Config whose .vae section is benchmarked.')
_LATENT = flags.DEFINE_list('latent_hw', ['8', '8'], 'Latent height,width (pixels / 8).')
_CHUNK = flags.DEFINE_integer('chunk', 3, 'Latent frames per timed chunk.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats (median reported).')
_DTYPES = flags.DEFINE_list('dtypes', ['float32'], 'Compute dtypes to time (float32, bfloat16).')


def _seconds(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _interleaved_medians(fns, repeats):
  """Median seconds of each fn, run in turns (A B A B ...) after one warm-up each, so that
  load from other processes on a shared machine hits both sides alike."""
  for fn in fns:
    fn()  # warm-up (and compilation for JAX)
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, ts in zip(fns, times):
      ts.append(_seconds(fn))
  return [(statistics.median(ts), min(ts)) for ts in times]


def bench(config, latent_hw, chunk, repeats, dtypes):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKLWan  # pylint: disable=g-import-not-at-top
  from shotstream_jax.convert import vae as vae_convert  # pylint: disable=g-import-not-at-top
  from shotstream_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top

  cfg = config.vae
  torch.manual_seed(0)
  ref = AutoencoderKLWan(base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                         num_res_blocks=cfg.num_res_blocks,
                         temperal_downsample=list(cfg.temporal_downsample)).eval()
  params = jax.tree.map(jnp.asarray, vae_convert.vae_from_torch(ref.state_dict(), cfg))
  h, w = (int(x) for x in latent_hw)
  rng = np.random.default_rng(0)
  z = rng.standard_normal((1, 1 + chunk, h, w, cfg.z_dim)).astype(np.float32)
  results = dict(device=f'{jax.devices()[0].platform}: {jax.devices()[0].device_kind}',
                 torch_threads=torch.get_num_threads(), base_dim=cfg.base_dim,
                 latent=[chunk, h, w], frames=[4 * chunk, 8 * h, 8 * w], repeats=repeats)
  for dtype in dtypes:
    cfg.dtype = dtype
    vae = vae_lib.WanVAE(cfg)
    step = jax.jit(functools.partial(vae_lib.decode_step, vae))
    cache = vae_lib.init_decode_cache(vae, 1, h, w)
    _, cache = step(params, cache, jnp.asarray(z[:, :1]))  # the shot's first latent
    zc = jnp.asarray(z[:, 1:])
    run_ours = lambda: jax.block_until_ready(step(params, cache, zc))

    tdt = getattr(torch, dtype)
    model = ref.to(tdt)
    raw = torch.from_numpy(z).permute(0, 4, 1, 2, 3).to(tdt)  # scale is irrelevant for timing
    with torch.no_grad():
      model.clear_cache()
      feats = model._feat_map  # pylint: disable=protected-access
      model.decoder(model.post_quant_conv(raw[:, :, :1]), feat_cache=feats, feat_idx=[0],
                    first_chunk=True)

    def run_torch():
      with torch.no_grad():
        x = model.post_quant_conv(raw[:, :, 1:])
        out = [model.decoder(x[:, :, i:i + 1], feat_cache=feats, feat_idx=[0])
               for i in range(chunk)]
        return torch.clamp(torch.cat(out, 2), -1.0, 1.0)

    ours, theirs = _interleaved_medians([run_ours, run_torch], repeats)
    results[dtype] = dict(ours_s=round(ours[0], 4), diffusers_s=round(theirs[0], 4),
                          speedup=round(theirs[0] / ours[0], 3), ours_min_s=round(ours[1], 4),
                          diffusers_min_s=round(theirs[1], 4))
  return results


def main(argv):
  del argv
  print(json.dumps(bench(_CONFIG.value, _LATENT.value, _CHUNK.value, _REPEATS.value,
                         _DTYPES.value), indent=1))


if __name__ == '__main__':
  cli.run(main)
