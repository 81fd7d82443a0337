r"""Time our jitted WanDiT forward against diffusers' WanTransformer3DModel on the same CPU.

  python launch/bench_dit.py --dim=768 --layers=12 --latent_hw=60,104 --repeats=5

Same config, same random weights (converted through our importer), one latent frame at 60x104
(1560 tokens) and 512 text rows by default; fp32 and bf16. JAX timings use block_until_ready
after a warm-up call (compilation excluded); both report the median of `--repeats` runs.
Needs the test extras (torch, diffusers).
"""

import json
import statistics
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from shotstream_jax import cli

_CONFIG = cli.define_config_file('config', 'configs/shotstream.py:wan_1_3b',
                                 'Base model config; --dim/--layers/--head_dim override.')
_DIM = flags.DEFINE_integer('dim', 768, 'Model width.')
_LAYERS = flags.DEFINE_integer('layers', 12, 'Number of blocks.')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 128, 'Head size.')
_LATENT = flags.DEFINE_list('latent_hw', ['60', '104'], 'Latent height,width (1 frame).')
_TEXT_LEN = flags.DEFINE_integer('text_len', 512, 'Text rows.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats (median reported).')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes to time.')


def _median_seconds(fn, repeats):
  fn()  # warm-up (and compilation for JAX)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench(config, dim, layers, head_dim, latent_hw, text_len, repeats, dtypes):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import WanTransformer3DModel  # pylint: disable=g-import-not-at-top
  from shotstream_jax.convert import dit as dit_convert  # pylint: disable=g-import-not-at-top
  from shotstream_jax.models import dit  # pylint: disable=g-import-not-at-top

  cfg = config.model
  cfg.dim, cfg.num_layers, cfg.num_heads, cfg.ffn_dim = dim, layers, dim // head_dim, 4 * dim
  torch.manual_seed(0)
  ref = WanTransformer3DModel(
      patch_size=(1, 2, 2), num_attention_heads=cfg.num_heads, attention_head_dim=head_dim,
      in_channels=16, out_channels=16, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
      ffn_dim=cfg.ffn_dim, num_layers=layers, cross_attn_norm=True,
      qk_norm='rms_norm_across_heads', eps=cfg.eps).eval()
  params = jax.tree.map(jnp.asarray, dit_convert.dit_from_torch(ref.state_dict(), cfg))
  h, w = (int(x) for x in latent_hw)
  rng = np.random.default_rng(0)
  lat = rng.standard_normal((1, 1, h, w, 16)).astype(np.float32)
  ctx = rng.standard_normal((1, text_len, cfg.text_dim)).astype(np.float32)
  t = np.array([737.59], np.float32)
  results = dict(device=f'{jax.devices()[0].platform}: {jax.devices()[0].device_kind}',
                 torch_threads=torch.get_num_threads(), dim=dim, layers=layers,
                 heads=cfg.num_heads, tokens=(h // 2) * (w // 2), text_len=text_len,
                 repeats=repeats)
  for dtype in dtypes:
    cfg.dtype = dtype
    fwd = jax.jit(dit.WanDiT(cfg).apply)
    lat_j, t_j, ctx_j = jnp.asarray(lat), jnp.asarray(t)[None], jnp.asarray(ctx)
    ours = _median_seconds(
        lambda: jax.block_until_ready(fwd({'params': params}, lat_j, t_j, ctx_j)), repeats)
    tdt = getattr(torch, dtype)
    model = ref.to(tdt)
    x = torch.from_numpy(lat).permute(0, 4, 1, 2, 3).to(tdt)
    c = torch.from_numpy(ctx).to(tdt)
    tt = torch.from_numpy(t)

    def run_torch():
      with torch.no_grad():
        model(x, tt, c, return_dict=False)

    theirs = _median_seconds(run_torch, repeats)
    results[dtype] = dict(ours_s=round(ours, 4), diffusers_s=round(theirs, 4),
                          speedup=round(theirs / ours, 3))
  return results


def main(argv):
  del argv
  print(json.dumps(bench(_CONFIG.value, _DIM.value, _LAYERS.value, _HEAD_DIM.value, _LATENT.value,
                         _TEXT_LEN.value, _REPEATS.value, _DTYPES.value), indent=1))


if __name__ == '__main__':
  cli.run(main)
