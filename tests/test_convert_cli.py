"""launch/convert.py: a published-format file -> orbax params, through the CLI as a user runs it."""

import os
import subprocess
import sys

import jax
import numpy as np
import torch

from configs import shotstream
from shotstream_jax import checkpoints
from shotstream_jax.convert import dit as dit_convert
from shotstream_jax.models import dit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shotstream_pt(cfg, path):
  """A ShotStream-layout .pt (random weights) in original names; returns the torch state dict."""
  torch.manual_seed(0)
  shapes = dit_convert.expected_shapes(cfg)
  sd = {name: torch.randn(shape) for name, shape in shapes.items()}
  torch.save({'generator': {f'model.{k}': v for k, v in sd.items()}}, path)
  return sd


def test_convert_cli_writes_restorable_orbax(tmp_path):
  cfg = shotstream.get_config('tiny')
  src = tmp_path / 'shotstream_merged.pt'
  sd = _shotstream_pt(cfg.model, src)
  dst = tmp_path / 'ckpt'
  res = subprocess.run(
      [sys.executable, 'launch/convert.py', '--config=configs/shotstream.py:tiny', '--kind=dit',
       f'--src={src}', f'--dst={dst}'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  restored = checkpoints.restore_params(str(dst), dit.param_shapes(cfg.model))
  expected = dit_convert.dit_from_torch(sd, cfg.model)
  jax.tree.map(np.testing.assert_array_equal, restored, expected)
  # Spot-check one transposed tensor against the source directly.
  np.testing.assert_array_equal(restored['blocks']['self_attn']['q']['kernel'][1],
                                sd['blocks.1.self_attn.q.weight'].numpy().T)
  # A second run refuses to overwrite.
  res = subprocess.run(
      [sys.executable, 'launch/convert.py', '--config=configs/shotstream.py:tiny', '--kind=dit',
       f'--src={src}', f'--dst={dst}'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert res.returncode == 2, res.stderr[-2000:]
  assert res.stderr.strip().splitlines()[-1].startswith('error: --dst: ')
  assert 'already exists' in res.stderr and 'Traceback' not in res.stderr


def test_unwritable_dst_fails_in_a_line_and_exits(tmp_path):
  """It used to print the error and then hang forever (orbax's async writer threads)."""
  cfg = shotstream.get_config('tiny')
  src = tmp_path / 'shotstream_merged.pt'
  _shotstream_pt(cfg.model, src)
  (tmp_path / 'file').write_text('x')
  res = subprocess.run(
      [sys.executable, 'launch/convert.py', '--config=configs/shotstream.py:tiny', '--kind=dit',
       f'--src={src}', f'--dst={tmp_path}/file/ckpt'], cwd=REPO, capture_output=True,
      text=True, timeout=120)
  assert res.returncode == 2, res.stderr[-2000:]
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith('error: --dst: cannot create') and 'is a file' in last, last
