r"""The whole StoryWorld model from nothing, then its evaluation: one resumable command.

  python launch/reproduce.py --root=out/storyworld            # ~6 h on a 2-core CPU
  python launch/reproduce.py --root=out/storyworld --ship=weights/storyworld   # and ship it

Steps (shotstream_jax/training/chain.py): StoryWorld pixels, stage 0 (VAE), its export with
latent statistics folded in, the SentencePiece vocabulary and frozen umT5, precompute, stages
1-4, the model directory, then the harness (launch/evaluate.py) into <root>/eval. Rerun the same
command after a kill: finished steps are skipped, training resumes from its last checkpoint.
<root>/chain.json holds each step's wall time, <root>/overrides.json the --set overrides (later
runs and launch/evaluate.py --root reuse them; a different data: or model: value is refused).

--carry=DIR first copies an earlier run's outputs into --root (DIR laid out like it, e.g.
weights/storyworld_progress/export/vae.safetensors: stage 0 is then done).

--set=step:field=value overrides a config field of one step (repeatable), e.g.
--set=teacher:train.num_steps=100 --set=model:sampling.fps=8 for a quick run. Values are JSON
(a list sets a tuple: --set=model:model.patch_size=[1,2,2]); a bad one stops the run before
anything is recorded.
"""

import json
import os
import shutil
import sys
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

from shotstream_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_ROOT = flags.DEFINE_string('root', 'out/storyworld', 'Where every step writes (resumed).')
_PRESET = flags.DEFINE_string('preset', 'storyworld', 'Config preset of every step.')
_SET = flags.DEFINE_multi_string('set', [], 'step:dotted.field=value config override.')
_STEPS = flags.DEFINE_list('steps', [], 'Run only these steps (default: all).')
_EVAL = flags.DEFINE_bool('evaluate', True, 'Run the harness after the chain (--noevaluate: '
                          'reuse <root>/eval/results.json if there, e.g. to --ship).')
_NUM_STORIES = flags.DEFINE_integer('num_stories', 32, 'Held-out stories of the harness.')
_CARRY = flags.DEFINE_string('carry', '', 'A folder laid out like --root with outputs of an '
                             'earlier run (e.g. weights/storyworld_progress: the stage-0 '
                             'export); copied in first, and the steps they finish are skipped.')
_SHIP = flags.DEFINE_string('ship', '', 'Copy the finished model directory here (e.g. '
                            'weights/storyworld), with the harness numbers in its manifest.')


def reproduce(root, preset, overrides, steps, evaluate, num_stories, ship, carry=''):
  # pylint: disable=g-import-not-at-top
  from shotstream_jax import embedded
  from shotstream_jax.eval import harness
  from shotstream_jax.training import chain as chain_lib
  start = time.time()
  times = chain_lib.run_chain(root, preset, overrides, steps or None, carry=carry)
  result = None
  eval_dir = os.path.join(root, 'eval')
  eval_time = os.path.join(eval_dir, 'wall_s.json')
  if evaluate:
    t0 = time.time()
    models = harness.models_from_chain(root, preset, overrides)
    result = harness.evaluate(models, num_stories=num_stories)
    paths = harness.write_report(result, eval_dir)
    with open(eval_time, 'w') as f:
      json.dump(round(time.time() - t0, 1), f)
    print(open(paths['md']).read())
  elif os.path.exists(os.path.join(eval_dir, 'results.json')):
    with open(os.path.join(eval_dir, 'results.json')) as f:   # an earlier run's harness
      result = json.load(f)
  if os.path.exists(eval_time):
    with open(eval_time) as f:
      times['evaluate'] = json.load(f)
  summary = {'steps_s': times, 'this_run_s': round(time.time() - start, 1),
             'total_s': round(sum(times.values()), 1)}
  with open(os.path.join(root, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  if ship:
    chain = chain_lib.Chain(root, preset, overrides)
    manifest = embedded.read_manifest(chain.model_dir)
    manifest['wall_s'] = summary
    if result is not None:
      manifest['harness'] = {k: v for k, v in result.items() if k != 'sheet'}
    tmp = os.path.abspath(ship) + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(chain.model_dir, tmp)
    with open(os.path.join(tmp, embedded.MANIFEST), 'w') as f:
      json.dump(manifest, f, indent=1)
    shutil.rmtree(ship, ignore_errors=True)
    os.replace(tmp, ship)
    print(f'reproduce: model copied to {ship}')
  return summary


def main(argv):
  del argv
  cli.quiet_logs()
  from shotstream_jax.training import chain as chain_lib  # pylint: disable=g-import-not-at-top
  summary = cli.exit_on_user_error(reproduce, _ROOT.value, _PRESET.value,
                                   cli.exit_on_user_error(chain_lib.parse_overrides, _SET.value),
                                   _STEPS.value, _EVAL.value, _NUM_STORIES.value, _SHIP.value,
                                   _CARRY.value)
  print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  cli.run(main)
