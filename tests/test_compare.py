"""launch/compare.py (shotstream_jax/eval/compare.py): DiTs on the same held-out stories,
paired story by story against the first. Runs the shipped model (weights/storyworld) against
itself and against a random DiT written into a copy of its directory."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import shotstream
from shotstream_jax import embedded
from shotstream_jax.convert import umt5 as umt5_convert
from shotstream_jax.eval import compare
from shotstream_jax.models import random_init

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CFG = shotstream.get_config('storyworld')
SHIPPED = embedded.model_dir(_CFG)

pytestmark = pytest.mark.skipif(SHIPPED is None, reason='weights/storyworld is absent from '
                                'this checkout (make it with launch/reproduce.py --ship)')


def _random_dit_dir(tmp_path):
  """A model directory with the shipped VAE, text encoder and tokenizer and a random DiT."""
  p = embedded.paths(SHIPPED)
  out = str(tmp_path / 'random_dit')
  embedded.write_model(out, _CFG, random_init.embedded_dit(_CFG.model, 1), p['vae_path'],
                       umt5_convert.load_umt5(p['text_path'], _CFG.text), p['tokenizer_path'],
                       {'made_by': 'tests/test_compare.py'})
  return out


def test_compare_pairs_against_the_first(tmp_path):
  models, generators = compare.load({'shipped': SHIPPED, 'again': SHIPPED,
                                     'random': _random_dit_dir(tmp_path)}, _CFG)
  result = compare.compare(models, generators, num_stories=2, progress=False)
  rows, paired = result['rows'], result['paired']
  assert result['baseline'] == 'shipped' and set(paired) == {'again', 'random'}
  assert rows['again'] == rows['shipped']          # same DiT, stories and seeds: same videos
  assert all(d['mean'] == 0.0 for d in paired['again'].values())
  assert rows['shipped']['found'] > 0 and rows['random']['found'] == 0.0   # no scene at all
  for k in ('overall', 'found'):
    np.testing.assert_allclose(paired['random'][k]['mean'],
                               rows['random'][k] - rows['shipped'][k], atol=2e-4)
    assert paired['random'][k]['mean'] < 0 and paired['random'][k]['se'] is not None
  md = compare.markdown(result)
  assert '| minus shipped, paired' in md and '| random |' in md


def test_compare_refuses_other_shared_files_and_bad_specs(tmp_path):
  other = str(tmp_path / 'other_text')
  shutil.copytree(SHIPPED, other)
  with open(os.path.join(other, 'text.safetensors'), 'r+b') as f:   # another text encoder
    f.seek(-4, os.SEEK_END)
    f.write(b'\x00\x00\x80\x3f')
  with pytest.raises(ValueError, match='other=.* has another VAE, text encoder or tokenizer'):
    compare.load({'shipped': SHIPPED, 'other': other}, _CFG)
  with pytest.raises(FileNotFoundError, match='nope=.* is not a model directory or ROOT:STEP'):
    compare.load({'nope': str(tmp_path / 'missing')}, _CFG)
  with pytest.raises(FileNotFoundError, match='x=.*:ode: .* is not a reproduce.py root'):
    compare.load({'x': f'{tmp_path}/missing:ode'}, _CFG)
  with pytest.raises(ValueError, match="'stage9'; accepted: ode, dmd_intra, dmd_inter, teacher"):
    compare.load({'x': f'{tmp_path}:stage9'}, _CFG)


@pytest.mark.parametrize('models, needle', [
    ('a=weights/storyworld,a=weights/storyworld', "--models: 'a=weights/storyworld': need "
     'distinct'),
    ('weights/storyworld', "--models: 'weights/storyworld': need distinct name="),
    ('', '--models: give at least one'),
])
def test_cli_bad_models_one_line(models, needle, tmp_path):
  run = subprocess.run([sys.executable, 'launch/compare.py', f'--models={models}',
                        f'--out={tmp_path}'], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
  assert run.returncode != 0
  last = run.stderr.strip().splitlines()[-1]
  assert needle in last, run.stderr[-2000:]
