r"""Trained DiTs on the same held-out stories, each paired story by story against the first
(shotstream_jax/eval/compare.py): does a new model beat the shipped one?

  python launch/compare.py --models=shipped=weights/storyworld,new=out/storyworld/model
  # a chain's stage-2 / -3 / -4 generator or its teacher: ROOT:STEP (ode, dmd_intra,
  # dmd_inter, teacher: 50 Euler steps with CFG, ~9x a student's time)
  python launch/compare.py --models=stage4=out/storyworld:dmd_inter,stage2=out/storyworld:ode

Writes compare.json and compare.md to --out and prints the markdown. The VAE, text encoder
and tokenizer must be the same files for every model.
"""

import json
import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

from shotstream_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = cli.define_config_file('config', 'configs/shotstream.py:storyworld',
                                 'Model config of the model directories.')
_MODELS = flags.DEFINE_list('models', [], 'name=model_dir or name=ROOT:STEP, the first the '
                            'baseline.')
_OUT = flags.DEFINE_string('out', 'out/compare', 'Report folder.')
_NUM_STORIES = flags.DEFINE_integer('num_stories', 256, 'Held-out stories.')
_SEED = flags.DEFINE_integer('seed', 0, 'Story set and generation seeds (the harness\').')


def run_compare(config, models, out, num_stories, seed):
  from shotstream_jax.eval import compare  # pylint: disable=g-import-not-at-top
  if num_stories < 1:
    raise ValueError(f'--num_stories: must be >= 1, got {num_stories}')
  if not models:
    raise ValueError('--models: give at least one name=model_dir or name=ROOT:STEP')
  specs = {}
  for item in models:
    name, sep, spec = item.partition('=')
    if not sep or not name or not spec or name in specs:
      raise ValueError(f'--models: {item!r}: need distinct name=model_dir or name=ROOT:STEP')
    specs[name] = spec
  loaded, generators = compare.load(specs, config)
  result = compare.compare(loaded, generators, num_stories=num_stories, seed=seed)
  os.makedirs(out, exist_ok=True)
  paths = {'json': os.path.join(out, 'compare.json'), 'md': os.path.join(out, 'compare.md')}
  with open(paths['json'], 'w') as f:
    json.dump(result, f, indent=1)
  with open(paths['md'], 'w') as f:
    f.write(compare.markdown(result))
  return paths


def main(argv):
  del argv
  cli.quiet_logs()
  paths = cli.exit_on_user_error(run_compare, _CONFIG.value, _MODELS.value, _OUT.value,
                                 _NUM_STORIES.value, _SEED.value)
  cli.print_report(paths, 'compare')


if __name__ == '__main__':
  cli.run(main)
