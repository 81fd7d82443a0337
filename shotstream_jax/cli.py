"""Helpers for the absl entry points in launch/: bad input ends in one line, not a traceback."""

import sys

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def exit_on_user_error(fn, *args, **kwargs):
  """Call fn; a user error (bad flag value, file, config) exits 2 with `error: <message>`."""
  try:
    return fn(*args, **kwargs)
  except USER_ERRORS as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def quiet_logs():
  """absl INFO lines (jax backend probing, orbax per-step bookkeeping) off unless the user
  passed --verbosity; warnings and our own output stay."""
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
