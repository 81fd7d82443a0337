r"""Probe a stage-1a / stage-1 teacher of a chain: x0 error by noise level, and its samples.

  python launch/probe_teacher.py --root=out/storyworld --stage=teacher_image --out=out/probe
  python launch/probe_teacher.py --root=out/storyworld --stage=teacher --guidance=2.5

Writes `<out>/<stage>_probe.json` (x0 error by sigma on held-out examples) and
`<out>/<stage>_samples.png` (ground truth beside 50-step Euler + CFG samples); see
shotstream_jax/eval/teacher_probe.py for what each number is.
"""

import json
import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

from shotstream_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_ROOT = flags.DEFINE_string('root', 'out/storyworld', 'The chain root (launch/reproduce.py).')
_STAGE = flags.DEFINE_string('stage', 'teacher', 'Which teacher: teacher_image or teacher.')
_NUM = flags.DEFINE_integer('num', 8, 'Held-out examples.')
_GUIDANCE = flags.DEFINE_float('guidance', 2.5, 'CFG scale of the samples (1 = no guidance).')
_STEPS = flags.DEFINE_integer('num_steps', 50, 'Euler steps of the samples.')
_OUT = flags.DEFINE_string('out', 'out/probe', 'Output folder.')
_PRESET = flags.DEFINE_string('preset', 'storyworld', 'The chain\'s --preset.')
_SET = flags.DEFINE_multi_string('set', [], 'The chain\'s step:dotted.field=value overrides.')


def main(argv):
  del argv
  cli.quiet_logs()
  # pylint: disable=g-import-not-at-top
  from shotstream_jax.eval import teacher_probe
  from shotstream_jax.training import chain as chain_lib
  overrides = cli.exit_on_user_error(chain_lib.parse_overrides, _SET.value)
  result = cli.exit_on_user_error(teacher_probe.probe, _ROOT.value, _STAGE.value, _NUM.value,
                                  _GUIDANCE.value, _STEPS.value, _OUT.value, _PRESET.value,
                                  overrides)
  print(json.dumps(result, indent=1))


if __name__ == '__main__':
  cli.run(main)
