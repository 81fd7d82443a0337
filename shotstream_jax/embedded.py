"""The embedded default model: trained weights that ship inside the repository.

    directory = embedded.model_dir(config)        # None when the preset ships no weights
    pipe = pipeline.ShotStreamPipeline.load(config, **embedded.paths(directory))

A model directory holds every network in the published Wan / ShotStream layouts (so the same
importers read it, and PyTorch tools can too) plus what made it:

    dit.safetensors       the 4-step causal student ('model.<Wan name>', float32)
    vae.safetensors       the Wan2.1-layout VAE, latent statistics folded in (vae.stats.json)
    text.safetensors      the umT5 encoder (original Wan names)
    tokenizer/            spiece.model + tokenizer_config.json, read by UMT5Tokenizer
    manifest.json         preset, commands, wall times, sizes and the measured scores

`configs/shotstream.py` names the directory of a preset (`weights_dir`, relative to the
repository root); `launch/reproduce.py` writes one from nothing.
"""

import json
import os
import shutil
from typing import Dict, Optional

import numpy as np
from safetensors import numpy as st_numpy

from shotstream_jax.convert import dit as dit_convert
from shotstream_jax.convert import umt5 as umt5_convert

FILES = {'dit_path': 'dit.safetensors', 'vae_path': 'vae.safetensors',
         'text_path': 'text.safetensors', 'tokenizer_path': 'tokenizer'}
MANIFEST = 'manifest.json'
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_dir(config) -> Optional[str]:
  """The preset's shipped model directory if it is there (relative names resolve against the
  current directory, then the repository root), else None."""
  name = config.get('weights_dir', '')
  if not name:
    return None
  for base in ('', REPO_ROOT):
    path = os.path.join(base, name)
    if all(os.path.exists(os.path.join(path, f)) for f in FILES.values()):
      return os.path.abspath(path)
  return None


def paths(directory: str) -> Dict[str, str]:
  """Keyword arguments of `ShotStreamPipeline.load` for a model directory."""
  missing = [f for f in FILES.values() if not os.path.exists(os.path.join(directory, f))]
  if missing:
    raise FileNotFoundError(f'weights: {directory} lacks {", ".join(missing)}')
  return {k: os.path.join(directory, f) for k, f in FILES.items()}


def write_model(directory: str, config, dit_params, vae_file: str, text_params,
                tokenizer_dir: str, manifest: dict) -> str:
  """Write a model directory (atomically: a temporary sibling renamed at the end).

  `vae_file` is an exported VAE (training/vae_stage.export_vae: statistics folded, with its
  `.stats.json` beside it); the DiT and umT5 params are converted to their Wan layouts here.
  """
  directory = os.path.abspath(directory)
  tmp = directory + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  st_numpy.save_file(dit_convert.shotstream_state_dict(dit_params, config.model),
                     os.path.join(tmp, FILES['dit_path']))
  st_numpy.save_file(umt5_convert.umt5_to_torch(text_params, config.text),
                     os.path.join(tmp, FILES['text_path']))
  shutil.copyfile(vae_file, os.path.join(tmp, FILES['vae_path']))
  stats = vae_file[:-len('.safetensors')] + '.stats.json'
  if os.path.exists(stats):
    shutil.copyfile(stats, os.path.join(tmp, 'vae.stats.json'))
  shutil.copytree(tokenizer_dir, os.path.join(tmp, FILES['tokenizer_path']))
  sizes = {f: _size(os.path.join(tmp, f)) for f in FILES.values()}
  with open(os.path.join(tmp, MANIFEST), 'w') as f:
    json.dump(dict(manifest, preset=config.preset, bytes=sizes), f, indent=1, default=_plain)
  if os.path.exists(directory):
    shutil.rmtree(directory)
  os.replace(tmp, directory)
  return directory


def read_manifest(directory: str) -> dict:
  with open(os.path.join(directory, MANIFEST)) as f:
    return json.load(f)


def _size(path: str) -> int:
  if os.path.isdir(path):
    return sum(_size(os.path.join(path, f)) for f in os.listdir(path))
  return os.path.getsize(path)


def _plain(x):
  if isinstance(x, np.generic):
    return x.item()
  raise TypeError(f'not JSON serialisable: {type(x).__name__}')
