r"""Compile generation or a training step ahead of time for a TPU topology (or the local
devices) and print one JSON object per piece / step: per-device memory and whether it fits
the chip's HBM, FLOPs per call (the layer scan's body counted once per layer), the compiler's
optimal_seconds and the implied frames per second or step time (shotstream_jax/aot.py,
shotstream_jax/aot_train.py).

  python launch/aot.py --config=configs/shotstream.py:wan_1_3b --config.model.dtype=bfloat16 \
      --topology=v5p:2x2x1 --pieces=all        # needs the libtpu wheel (README: Speed)
  python launch/aot.py --config=configs/shotstream.py:tiny --topology=local --pieces=chunk
  python launch/aot.py --config=configs/train/teacher.py:wan_1_3b \
      --config.model.attention=splash --topology=v5p:2x2x1 --mesh=1,4,1

A model config (configs/shotstream.py) compiles generation pieces, batch 1 on one chip; with
text_kv, prefill, chunk and decode, a last object gives a streamed shot's FLOPs, time and
frames per second. A training config (configs/train/<stage>.py: teacher, ode_init, dmd_intra,
dmd_inter) compiles that stage's step as train.py runs it, sharded over every chip of the
topology by --mesh, at the config's data.batch_size.
"""

import json

from absl import flags

from shotstream_jax import aot
from shotstream_jax import aot_train
from shotstream_jax import cli

_CONFIG = cli.define_config_file('config', 'configs/shotstream.py:wan_1_3b',
                                 'Config: configs/shotstream.py:<preset> (generation) or '
                                 'configs/train/<stage>.py:<preset> (a training step).')
_TOPOLOGY = flags.DEFINE_string('topology', 'local',
                                "'local', or a TPU topology <chip>:<shape> such as v5p:2x2x1, "
                                'v6e:2x2, v5e:2x2, v4:2x2x1 (generation: one chip of it).')
_PIECES = flags.DEFINE_string('pieces', 'all',
                              f'Generation: comma-separated pieces ({", ".join(aot.PIECES)}) '
                              'or all.')
_MESH = flags.DEFINE_list('mesh', [], 'Training: data,fsdp,tensor sizes over all chips of the '
                          'topology (default: all FSDP).')
_COSTS = flags.DEFINE_bool('costs', True, 'Training: also compile the 4-layer probes that '
                           'correct FLOPs / optimal_seconds for the layer scan (stage 1 only).')


def run(config, topology: str, pieces: str):
  names = list(aot.PIECES) if pieces == 'all' else [p.strip() for p in pieces.split(',') if p]
  bad = [p for p in names if p not in aot.PIECES]
  if bad or not names:
    raise ValueError(f'--pieces: unknown {bad or pieces!r}; accepted: {", ".join(aot.PIECES)} '
                     'or all')
  aot.target_devices(topology)      # a bad topology fails before any compile
  reports = {}
  for name in names:
    reports[name] = aot.analyse(config, name, topology)
    print(json.dumps(reports[name]), flush=True)
  totals = aot.shot_totals(config, reports)
  if totals is not None:
    print(json.dumps(dict(shot=totals, topology=topology)), flush=True)


def run_training(config, topology: str, mesh, costs: bool):
  try:
    sizes = [int(m) for m in mesh] if mesh else None
  except ValueError:
    sizes = None
  if mesh and (sizes is None or len(sizes) != 3 or min(sizes) < 1):
    raise ValueError(f'--mesh: expected three positive sizes data,fsdp,tensor (e.g. 1,4,1), '
                     f'got {",".join(mesh)}')
  print(json.dumps(aot_train.analyse(config, topology, sizes, costs=costs)), flush=True)


def main(argv):
  del argv
  cli.quiet_logs()
  config = _CONFIG.value
  if 'stage' in config:
    cli.exit_on_user_error(run_training, config, _TOPOLOGY.value, _MESH.value, _COSTS.value)
  else:
    cli.exit_on_user_error(run, config, _TOPOLOGY.value, _PIECES.value)


if __name__ == '__main__':
  cli.run(main)
