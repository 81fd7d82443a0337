"""Shared pieces of the training tests: a small StoryWorld config and a worker subprocess.

Multi-device checks run `tests/train_worker.py` in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax is imported; the pytest
process itself keeps its single CPU device.
"""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


STAGE_CONFIGS = ('teacher', 'ode_init', 'dmd_intra', 'dmd_inter')   # configs/train/<name>.py


def tiny_config(data_dir: str, config_name: str = 'teacher', **overrides):
  """configs/train/<config_name>.py:tiny on a 24+8-story StoryWorld in `data_dir`, quiet;
  `overrides` are dotted config fields, e.g. {'train.num_steps': 3}."""
  import importlib  # pylint: disable=g-import-not-at-top
  c = importlib.import_module(f'configs.train.{config_name}').get_config('tiny')
  c.data.dir = data_dir
  c.data.storyworld.num_train = 24
  c.data.storyworld.num_heldout = 8
  c.train.progress = False
  c.train.eval_every = 0
  c.train.log_every = 1
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def prepare_data(data_dir: str):
  """Builds and encodes the test StoryWorld once (later calls reuse the finished shards)."""
  from shotstream_jax.training import inputs as inputs_lib  # pylint: disable=g-import-not-at-top
  c = tiny_config(data_dir)
  return inputs_lib.prepare(c.data, c, data_dir)


def run_worker(command: str, args: dict, devices: int = 8, timeout: int = 600, check=True,
               cache_dir: str = ''):
  """Runs `train_worker.py command json(args)` with `devices` simulated CPU devices.

  `cache_dir`: a persistent XLA compilation cache shared by several workers (the same program
  compiles once; it also makes the runs use the very same executable).
  """
  env = dict(os.environ)
  if cache_dir:
    env['JAX_COMPILATION_CACHE_DIR'] = cache_dir
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    env['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  proc = subprocess.run([sys.executable, os.path.join(HERE, 'train_worker.py'), command,
                         json.dumps(args)], env=env, cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f'worker {command} failed ({proc.returncode}):\n{proc.stdout}\n'
                         f'{proc.stderr[-6000:]}')
  return proc


def last_json(stdout: str) -> dict:
  lines = [l for l in stdout.splitlines() if l.startswith('{')]
  return json.loads(lines[-1])


def shared_data_dir(tmp_path_factory) -> str:
  """The test StoryWorld, prepared once per pytest session (a module fixture calls this)."""
  d = str(tmp_path_factory.getbasetemp() / 'train_storyworld')
  prepare_data(d)
  return d
