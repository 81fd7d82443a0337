"""The README's two set-up commands exist and agree with what CI and the repository hold.

Why a test: the README is the contract for a fresh machine (one command installs and writes a
story, one installs the test extras and runs the tests, which `.ci/run` must run verbatim); an
edit that drops or changes either would otherwise only be noticed by a reader.
"""

import os
import re
import shlex

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_commands():
  with open(os.path.join(REPO, 'README.md')) as f:
    text = f.read()
  start = text.index('## Set-up: two commands')
  end = text.index('\n## ', start + 1)
  return re.findall(r'```bash\n(.*?)\n```', text[start:end], re.S)


def test_two_setup_commands():
  commands = _setup_commands()
  assert len(commands) >= 2, f'README set-up: expected the two commands, found {len(commands)}'
  run, test = commands[0], commands[1]
  assert run.startswith('python3.11 -m venv .venv && ') and 'launch/generate.py' in run
  assert test.startswith('python3.11 -m venv .venv && ') and '-m pytest' in test
  for word in shlex.split(run):     # files the first command names must be in the repository
    if word.startswith('--prompts='):
      assert os.path.exists(os.path.join(REPO, word.split('=', 1)[1])), word
    elif word.endswith(('.py', '.txt')) and not word.startswith('-'):
      assert os.path.exists(os.path.join(REPO, word)), word


def test_ci_runs_the_readme_test_command_verbatim():
  test = _setup_commands()[1]
  with open(os.path.join(REPO, '.ci', 'run')) as f:
    lines = [line.strip() for line in f]
  assert test in lines, '.ci/run does not run the README test command verbatim'
