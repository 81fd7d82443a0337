"""Shared pytest setup: slow-test opt-in and fp32-exact CPU defaults."""

import os

# Parity tests compare fp32 against PyTorch: keep XLA's CPU matmuls at full precision.
os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')

import pytest


def pytest_addoption(parser):
  parser.addoption('--runslow', action='store_true', default=False,
                   help='also run tests marked slow (real 1.3B shapes, long trainings)')
  parser.addoption('--runhuge', action='store_true', default=False,
                   help='also run tests marked huge (>10 GB of disk or RAM: a full umT5-XXL file, the full-size DiT and VAE parity)')


def pytest_collection_modifyitems(config, items):
  for marker, option in (('slow', '--runslow'), ('huge', '--runhuge')):
    if config.getoption(option):
      continue
    skip = pytest.mark.skip(reason=f'{marker}: pass {option} to run')
    for item in items:
      if marker in item.keywords:
        item.add_marker(skip)
