"""Helpers for the absl entry points in launch/: bad input ends in one line, not a traceback."""

import os
import sys

# Bad flag values, missing or unwritable files: OSError covers FileNotFoundError,
# FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError.
USER_ERRORS = (ValueError, OSError)


def exit_on_user_error(fn, *args, **kwargs):
  """Call fn; a user error (bad flag value, file, config) exits 2 with `error: <message>`."""
  try:
    return fn(*args, **kwargs)
  except USER_ERRORS as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def print_report(paths, tool: str):
  """Prints a report's markdown (`paths['md']`), then `<tool>: <every written path>`."""
  with open(paths['md']) as f:
    print(f.read())
  print(f'{tool}: {", ".join(paths.values())}')


def quiet_logs():
  """absl INFO lines (jax backend probing, orbax per-step bookkeeping) off unless the user
  passed --verbosity; warnings and our own output stay."""
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def check_new_path(path: str, field: str, suffixes=None, exist_ok: bool = False) -> str:
  """The absolute form of `path`, or ValueError naming `field`, before any work is done.

  A path to be written must not exist (unless `exist_ok`; never as a directory when a file is
  wanted), end in one of `suffixes` when given, and have a writable directory above it (the
  nearest existing ancestor must be a directory we can write into, so creating the rest works).
  """
  if not path:
    raise ValueError(f'{field}: empty path')
  path = os.path.abspath(os.path.expanduser(path))
  if suffixes is not None:
    if os.path.isdir(path):
      raise ValueError(f'{field}: {path} is a directory; give a file path ending in '
                       f'{" or ".join(suffixes)}')
    if not path.lower().endswith(tuple(suffixes)):
      raise ValueError(f'{field}: {path} must end in {" or ".join(suffixes)}')
  if os.path.exists(path) and not exist_ok:
    raise ValueError(f'{field}: {path} already exists; choose a new path')
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f'{field}: cannot create {path}: {parent} is a file, not a directory')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f'{field}: cannot write under {parent} (permission denied)')
  return path


_CONFIG_FLAGS = []   # names defined by define_config_file, loaded eagerly by run()

# XLA's compiled programs persist here between runs (JAX's persistent compilation cache), so a
# second `generate.py` / `train.py` / `evaluate.py` of the same shapes skips compilation.
# `--compilation_cache=` (empty) turns it off; JAX's own JAX_COMPILATION_CACHE_DIR sets the
# default (the test suite points it at a per-run folder).
CACHE_MIN_COMPILE_SECONDS = 0.0


def default_compilation_cache() -> str:
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.environ.get('JAX_COMPILATION_CACHE_DIR') or os.path.join(base, 'shotstream_jax',
                                                                     'xla')


def enable_compilation_cache(path: str):
  """Point JAX's persistent compilation cache at `path` ('' turns it off). Call before the
  first compilation; a folder that cannot be created raises OSError naming the flag. Compiles
  under CACHE_MIN_COMPILE_SECONDS are not stored unless JAX's own variable says otherwise."""
  import jax  # pylint: disable=g-import-not-at-top
  if not path:
    jax.config.update('jax_compilation_cache_dir', None)
    return None
  path = os.path.abspath(os.path.expanduser(path))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise OSError(f'--compilation_cache: cannot create {path}: {e.strerror}') from None
  jax.config.update('jax_compilation_cache_dir', path)
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', CACHE_MIN_COMPILE_SECONDS)
  return path


def _fail(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _last_line(text: str) -> str:
  """The exception line at the end of a message that embeds a traceback, class name dropped."""
  lines = [l for l in str(text).strip().splitlines() if l.strip()]
  last = lines[-1].strip() if lines else ''
  head, sep, rest = last.partition(': ')
  return rest if sep and head.replace('.', '').isidentifier() and head[0].isupper() else last


def _unknown_field(name: str, e: BaseException):
  given = [a.split('=')[0] for a in sys.argv[1:] if a.startswith(f'--{name}.')]
  _fail(f'{", ".join(given) or "--" + name}: unknown config field '
        f'{_last_line(e).strip(chr(34))}; see the config file for the accepted fields')


def define_config_file(name: str, default: str, help_string: str):
  """config_flags.DEFINE_config_file, with an unknown `--<name>.field=` override (which
  ml_collections may resolve while the flag is defined, at import) as one line."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  try:
    holder = config_flags.DEFINE_config_file(name, default, help_string)
  except (AttributeError, KeyError) as e:
    _unknown_field(name, e)
  _CONFIG_FLAGS.append(name)
  return holder


def run(main):
  """absl's app.run, with flag and config errors (unknown preset or field, missing config file,
  a value of the wrong type) as `error: <flag>: <what>` and exit 2 before main runs."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  if 'compilation_cache' not in flags.FLAGS:
    flags.DEFINE_string('compilation_cache', default_compilation_cache(),
                        'Persistent XLA compilation cache folder (a second run of the same '
                        'shapes skips compiling); empty = off; default: '
                        '$JAX_COMPILATION_CACHE_DIR, else ~/.cache/shotstream_jax/xla.')

  def parse(argv):
    try:
      rest = flags.FLAGS(argv)
    except flags.Error as e:
      first = str(e).splitlines()[0].rstrip(':')
      flag = first.split(': ')[0].replace('flag ', '') if first.startswith('flag ') else ''
      what = _last_line(e)
      what = what.split(': ', 1)[-1] if what.startswith('flag ') else what
      _fail(f'{flag}: {what}' if flag else what)
    except (AttributeError, KeyError) as e:     # an override of a field the config lacks
      _unknown_field(_CONFIG_FLAGS[0] if len(_CONFIG_FLAGS) == 1 else 'config', e)
    for name in _CONFIG_FLAGS:        # config files load lazily; fail here, not mid-run
      try:
        flags.FLAGS[name].value.keys()
      except (OSError, AttributeError, ValueError) as e:
        _fail(f'--{name}: {_last_line(e)}')
    try:
      enable_compilation_cache(flags.FLAGS.compilation_cache)
    except OSError as e:
      _fail(str(e))
    return rest
  app.run(main, flags_parser=parse)


# ----------------------------------------------------------------------------- model flags

MODEL_FLAGS = ('ckpt', 'vae', 'text_encoder', 'tokenizer')


def define_model_flags():
  """--ckpt / --vae / --text_encoder / --tokenizer, shared by every launcher that runs a model
  (generate.py, studio.py); returns {name: holder} in MODEL_FLAGS order for `build_pipeline`."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  helps = {
      'ckpt': "DiT weights (.pt/.safetensors, orbax dir, or a training --workdir: its "
              "generator); absent: the preset's shipped model (storyworld), else random weights. "
              'With shipped weights, --ckpt alone replaces only the DiT; at `tiny`, --ckpt alone '
              'runs with the embedded random VAE and text encoder.',
      'vae': 'VAE weights (Wan2.1_VAE.pth or orbax dir).',
      'text_encoder': 'umT5 weights (.pth or orbax dir).',
      'tokenizer': 'google/umt5-xxl tokenizer folder.'}
  return {name: flags.DEFINE_string(name, None, helps[name]) for name in MODEL_FLAGS}


def build_pipeline(config, ckpt=None, vae=None, text_encoder=None, tokenizer=None):
  """The pipeline the model flags ask for: the preset's shipped model with any given file
  replacing its own, else the published files (all four), else random weights (a note on
  stderr says which)."""
  # pylint: disable=g-import-not-at-top
  from shotstream_jax import embedded
  from shotstream_jax import pipeline as pipeline_lib
  given = {'--ckpt': ckpt, '--vae': vae, '--text_encoder': text_encoder, '--tokenizer': tokenizer}
  shipped = embedded.model_dir(config)
  if shipped:   # flags given replace the shipped files one by one
    files = embedded.paths(shipped)
    for flag, key in (('--ckpt', 'dit_path'), ('--vae', 'vae_path'),
                      ('--text_encoder', 'text_path'), ('--tokenizer', 'tokenizer_path')):
      files[key] = given[flag] or files[key]
    if not any(given.values()):
      print(f'note: the shipped {config.preset!r} model ({shipped})', file=sys.stderr)
    return pipeline_lib.ShotStreamPipeline.load(config, **files)
  if not any(given.values()):
    print(f'note: no --ckpt: random weights of the {config.preset!r} preset; the video is '
          'noise-like by design', file=sys.stderr)
    return pipeline_lib.ShotStreamPipeline.from_random(config, config.seed)
  missing = [k for k, v in given.items() if not v]
  if ckpt and len(missing) == 3 and config.preset == 'tiny':
    print(f'note: --ckpt alone: the embedded VAE and text encoder of the tiny preset (seed '
          f'{config.seed}), as tiny StoryWorld training encodes with', file=sys.stderr)
    return pipeline_lib.ShotStreamPipeline.with_embedded_encoders(config, ckpt, config.seed)
  if missing:
    raise ValueError(f'{missing[0]}: required with --ckpt (also needed: {", ".join(missing)})')
  return pipeline_lib.ShotStreamPipeline.load(config, ckpt, vae, text_encoder, tokenizer)
