r"""The StoryWorld measurement harness (shotstream_jax/eval/harness.py) on held-out stories.

  # every model of a reproduce run (teacher, stage 2-4 students, ablations, 8-shot stories),
  # at the sizes the run recorded (<root>/overrides.json):
  python launch/evaluate.py --root=out/storyworld --num_stories=32 --out=out/storyworld/eval
  # the shipped default model alone (ground truth, VAE round trip, stage 4, its ablations):
  python launch/evaluate.py --model_dir=weights/storyworld --out=out/eval_shipped

Writes results.json, results.md (the tables) and contact_sheet.png (ground truth vs every
model, first / middle / last frame of each shot) to --out and prints the markdown.
"""

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

from shotstream_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = cli.define_config_file('config', 'configs/shotstream.py:storyworld',
                                 'Model config (with --model_dir).')
_ROOT = flags.DEFINE_string('root', None, 'A launch/reproduce.py --root: every stage.')
_MODEL_DIR = flags.DEFINE_string('model_dir', None, 'A model directory (weights/storyworld).')
_OUT = flags.DEFINE_string('out', 'out/eval', 'Report folder.')
_NUM_STORIES = flags.DEFINE_integer('num_stories', 32, 'Held-out stories.')
_SEED = flags.DEFINE_integer('seed', 0, 'Story set and generation seeds.')
_LONG = flags.DEFINE_integer('long_stories', 64, '8-shot stories for error accumulation (0: off).')
_ABLATIONS = flags.DEFINE_bool('ablations', True, 'Inference-time ablations of stage 4.')
_SPEED = flags.DEFINE_bool('speed', True, 'Time the stage-4 pipeline.')


def evaluate(config, root, model_dir, out, num_stories, seed, long_stories, ablations, speed):
  from shotstream_jax.eval import harness  # pylint: disable=g-import-not-at-top
  if bool(root) == bool(model_dir):
    raise ValueError('--root/--model_dir: give exactly one')
  for flag, value in (('--num_stories', num_stories), ('--long_stories', long_stories)):
    if value < 0 or (flag == '--num_stories' and value < 1):
      raise ValueError(f'{flag}: must be >= {1 if flag == "--num_stories" else 0}, got {value}')
  path = root or model_dir
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{"--root" if root else "--model_dir"}: {path} is not a directory')
  models = (harness.models_from_chain(root) if root else
            harness.models_from_dir(model_dir, config))
  result = harness.evaluate(models, num_stories=num_stories, seed=seed, ablations=ablations,
                            long_stories=long_stories, speed=speed)
  return harness.write_report(result, out)


def main(argv):
  del argv
  cli.quiet_logs()
  paths = cli.exit_on_user_error(evaluate, _CONFIG.value, _ROOT.value, _MODEL_DIR.value,
                                 _OUT.value, _NUM_STORIES.value, _SEED.value, _LONG.value,
                                 _ABLATIONS.value, _SPEED.value)
  cli.print_report(paths, 'evaluate')


if __name__ == '__main__':
  cli.run(main)
