"""Generation compiled ahead of time for a chip you may not have: memory, FLOPs, time.

    report = aot.analyse(config, 'chunk', 'v5p:2x2x1')   # needs libtpu for a TPU target
    report = aot.analyse(config, 'chunk', 'local')       # the devices of this process

`jax.jit(piece).lower(abstract inputs).compile()` runs the real compiler of the target (for a TPU
topology: libtpu's, from `jax.experimental.topologies`, no TPU attached), on one chip. What it
reports per call of the piece, in JSON-able form:

  memory      argument / output / temporary / generated-code bytes per device, and whether
              argument + output - alias + temporary fits the chip's HBM (CHIPS).
  flops       XLA's cost analysis. It counts the body of a `lax.scan` once, not once per
              iteration, and the DiT's 30 blocks are a scan: one block's cost is the
              difference between a 4-layer copy compiled with two blocks per scan iteration
              (`model.scan_unroll=2`) and with one, and is added L - 1 times. (Not 1- and
              2-layer copies: a scan of one iteration is inlined, and the last block's work
              past its K/V, dead in the prefill and the cache pass, is then removed, which
              the scanned program never does.) `flops_scan_body_once` is the uncorrected
              number; `analytic_flops` the matmul count of `dit_flops`.
  seconds     the compiler's `optimal_seconds` (TPU only), corrected the same way, and the
              implied frames per second of the piece; omitted (`cost_model` says why) where
              the FLOP rate it implies is not a rate the chip can run at
              (`implausible_seconds`).
  kernels     with `model.attention=splash` the attention runs in Pallas kernels, custom
              calls the cost model does not price: flops and seconds are then the rest of the
              program, and `analytic_attention_flops` the kernels' work (KERNEL_NOTE).

Pieces: text_kv (caption-table K/V, once per shot), prefill (the global cache, once per shot),
chunk (4 denoising steps + the cache pass of one chunk; its attention to the local cache runs
only over the filled part, a `lax.switch` over fills, and the compiler's count of a switch is
its costliest branch, so the chunk is also compiled at the fills of a shot's first and last
chunk with the fill a constant: `by_fill`, `shot_mean_flops`), shot (prefill + the scan over a shot's
chunks; memory only, as its chunk scan is also counted once), decode (the VAE's streaming
decode of one chunk). `shot_totals` combines them into a streamed shot's cost and frame rate:
frames per shot / (text_kv + prefill + chunks x (chunk + decode)).
"""

import dataclasses
import functools
from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from shotstream_jax import pipeline as pipeline_lib
from shotstream_jax.models import cache as cache_lib
from shotstream_jax.models import dit
from shotstream_jax.models import vae as vae_lib
from shotstream_jax.sampling import causal


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_bytes: float      # per chip, Google's published figure
  bf16_flops: float     # peak dense bf16 FLOP/s per chip, published


CHIPS = {
    'v4': Chip(32e9, 275e12),
    'v5e': Chip(16e9, 197e12),
    'v5p': Chip(95e9, 459e12),
    'v6e': Chip(32e9, 918e12),
}
PIECES = ('text_kv', 'prefill', 'chunk', 'shot', 'decode')
SCANNED = ('text_kv', 'prefill', 'chunk')   # the DiT's layer scan, corrected per block
KERNEL_NOTE = ('the attention runs in Pallas kernels (model.attention=splash), custom calls '
               "outside the compiler's cost model: flops and optimal_seconds count the rest; "
               'analytic_attention_flops is the kernels\' work (a chunk: the mean over a shot)')
PROBE_LAYERS = 4   # layers of the copies that measure one block (two scan iterations or more)


def target_devices(topology: str) -> List:
  """'local' -> this process's devices; '<chip>:<shape>' (e.g. 'v5p:2x2x1') -> the devices of
  that TPU topology, for compiling only (needs the libtpu wheel)."""
  if topology == 'local':
    return jax.local_devices()
  chip = topology.split(':')[0]
  if chip not in CHIPS or ':' not in topology:
    raise ValueError(f'--topology: expected local or <chip>:<shape> with chip in '
                     f'{", ".join(CHIPS)} (e.g. v5p:2x2x1), got {topology!r}')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return list(topologies.get_topology_desc(topology, 'tpu').devices)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'--topology: cannot describe {topology!r} ({type(e).__name__}: '
                     f'{str(e).splitlines()[0] if str(e) else ""}); compiling for a TPU needs the '
                     'libtpu wheel matching jax (README: Speed)') from None


def _abstract(tree, sharding):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def piece_inputs(config, piece: str, sharding, fill: Optional[int] = None):
  """(function, abstract arguments) of one generation piece at `config`'s sizes, batch 1.

  fill (chunk only): the local cache holds that many chunks, as a constant, so the compiler
  folds the attention's `lax.switch` to the branch that runs (its cost analysis of the switch
  itself is the costliest branch's)."""
  if piece not in PIECES:
    raise ValueError(f'--piece: unknown {piece!r}; accepted: {", ".join(PIECES)}')
  m = config.model
  hw = pipeline_lib.latent_size(config)
  if piece == 'decode':
    vae = vae_lib.WanVAE(config.vae)
    params = vae_lib.param_shapes(config.vae)
    latents = jax.ShapeDtypeStruct((1, m.chunk_frames) + hw + (config.vae.z_dim,), jnp.float32)
    cache = jax.eval_shape(lambda: vae_lib.init_decode_cache(vae, 1, *hw))
    fn = lambda p, c, z: vae_lib.decode_step(vae, p, c, z)
    return fn, _abstract((params, cache, latents), sharding)
  sampler = causal.CausalSampler(m, config.sampling, hw)
  params = dit.param_shapes(m)
  rows = jax.ShapeDtypeStruct((m.context_frames + 1, config.text.text_len, m.text_dim),
                              jnp.float32)
  if piece == 'text_kv':
    return (lambda p, r: dit.WanTextKV(m).apply({'params': p}, r),
            _abstract((params, rows), sharding))
  text_kv = jax.eval_shape(lambda p, r: dit.WanTextKV(m).apply({'params': p}, r), params, rows)
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  cf = m.context_frames
  plan = causal.ShotPlan(jax.ShapeDtypeStruct((1, cf) + hw + (m.in_channels,), jnp.float32),
                         i32(1, cf), i32(1, cf), i32(1), i32(1), text_kv)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  if piece == 'prefill':
    return sampler.prefill, _abstract((params, plan), sharding)
  if piece == 'shot':
    return sampler.shot, _abstract((params, plan, key), sharding)
  global_cache = jax.eval_shape(sampler.prefill, params, plan)
  local = jax.eval_shape(lambda: sampler.init_local(1))
  if fill is None:
    return sampler.chunk, _abstract((params, plan, global_cache, local, i32(), key), sharding)

  def chunk_at(p, pl, g, local_kv, k):
    local_cache = cache_lib.KVCache(*local_kv, jnp.int32(fill * sampler.chunk_tokens))
    return sampler.chunk(p, pl, g, local_cache, jnp.int32(fill), k)
  return chunk_at, _abstract((params, plan, global_cache, (local.k, local.v), key), sharding)


def compile_piece(config, piece: str, device, fill: Optional[int] = None):
  """The compiled piece on one device (a real one or a topology's)."""
  sharding = NamedSharding(Mesh(np.array([device]), ('data',)), P())
  fn, args = piece_inputs(config, piece, sharding, fill)
  return jax.jit(fn).lower(*args).compile()


def out_of_memory(error) -> str:
  """The message of a TPU compiler's refusal for lack of HBM (its last line, which names the
  temporaries needed); any other compile error is raised again."""
  if 'RESOURCE_EXHAUSTED' not in str(error):
    raise error
  return str(error).strip().splitlines()[-1]


def memory_report(compiled, topology: str) -> dict:
  """{'memory': per-device bytes of a compiled program (argument, output, alias, temp,
  generated code; `total` = argument + output - alias + temp; for a TPU topology the chip's
  `hbm`), 'fits': total <= HBM (TPU topologies only)}; memory is {} where the backend gives
  no analysis."""
  mem = compiled.memory_analysis()
  if not mem:
    return {'memory': {}}
  memory = {k: int(getattr(mem, f'{k}_size_in_bytes', 0) or 0)
            for k in ('argument', 'output', 'alias', 'temp', 'generated_code')}
  memory['total'] = memory['argument'] + memory['output'] - memory['alias'] + memory['temp']
  chip = CHIPS.get(topology.split(':')[0])
  if not chip:
    return {'memory': memory}
  memory['hbm'] = chip.hbm_bytes
  return {'memory': memory, 'fits': bool(memory['total'] <= chip.hbm_bytes)}


def compiled_costs(compiled) -> Dict[str, Optional[float]]:
  """XLA's `flops` and `optimal_seconds` (TPU only; else None) of a compiled program."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  get = lambda k: float(cost[k]) if k in cost and cost[k] is not None else None
  return {'flops': get('flops'), 'optimal_seconds': get('optimal_seconds')}


# The compiler's optimal_seconds is taken as a time only where it is positive, implies no more
# than the chip's peak FLOP/s, and is under the time the FLOPs would take at MIN_PEAK_FRACTION
# of the peak plus OVERHEAD_S (small programs are latency-bound): on v5p every full-size piece
# of this model came out at 25% of the peak or more, while libtpu 0.0.42's v6e model gave the
# caption K/V 29 s (37 GFLOP/s, 0.004%) and the prefill a negative time.
MIN_PEAK_FRACTION = 0.01
OVERHEAD_S = 0.01


def implausible_seconds(flops, seconds, topology: str) -> Optional[str]:
  """Why the compiler's `seconds` for `flops` cannot be a time on this chip; None if it can
  (or the chip, the FLOPs or the time is unknown)."""
  chip = CHIPS.get(topology.split(':')[0])
  if chip is None or seconds is None or not flops:
    return None
  if seconds <= 0:
    return f'the compiler\'s cost model gave {seconds:.3g} s'
  rate = flops / seconds / chip.bf16_flops
  slowest = flops / (MIN_PEAK_FRACTION * chip.bf16_flops) + OVERHEAD_S
  if rate > 1 or seconds > slowest:
    return (f'the compiler\'s cost model gives {seconds:.3g} s, {rate:.2%} of the chip\'s '
            f'peak FLOP/s (plausible: up to the peak, at most {slowest:.3g} s)')
  return None


def drop_implausible_seconds(out: dict, topology: str) -> None:
  """Every time of a report set to None, with the reason in 'cost_model', where one of its
  (FLOPs, time) pairs is implausible (`implausible_seconds`)."""
  pairs = [(out.get('flops'), out.get('optimal_seconds')),
           (out.get('shot_mean_flops'), out.get('shot_mean_optimal_seconds'))]
  pairs += [(v.get('flops'), v.get('optimal_seconds')) for v in out.get('by_fill', {}).values()]
  why = next(filter(None, (implausible_seconds(f, t, topology) for f, t in pairs)), None)
  if why is None:
    return
  out['cost_model'] = f'{why}: times omitted'
  for k in ('optimal_seconds', 'optimal_seconds_per_block', 'shot_mean_optimal_seconds'):
    if k in out:
      out[k] = None
  for v in out.get('by_fill', {}).values():
    v['optimal_seconds'] = None


def with_layers(config, layers: int, unroll: int):
  c = config.copy_and_resolve_references()
  c.model.num_layers, c.model.scan_unroll = layers, unroll
  return c


def analyse(config, piece: str, topology: str = 'local') -> dict:
  """The report of the module docstring for one piece on one chip of `topology`."""
  device = target_devices(topology)[0]
  out = {'piece': piece, 'topology': topology, 'device': str(getattr(device, 'device_kind', device)),
         'dtype': config.model.dtype, 'attention': config.model.attention}
  try:
    compiled = compile_piece(config, piece, device)
  except jax.errors.JaxRuntimeError as e:
    return dict(out, fits=False, memory={}, compile_error=out_of_memory(e))
  out.update(memory_report(compiled, topology))
  costs = compiled_costs(compiled)
  out['flops_scan_body_once'] = costs['flops']
  if piece == 'shot':   # a scan over chunks around the scan over layers: see `shot_totals`
    out.update(flops=None, optimal_seconds=None,
               note='scans its chunks: cost = text_kv + prefill + chunks x (chunk + decode)')
    return out
  if piece in SCANNED:
    costs = _corrected(config, piece, device, costs)
    out['analytic_flops'] = piece_flops(config, piece)
  if piece == 'chunk':
    out.update(_by_fill(config, device))
  out.update(costs)
  if piece in SCANNED and config.model.attention.startswith('splash'):
    out['note'] = KERNEL_NOTE
    out['analytic_attention_flops'] = (
        float(np.mean([piece_flops(config, piece, f, attention_only=True)
                       for f in shot_fills(config)])) if piece == 'chunk' else
        piece_flops(config, piece, attention_only=True))
  drop_implausible_seconds(out, topology)
  frames = _frames_per_call(config, piece)
  seconds = out.get('shot_mean_optimal_seconds', out.get('optimal_seconds'))
  if frames and seconds:
    out['frames_per_call'] = frames
    out['implied_fps'] = frames / seconds
  return out


def _corrected(config, piece, device, costs, fill=None):
  """`costs` of a compile at config's L layers with the layer scan's body counted L times."""
  layers = config.model.num_layers
  if layers == 1:
    return dict(costs)
  one, two = (compiled_costs(compile_piece(with_layers(config, PROBE_LAYERS, u), piece, device,
                                            fill)) for u in (1, 2))
  out = {}
  for k in costs:
    if None in (costs[k], one[k], two[k]):
      out[k] = None
    else:   # the scanned program counted one block; it runs L
      block = two[k] - one[k]
      out[k] = costs[k] + (layers - 1) * block
      out[f'{k}_per_block'] = block
  return out


def shot_fills(config) -> List[int]:
  """Local-cache chunks filled when each chunk of a shot runs (0, 1, ..., capped)."""
  m, s = config.model, config.sampling
  return [min(i, s.local_frames // m.chunk_frames)
          for i in range(s.shot_latent_frames // m.chunk_frames)]


def _by_fill(config, device) -> dict:
  """The chunk's corrected cost at the emptiest and fullest local cache of a shot; the cost
  is linear in the fill (attention over fill x block more keys; tests check every fill), so
  their interpolation gives the mean over a shot's chunks, beside the analytic count and the
  full-capacity (masked) count."""
  fills = shot_fills(config)
  ends = sorted({fills[0], fills[-1]})
  at = {f: _corrected(config, 'chunk', device,
                      compiled_costs(compile_piece(config, 'chunk', device, f)), f) for f in ends}
  out = {'fills': fills, 'by_fill': {str(f): {k: at[f][k] for k in ('flops', 'optimal_seconds')}
                                     for f in ends}}
  lo, hi = ends[0], ends[-1]
  for k in ('flops', 'optimal_seconds'):
    if any(at[f][k] is None for f in ends):
      out[f'shot_mean_{k}'] = None
      continue
    slope = (at[hi][k] - at[lo][k]) / (hi - lo) if hi > lo else 0.0
    out[f'shot_mean_{k}'] = float(np.mean([at[lo][k] + slope * (f - lo) for f in fills]))
  out['analytic_shot_mean_flops'] = float(np.mean([piece_flops(config, 'chunk', f)
                                                   for f in fills]))
  out['analytic_full_capacity_flops'] = piece_flops(config, 'chunk')
  return out


def dit_flops(m, tokens: int, keys: int, text_len: int, *, head: bool = True,
              text_kv: bool = False, attention_only: bool = False) -> float:
  """Matmul FLOPs (2 per multiply-add) of one DiT call on `tokens` query tokens attending to
  `keys` self-attention keys (own included) and `text_len` caption tokens, per layer: q, k, v,
  o of self-attention, q and o of cross-attention (its K/V come precomputed, `text_kv=True`
  counts them instead), both attention products, the 2-matmul FFN; plus the patch embedding
  and the head. Norms, RoPE, softmax and modulation are elementwise and left out.
  `attention_only`: the two attention products of both attentions only (what a fused
  attention kernel computes)."""
  d, f = m.dim, m.ffn_dim
  products = 2.0 * 2 * tokens * keys * d + 2.0 * 2 * tokens * text_len * d
  if attention_only:
    return 0.0 if text_kv else m.num_layers * products
  if text_kv:   # WanTextKV: the text embedding MLP, then k and v of every layer
    return 2.0 * text_len * (m.text_dim * d + d * d) + m.num_layers * 2 * (2.0 * text_len * d * d)
  per_layer = (2.0 * tokens * d * d * 6            # q k v o, cross q o
               + products                          # q k^T, p v of self- and cross-attention
               + 2.0 * 2 * tokens * d * f)         # ffn
  patch = int(np.prod(m.patch_size))
  io = 2.0 * tokens * d * patch * (m.in_channels + (m.out_channels if head else 0))
  return m.num_layers * per_layer + io


def piece_flops(config, piece: str, fill: Optional[int] = None,
                attention_only: bool = False) -> float:
  """`dit_flops` of a piece as generation runs it: text_kv over the caption table; prefill on
  the context frames; chunk = len(denoising_steps) calls + the cache pass on one chunk, each
  attending to [global | the whole local capacity | itself] (what a masked path computes),
  or with `fill` to [global | fill filled chunks | itself] (what runs); the cache pass and the
  prefill need no head. `attention_only`: the attention products only (dit_flops)."""
  m, s = config.model, config.sampling
  flops = functools.partial(dit_flops, attention_only=attention_only)
  hw = pipeline_lib.latent_size(config)
  per_frame = (hw[0] // m.patch_size[1]) * (hw[1] // m.patch_size[2])
  text = m.text_len
  if piece == 'text_kv':
    return (m.context_frames + 1) * flops(m, 0, 0, text, text_kv=True)
  ctx = m.context_frames * per_frame
  if piece == 'prefill':   # K/V only are kept, but every layer's block runs (a scan); no head
    return flops(m, ctx, ctx, text, head=False)
  own = m.chunk_frames * per_frame
  local = s.local_frames if fill is None else fill * m.chunk_frames
  keys = ctx + local * per_frame + own
  return (len(s.denoising_steps) * flops(m, own, keys, text)
          + flops(m, own, keys, text, head=False))     # the cache pass: K/V only


def _frames_per_call(config, piece: str) -> int:
  """Pixel frames one call produces (0 for pieces that produce none): a chunk past the first
  of a shot, a whole shot."""
  t = vae_lib.temporal_factor(config.vae)
  if piece in ('chunk', 'decode'):
    return t * config.model.chunk_frames
  if piece == 'shot':
    return vae_lib.pixel_frames(config.vae, config.sampling.shot_latent_frames)
  return 0


def shot_totals(config, reports: Dict[str, dict]) -> Optional[dict]:
  """Per streamed shot: FLOPs and optimal_seconds of text_kv + prefill + chunks x (chunk +
  decode), and the implied frames per second (None where a piece's number is missing)."""
  need = ('text_kv', 'prefill', 'chunk', 'decode')
  if any(p not in reports for p in need):
    return None
  chunks = config.sampling.shot_latent_frames // config.model.chunk_frames
  frames = vae_lib.pixel_frames(config.vae, config.sampling.shot_latent_frames)
  out = {'chunks': chunks, 'frames': frames}
  for k in ('flops', 'optimal_seconds'):   # the chunk at a shot's mean fill
    values = [reports[p].get(f'shot_mean_{k}', reports[p].get(k)) for p in need]
    out[k] = (None if None in values else
              values[0] + values[1] + chunks * (values[2] + values[3]))
  out['flops_per_frame'] = out['flops'] / frames if out['flops'] else None
  out['implied_fps'] = frames / out['optimal_seconds'] if out['optimal_seconds'] else None
  return out
