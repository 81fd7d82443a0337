"""Training steps compiled ahead of time for a TPU slice you may not have: memory and cost.

    config = configs/train/teacher.py:get_config('wan_1_3b')
    report = aot_train.analyse(config, 'v5p:2x2x1', mesh=(1, 4, 1))   # needs libtpu

The step compiled is the one `train_loop.train` runs (`train_loop.stage_step`: the stage's
optimizer and update rule, EMA, non-finite guard; `train_loop.jit_step`: the state sharded by
the config's logical-axis rules over the ('data', 'fsdp', 'tensor') mesh, the batch over
data x fsdp), lowered on abstract inputs: no weights are loaded and nothing is allocated. The
stage is built on a shapes-only precompute (`precompute.write_shapes_only`), so it takes its
batch shapes from its own example transform.

Per device of the mesh it reports the compiler's memory analysis (arguments = train state +
batch, temporaries, outputs, aliases: the donated state) and whether it fits the chip's HBM;
where the TPU compiler itself refuses the program for lack of HBM, `fits` is False and
`compile_error` holds its message (the temporaries it needed).
FLOPs and `optimal_seconds` are the compiler's only where its count can be corrected: a stage
whose step has no loop but the DiT's layer scans (stage 1), corrected as aot.py corrects
generation (a 4-layer copy with two blocks per scan iteration minus one with one block, added
L - 1 times; the backward's scan is counted the same way). Stages 2-4 loop over Euler steps,
chunks and shots (`lax.scan`, and a `fori_loop` whose trip count is drawn per step) whose
bodies the cost model counts once, so their FLOPs and time are left out (None) with a note.
"""

import os
import tempfile
from typing import Optional, Sequence

import jax
import numpy as np

from shotstream_jax import aot
from shotstream_jax import checkpoints
from shotstream_jax import pipeline as pipeline_lib
from shotstream_jax.data import precompute as pc
from shotstream_jax.training import sharding as sharding_lib
from shotstream_jax.training import teacher_stage
from shotstream_jax.training import train_loop

STAGES = ('teacher', 'ode_init', 'dmd_intra', 'dmd_inter')
LAYER_SCAN_ONLY = ('teacher',)   # the only loops in the step are the DiT's layer scans
LOOP_NOTE = ('the step loops over Euler steps / chunks / shots (lax.scan, fori_loop) whose '
             "bodies the compiler's cost model counts once: FLOPs and optimal_seconds omitted")
NO_PROBES_NOTE = 'layer-scan probes not compiled (costs=False): FLOPs and optimal_seconds omitted'
KERNEL_NOTE = ('model.attention=splash: the attention runs in Pallas kernels, custom calls outside '
               "the compiler's cost model; FLOPs and optimal_seconds count the rest")


def teacher_attention_flops(config, mesh_shape) -> float:
  """Per device, the attention products of one forward pass of stage 1's batch: each example
  is [context | target] frames attending to all of them and to its caption rows (dit_flops).
  The backward pass and remat's recompute add about 2.5x and 1x this on top. Images mixed in
  (`teacher.image_mix`, storyworld only) are left out."""
  m = config.model
  hw = pipeline_lib.latent_size(config)
  frames = teacher_stage.context_frames(config) + config.teacher.target_frames
  tokens = frames * (hw[0] // m.patch_size[1]) * (hw[1] // m.patch_size[2])
  per_device = config.data.batch_size / (mesh_shape[0] * mesh_shape[1])
  return per_device * aot.dit_flops(m, tokens, tokens, m.text_len, attention_only=True)


def _shots(config) -> int:
  """Shots per story of the shapes-only data: enough for any target shot the stage draws."""
  return int(config.dmd.num_shots) if config.stage == 'dmd_inter' else 5


def build_stage(config, workdir: str):
  """The stage of `config` on a shapes-only precompute under workdir (config is updated)."""
  if config.stage not in STAGES:
    raise ValueError(f'stage: {config.stage!r} cannot be compiled ahead of time; accepted: '
                     f'{", ".join(STAGES)}')
  data = pc.write_shapes_only(os.path.join(workdir, 'data'), config, _shots(config))
  config.data.source = 'precomputed'
  config.data.train_dir = config.data.heldout_dir = data
  return train_loop.get_stage(config, workdir)


def abstract_batch(stage, config, mesh):
  """The global batch as ShapeDtypeStructs sharded over data x fsdp: one example from the
  stage's own iterator, its leading axis widened to `data.batch_size`."""
  example = next(stage.train_iterator(0, 1, 1))
  batch = config.data.batch_size
  if batch % sharding_lib.batch_size_multiple(mesh):
    raise ValueError(f'data.batch_size: {batch} is not divisible by the data x fsdp mesh size '
                     f'{sharding_lib.batch_size_multiple(mesh)}')
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((batch,) + np.shape(x)[1:], np.asarray(x).dtype,
                                     sharding=sharding_lib.batch_sharding(mesh, np.ndim(x))),
      example)


def compile_step(config, devices: Sequence, mesh_shape: Sequence[int]):
  """The compiled step of `config`'s stage over `devices` shaped (data, fsdp, tensor)."""
  config = config.copy_and_resolve_references()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = (int(s) for s in mesh_shape)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  with tempfile.TemporaryDirectory() as workdir:
    stage = build_stage(config, workdir)
    tx, decays, step_fn = train_loop.stage_step(config, stage)
    rules = sharding_lib.logical_rules(config)
    shapes, shardings = train_loop.state_shardings(stage, tx, mesh, rules, tuple(decays))
    state = checkpoints.abstract_like(shapes, shardings)
    batch = abstract_batch(stage, config, mesh)
    jitted = train_loop.jit_step(step_fn, shardings,
                                 jax.tree.map(lambda b: b.sharding, batch), mesh, donate=True)
    with sharding_lib.activation_sharding(mesh, rules):   # as train() traces it
      return jitted.lower(state, batch).compile()


def _costs(config, devices, mesh_shape, compiled, probes: bool = True) -> dict:
  """The compiler's FLOPs / optimal_seconds of one step with every layer-scan body counted
  once per layer (module docstring); per device, as the compiler reports them. probes=False
  skips the two probe compiles (the numbers are then left out)."""
  raw = aot.compiled_costs(compiled)
  out = {'flops_scan_body_once': raw['flops']}
  if config.stage not in LAYER_SCAN_ONLY:
    return dict(out, flops=None, optimal_seconds=None, note=LOOP_NOTE)
  if not probes:
    return dict(out, flops=None, optimal_seconds=None, note=NO_PROBES_NOTE)
  probe = lambda unroll: aot.compiled_costs(compile_step(
      aot.with_layers(config, aot.PROBE_LAYERS, unroll), devices, mesh_shape))
  same = config.model.num_layers == aot.PROBE_LAYERS and config.model.scan_unroll == 1
  one, two = (raw if same else probe(1)), probe(2)   # `same`: the step is its own 1-block probe
  layers = config.model.num_layers
  for k in ('flops', 'optimal_seconds'):
    if None in (raw[k], one[k], two[k]):
      out[k] = None
    else:
      out[f'{k}_per_block'] = two[k] - one[k]
      out[k] = raw[k] + (layers - 1) * (two[k] - one[k])
  return out


def analyse(config, topology: str = 'local', mesh: Optional[Sequence[int]] = None,
            costs: bool = True) -> dict:
  """The module docstring's report for `config`'s stage on the devices of `topology`.

  mesh: (data, fsdp, tensor) sizes using every device of the topology (default: all FSDP).
  costs=False: no layer-scan probe compiles (stage 1's FLOPs and time are then omitted)."""
  devices = aot.target_devices(topology)
  mesh_shape = tuple(mesh) if mesh else (1, len(devices), 1)
  if int(np.prod(mesh_shape)) != len(devices):
    raise ValueError(f'--mesh: {"x".join(map(str, mesh_shape))} needs {int(np.prod(mesh_shape))} '
                     f'devices, {topology} has {len(devices)}')
  out = {'stage': config.stage, 'topology': topology, 'chips': len(devices),
         'mesh': dict(zip(sharding_lib.AXES, mesh_shape)),
         'batch': config.data.batch_size, 'dtype': config.model.dtype,
         'attention': config.model.attention, 'remat': bool(config.model.remat)}
  try:
    compiled = compile_step(config, devices, mesh_shape)
  except jax.errors.JaxRuntimeError as e:   # the TPU compiler refuses what cannot fit
    return dict(out, fits=False, memory={}, compile_error=aot.out_of_memory(e))
  out.update(aot.memory_report(compiled, topology))
  if config.model.attention.startswith('splash'):
    out['kernels'] = KERNEL_NOTE
    if config.stage in LAYER_SCAN_ONLY:
      out['analytic_attention_forward_flops'] = teacher_attention_flops(config, mesh_shape)
  out.update(_costs(config, devices, mesh_shape, compiled, probes=costs))
  aot.drop_implausible_seconds(out, topology)
  return out
