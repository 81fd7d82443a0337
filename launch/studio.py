r"""A web page for directing a story live: type the next shot while the current one streams in.

  python launch/studio.py                       # the embedded default model, http://127.0.0.1:8000
  python launch/studio.py --port=8080 --pace_fps=16
  python launch/studio.py --config=configs/shotstream.py:wan_1_3b --ckpt=... --vae=... \
      --text_encoder=... --tokenizer=...          # the same model flags as generate.py

Every tab is its own story; all tabs share the loaded model and its compiled functions (it
compiles once, at start-up, before the page is served). Serves on localhost only unless --host
says otherwise. shotstream_jax/studio/ holds the server, the sessions and the page.
"""

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

from shotstream_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = cli.define_config_file('config', 'configs/shotstream.py:storyworld',
                                 'Config: configs/shotstream.py:<preset>.')
_MODEL = cli.define_model_flags()
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Interface to serve on.')
_PORT = flags.DEFINE_integer('port', 8000, 'Port to serve on.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of every story.')
_MAX_SESSIONS = flags.DEFINE_integer('max_sessions', 8, 'Open stories (tabs) at most.')
_MAX_QUEUED = flags.DEFINE_integer('max_queued', 8, 'Queued shots at most, all tabs together.')
_PACE = flags.DEFINE_float('pace_fps', 0.0, 'Stream no faster than this frame rate (0: as fast '
                           'as generated).')


def build_studio(config, model_files, seed, max_sessions, max_queued, pace_fps):
  """The pipeline (compiled by a warm-up) and the Studio around it."""
  from shotstream_jax.studio import sessions  # pylint: disable=g-import-not-at-top
  try:   # bad limits fail before minutes of model building; the fields are these flags
    limits = sessions.StudioLimits(max_sessions=max_sessions, max_queued=max_queued,
                                   pace_fps=pace_fps, seed=seed)
  except ValueError as e:
    raise ValueError(f'--{e}') from None
  pipe = cli.build_pipeline(config, *model_files)
  print(f'compiling (warm-up): {pipe.warmup():.1f}s', file=sys.stderr)
  return sessions.Studio(pipe, limits)


def main(argv):
  del argv
  cli.quiet_logs()
  import uvicorn  # pylint: disable=g-import-not-at-top
  from shotstream_jax.studio import server  # pylint: disable=g-import-not-at-top
  studio = cli.exit_on_user_error(build_studio, _CONFIG.value,
                                  [h.value for h in _MODEL.values()], _SEED.value,
                                  _MAX_SESSIONS.value, _MAX_QUEUED.value, _PACE.value)
  print(f'studio: http://{_HOST.value}:{_PORT.value}/', file=sys.stderr, flush=True)
  uvicorn.run(server.make_app(studio), host=_HOST.value, port=_PORT.value, log_level='warning')


if __name__ == '__main__':
  cli.run(main)
