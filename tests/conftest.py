"""Shared pytest setup: slow-test opt-in and fp32-exact CPU defaults."""

import os

# Parity tests compare fp32 against PyTorch: keep XLA's CPU matmuls at full precision.
os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')

import pytest


def pytest_addoption(parser):
  parser.addoption('--runslow', action='store_true', default=False,
                   help='also run tests marked slow (real 1.3B shapes, long trainings)')


def pytest_collection_modifyitems(config, items):
  if config.getoption('--runslow'):
    return
  skip = pytest.mark.skip(reason='slow: pass --runslow to run')
  for item in items:
    if 'slow' in item.keywords:
      item.add_marker(skip)
