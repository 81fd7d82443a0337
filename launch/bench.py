r"""Benchmark streaming generation of a preset (random weights): prints one JSON object.

  python launch/bench.py --config=configs/shotstream.py:tiny --shots=8
  python launch/bench.py --config=configs/shotstream.py:wan_1_3b \
      --config.model.dtype=bfloat16 --config.model.attention=cudnn      # on a GPU

Reports (DESIGN 6): compile seconds and compile counts; FPS with and without VAE decode over
an `--shots`-shot story after warm-up; median first-frame latency; median per-chunk latency
(denoise + cache pass, no decode) by shot index, and shot N / shot 1 (bounded caches keep it
~1), and by chunk index within a shot (the local cache fills); model FLOPs per output frame
(the analytic matmul count of shotstream_jax/aot.py);
achieved FLOP/s as a fraction of a large-matmul peak measured in the same run.
"""

import json
import statistics
import time

from absl import flags
import jax

from shotstream_jax import aot
from shotstream_jax import cli
from shotstream_jax import pipeline as pipeline_lib
from shotstream_jax.models import common

_CONFIG = cli.define_config_file('config', 'configs/shotstream.py:tiny',
                                 'Config: configs/shotstream.py:<preset>.')
_SHOTS = flags.DEFINE_integer('shots', 8, 'Shots in the timed story.')
_MATMUL = flags.DEFINE_integer('matmul_n', 0, 'Peak matmul size (0: 8192 on GPU/TPU, 2048 CPU).')


def matmul_peak(dtype, n: int, repeats: int = 5) -> float:
  """FLOP/s of an n x n x n matmul in `dtype`, median of `repeats` after warm-up."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  mm = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(mm(a, b))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(mm(a, b))
    times.append(time.perf_counter() - start)
  return 2 * n ** 3 / statistics.median(times)


def bench(config, shots: int, matmul_n: int = 0) -> dict:
  if shots < 2:
    raise ValueError(f'--shots: need >= 2 to compare shots, got {shots}')
  pipe = pipeline_lib.ShotStreamPipeline.from_random(config, config.seed)
  compile_s = pipe.warmup()

  session = pipe.session('A benchmark story. ', seed=1)
  start = time.perf_counter()
  for i in range(shots):
    for _ in session.next_shot(f'shot number {i} with its own words {i * 7}'):
      pass
  wall = time.perf_counter() - start
  stats = session.stats
  frames = sum(st.frames for st in stats)
  decode_s = sum(st.decode_s for st in stats)
  per_chunk = [statistics.median(st.chunk_s) for st in stats]
  # chunk i of every shot after the first (the first shot's are in the warm-up's shadow)
  by_index = [statistics.median(st.chunk_s[i] for st in stats[1:])
              for i in range(len(stats[0].chunk_s))]

  # DiT FLOPs of one shot (caption K/V, prefill, every chunk at its fill): the analytic matmul
  # count of aot.py, which XLA's count (the layer scan corrected, tests/test_aot.py) exceeds
  # by 0-8% of elementwise work. XLA's own count of this jitted chunk would count the 30
  # scanned blocks once and the local-cache switch at its costliest branch.
  sampler = pipe.sampler
  shot_flops = (aot.piece_flops(config, 'text_kv') + aot.piece_flops(config, 'prefill')
                + sum(aot.piece_flops(config, 'chunk', None if sampler.local_block == 0 else f)
                      for f in aot.shot_fills(config)))
  flops_per_frame = shot_flops / pipe.frames_per_shot

  platform = jax.devices()[0].platform
  n = matmul_n or (2048 if platform == 'cpu' else 8192)
  peak = matmul_peak(common.dtype_of(config.model.dtype), n)
  achieved = flops_per_frame * frames / (wall - decode_s)
  return dict(
      preset=config.preset, device=f'{platform}: {jax.devices()[0].device_kind}',
      dtype=config.model.dtype, attention=config.model.attention,
      resolution=[config.sampling.height, config.sampling.width],
      tokens_per_chunk=sampler.chunk_frames * sampler.tokens_per_frame,
      shots=shots, frames=frames,
      compile_s=round(compile_s, 2), compile_counts=dict(pipe.compile_counts),
      fps=round(frames / wall, 3), fps_without_decode=round(frames / (wall - decode_s), 3),
      first_frame_latency_s=round(statistics.median(st.first_frame_s for st in stats), 4),
      local_attention=config.sampling.local_attention,
      chunk_latency_s_by_shot=[round(x, 5) for x in per_chunk],
      chunk_latency_s_by_index=[round(x, 5) for x in by_index],
      chunk_latency_last_over_first=round(per_chunk[-1] / per_chunk[0], 3),
      dit_gflops_per_frame=round(flops_per_frame / 1e9, 3),
      matmul_peak_tflops=round(peak / 1e12, 4), matmul_n=n,
      achieved_fraction_of_peak=round(achieved / peak, 4))


def main(argv):
  del argv
  cli.quiet_logs()
  print(json.dumps(cli.exit_on_user_error(bench, _CONFIG.value, _SHOTS.value, _MATMUL.value),
                   indent=1))


if __name__ == '__main__':
  cli.run(main)
