"""Several trained DiTs on the same held-out stories, paired story by story against the first.

    models, generators = compare.load({'shipped': 'weights/storyworld',
                                       'stage 2': 'out/storyworld:ode'})
    result = compare.compare(models, generators, num_stories=256)

Why: the harness' rows of two runs differ by a few hundredths on 32 stories, while one story's
scores differ from the next story's by far more; whether a new model beats the shipped one is
only settled by generating both on the same stories and seeds and reading the differences
story by story, with a standard error (README: the fourteenth attempt was level with the
shipped model on 256 stories where its 32-story row looked better). Every student runs
through the 4-step streaming pipeline, a chain's teacher as the harness' teacher row (50 Euler
steps with CFG); the VAE, text encoder and tokenizer must be the same files for all of them
(only the DiT differs, so a difference is the DiT's).
"""

import hashlib
import os
from typing import Dict, Tuple

from shotstream_jax import embedded
from shotstream_jax.eval import harness
from shotstream_jax import pipeline as pipeline_lib
from shotstream_jax.training import chain as chain_lib

# A chain step whose generator a spec may name (ROOT:STEP), and its harness row; ROOT:teacher
# names the chain's stage-1 teacher, generating as the harness' teacher row does.
STEPS = dict(zip(('ode', 'dmd_intra', 'dmd_inter'), harness.STUDENTS))
TEACHER = 'teacher'


def _digest(path: str) -> str:
  """sha256 of a file, or of a folder's files in name order (a tokenizer folder)."""
  h = hashlib.sha256()
  files = ([os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path)
           else [path])
  for name in files:
    with open(name, 'rb') as f:
      h.update(f.read())
  return h.hexdigest()


def _shared_files(spec: str) -> Tuple[str, str, str]:
  if ':' in spec:
    ch = chain_lib.Chain(spec.rsplit(':', 1)[0])
    return ch.vae_file, ch.text_file, ch.tokenizer_dir
  p = embedded.paths(spec)
  return p['vae_path'], p['text_path'], p['tokenizer_path']


def load(specs: Dict[str, str], config=None) -> Tuple[harness.Models, Dict[str, tuple]]:
  """(the first spec's Models, {name: (DiT params, sampler: None for the 4-step student's)})
  of `specs`: name -> a model directory (`weights/storyworld`, read with `config`) or
  ROOT:STEP, a `launch/reproduce.py` root and one of STEPS or TEACHER (its networks at the
  sizes the run recorded)."""
  if not specs:
    raise ValueError('models: give at least one name=model_dir or name=ROOT:STEP')
  first, generators, chains = None, {}, {}   # chains: root -> its Models, loaded once
  for name, spec in specs.items():
    if ':' in spec:
      root, step = spec.rsplit(':', 1)
      if step not in STEPS and step != TEACHER:
        raise ValueError(f'models: {name}={spec}: step {step!r}; accepted: '
                         f'{", ".join(STEPS)}, {TEACHER}')
      if not os.path.isdir(root):
        raise FileNotFoundError(f'models: {name}={spec}: {root} is not a reproduce.py root')
      if root not in chains:
        chains[root] = harness.models_from_chain(root)
      models = chains[root]
      params = (models.teacher if step == TEACHER
                else models.generators.get(STEPS[step]))
      if params is None:
        raise ValueError(f'models: {name}={spec}: step {step} of {root} has not finished')
      entry = (params, harness.teacher_sampler(models) if step == TEACHER else None)
    else:
      if not os.path.isdir(spec):
        raise FileNotFoundError(f'models: {name}={spec} is not a model directory or ROOT:STEP')
      models = harness.models_from_dir(spec, config)
      entry = (models.generators[harness.STUDENTS[-1]], None)
    if first is None:
      first, first_spec = models, spec
      shared = [_digest(f) for f in _shared_files(spec)]
    elif [_digest(f) for f in _shared_files(spec)] != shared:
      raise ValueError(f'models: {name}={spec} has another VAE, text encoder or tokenizer than '
                       f'{first_spec}; only DiTs that share them are compared')
    generators[name] = entry
  return first, generators


def compare(models: harness.Models, generators: Dict[str, tuple], num_stories: int = 256,
            seed: int = 0, progress: bool = True) -> dict:
  """{'rows': {name: mean judge scores}, 'found_by_motion': {name: {camera: share found}},
  'paired': {name: {score: mean_se(name - first)}} for every name after the first, 'baseline':
  the first name}, each DiT generating the same `num_stories` held-out stories with the
  harness' seeds (so a model directory's row equals its stage-4 row of `launch/evaluate.py`)."""
  config = models.config
  stories = harness.held_out_stories(num_stories, seed)
  encoder = harness.prompt_encoder(models)
  rows, by_motion, judged = {}, {}, {}
  for name, (params, sampler) in generators.items():
    pipe = pipeline_lib.ShotStreamPipeline(config, params, models.vae_params, encoder, sampler)
    videos = harness.generate_all(pipe, stories, seed, progress, name)
    judged[name] = [harness.judge_story(v, st) for v, st in zip(videos, stories)]
    rows[name] = harness.mean_scores(judged[name])
    by_motion[name] = harness.diagnose(videos, stories, judged[name], config)['found_by_motion']
  baseline = next(iter(generators))
  paired = {name: harness.paired_differences(judged[name], judged[baseline])
            for name in generators if name != baseline}
  return {'num_stories': num_stories, 'seed': seed, 'baseline': baseline, 'rows': rows,
          'found_by_motion': by_motion, 'paired': paired}


def markdown(result: dict) -> str:
  """The rows and the paired differences as two markdown tables."""
  keys = ('overall', 'identity', 'adherence', 'found')
  lines = [f'{result["num_stories"]} held-out stories, seed {result["seed"]}', '',
           '| model | ' + ' | '.join(keys) + ' |', '|---' * (len(keys) + 1) + '|']
  lines += [f'| {name} | ' + ' | '.join(f'{row[k]:.3f}' for k in keys) + ' |'
            for name, row in result['rows'].items()]
  if result['paired']:
    lines += ['', f'| minus {result["baseline"]}, paired, mean +- s.e. | '
              + ' | '.join(keys) + ' |', '|---' * (len(keys) + 1) + '|']
    lines += [f'| {name} | ' + ' | '.join(harness.plus_minus(d[k], '+.3f') for k in keys)
              + ' |' for name, d in result['paired'].items()]
  return '\n'.join(lines) + '\n'
