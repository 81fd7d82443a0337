"""Shared pytest setup: slow-test opt-in and fp32-exact CPU defaults."""

import os

# Parity tests compare fp32 against PyTorch: keep XLA's CPU matmuls at full precision.
os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')

import shutil
import tempfile

import pytest

# One XLA compilation cache per test run (fresh each run, removed at the end): the suite builds
# the same tiny programs many times, in this process and in the CLI / worker subprocesses that
# inherit the variables. A test that sets its own cache dir (tests/train_worker.py) keeps it.
_CACHE_DIR = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix='shotstream-test-xla-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE_DIR
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'


def pytest_unconfigure(config):
  del config
  if _CACHE_DIR:
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


def pytest_addoption(parser):
  parser.addoption('--runslow', action='store_true', default=False,
                   help='also run tests marked slow (real 1.3B shapes, long trainings)')
  parser.addoption('--runhuge', action='store_true', default=False,
                   help='also run tests marked huge (>10 GB of disk or RAM: a full umT5-XXL file, the full-size DiT and VAE parity)')


# The longest tests (minutes each on 2 cores), started first: the README runs the suite in two
# xdist workers, which hand tests out in collection order, so a long test collected last would
# run alone at the end while the other worker idles.
_RUN_FIRST = ('tests/test_chain.py::test_chain_end_to_end',
              'tests/test_train_sharded.py::test_every_stage_runs_sharded',
              'tests/test_train_dmd.py::test_dmd_inter_schedule',
              'tests/test_train_sharded.py::test_kill_and_resume_is_bitwise_identical')


def pytest_collection_modifyitems(config, items):
  rank = {nodeid: i for i, nodeid in enumerate(_RUN_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid, len(rank)))   # stable: the rest keep order
  for marker, option in (('slow', '--runslow'), ('huge', '--runhuge')):
    if config.getoption(option):
      continue
    skip = pytest.mark.skip(reason=f'{marker}: pass {option} to run')
    for item in items:
      if marker in item.keywords:
        item.add_marker(skip)
