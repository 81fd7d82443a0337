r"""Compile generation ahead of time for a TPU topology (or the local devices) and print, per
piece, one JSON object: per-device memory and whether it fits the chip's HBM, FLOPs per call
(the layer scan's body counted once per layer), the compiler's optimal_seconds and the implied
frames per second (shotstream_jax/aot.py).

  python launch/aot.py --config=configs/shotstream.py:wan_1_3b --config.model.dtype=bfloat16 \
      --topology=v5p:2x2x1 --pieces=all        # needs the libtpu wheel (README: Speed)
  python launch/aot.py --config=configs/shotstream.py:tiny --topology=local --pieces=chunk

With text_kv, prefill, chunk and decode, a last object gives a streamed shot's FLOPs, time and
frames per second on one chip.
"""

import json

from absl import flags

from shotstream_jax import aot
from shotstream_jax import cli

_CONFIG = cli.define_config_file('config', 'configs/shotstream.py:wan_1_3b',
                                 'Config: configs/shotstream.py:<preset>.')
_TOPOLOGY = flags.DEFINE_string('topology', 'local',
                                "'local', or a TPU topology <chip>:<shape> such as v5p:2x2x1, "
                                'v6e:2x2, v5e:2x2, v4:2x2x1 (one chip of it is used).')
_PIECES = flags.DEFINE_string('pieces', 'all',
                              f'Comma-separated pieces ({", ".join(aot.PIECES)}) or all.')


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


def main(argv):
  del argv
  cli.quiet_logs()
  cli.exit_on_user_error(run, _CONFIG.value, _TOPOLOGY.value, _PIECES.value)


if __name__ == '__main__':
  cli.run(main)
