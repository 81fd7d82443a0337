r"""Encode a dataset once into VAE-latent + umT5-embedding shards for training.

  python launch/precompute.py --config=configs/shotstream.py:tiny --data=storyworld \
      --data_config=configs/data.py:tiny --tokenizer=path/to/google/umt5-xxl --out=out/sw_tiny

  python launch/precompute.py --config=configs/shotstream.py:wan_1_3b \
      --data=path/to/shotstream_reference/480x832_raw/1.0.0 --split=train \
      --vae=Wan2.1-T2V-1.3B/Wan2.1_VAE.pth \
      --text=Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth \
      --tokenizer=Wan2.1-T2V-1.3B/google/umt5-xxl --out=out/ref_480x832

`--data=storyworld` builds (or reuses) the StoryWorld tfds dataset of `--data_config` under
`--data_dir`; any other value is a prepared tfds array_record dataset folder (the one holding
dataset_info.json, e.g. the reference builder's output). Without `--vae` / `--text` the weights
are random (a smoke run; a warning says so and meta.json records it). Rerunning with the same
flags finishes what is missing and skips completed shards. On several hosts, run it on each
(with --distributed); process p writes the shards with index % process_count == p.
"""

import os

from absl import flags
from absl import logging
import jax

from shotstream_jax import cli
from shotstream_jax.data import precompute as pc

_CONFIG = cli.define_config_file('config', 'configs/shotstream.py:tiny',
                                 'Model config: configs/shotstream.py:<preset>.')
_DATA_CONFIG = cli.define_config_file('data_config', 'configs/data.py:tiny',
                                      'Data config (StoryWorld sizes): configs/data.py.')
_DATA = flags.DEFINE_string('data', 'storyworld',
                            "'storyworld', or a prepared tfds array_record dataset folder.")
_SPLIT = flags.DEFINE_string('split', 'train', 'Split of the dataset to encode.')
_DATA_DIR = flags.DEFINE_string('data_dir', os.path.join('~', 'tensorflow_datasets'),
                                'tfds data_dir where StoryWorld is built (--data=storyworld).')
_OUT = flags.DEFINE_string('out', None, 'Output folder for the shards (created).')
_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'The google/umt5-xxl tokenizer folder.')
_VAE = flags.DEFINE_string('vae', None, 'VAE checkpoint (.pth/.safetensors or our orbax dir).')
_TEXT = flags.DEFINE_string('text', None, 'umT5 checkpoint (.pth/.safetensors or orbax dir).')
_PER_SHARD = flags.DEFINE_integer('examples_per_shard', 64, 'Examples per array_record shard.')
_LATENT_DTYPE = flags.DEFINE_enum('latent_dtype', 'float32', list(pc.LATENT_DTYPES),
                                  'Stored dtype of the latents.')
_MAX_EXAMPLES = flags.DEFINE_integer('max_examples', 0, 'Encode only the first N (0: all).')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize().')
flags.mark_flag_as_required('out')


class _Head:
  """The first `n` examples of a source (for --max_examples)."""

  def __init__(self, source, n):
    self.source, self.n = source, min(n, len(source))

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.source[i]


def check_data_flag(data: str):
  if data != 'storyworld' and not os.path.isfile(os.path.join(data, 'dataset_info.json')):
    raise FileNotFoundError(f"data: {data!r} is neither 'storyworld' nor a prepared tfds "
                            'dataset folder (no dataset_info.json in it)')


def load_source(data: str, split: str, data_config, data_dir: str):
  """(random-access source, a name for meta.json) for the --data flag."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if data == 'storyworld':
    from shotstream_jax.data import storyworld_builder  # pylint: disable=g-import-not-at-top
    builder = storyworld_builder.StoryWorld(cfg=data_config.storyworld,
                                            data_dir=os.path.expanduser(data_dir))
    builder.download_and_prepare()
  else:
    check_data_flag(data)
    builder = tfds.builder_from_directory(data)
  sources = builder.as_data_source()
  if split not in sources:
    raise ValueError(f'split: {split!r} not in {data}; accepted: {", ".join(sorted(sources))}')
  return sources[split], f'{builder.name}/{builder.builder_config.name}:{split}'


def run(config, data_config):
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  if _MAX_EXAMPLES.value < 0:
    raise ValueError(f'max_examples: must be >= 0, got {_MAX_EXAMPLES.value}')
  check_data_flag(_DATA.value)       # before the encoders load
  cli.check_new_path(_OUT.value, '--out', exist_ok=True)   # shards resume into an existing one
  encoders = pc.build_encoders(config, _VAE.value, _TEXT.value, _TOKENIZER.value, config.seed)
  source, name = load_source(_DATA.value, _SPLIT.value, data_config, _DATA_DIR.value)
  if _MAX_EXAMPLES.value:
    source = _Head(source, _MAX_EXAMPLES.value)
    name += f'[:{_MAX_EXAMPLES.value}]'
  random = [k for k, v in encoders.weights.items() if v.startswith('random')]
  if random:
    logging.warning('*** %s: RANDOM WEIGHTS (no checkpoint given); the output is for smoke '
                    'tests only ***', ', '.join(random))
  return pc.precompute(source, _OUT.value, encoders,
                       context_frames=config.model.context_frames,
                       examples_per_shard=_PER_SHARD.value, latent_dtype=_LATENT_DTYPE.value,
                       source_name=name), random


def main(argv):
  del argv
  cli.quiet_logs()
  result, random = cli.exit_on_user_error(run, _CONFIG.value, _DATA_CONFIG.value)
  print(f'precompute: {result.num_examples} examples in {result.num_shards} shards at '
        f'{result.out_dir}; this process wrote {len(result.processed)} shard(s), found '
        f'{len(result.skipped)} already complete'
        + (f'; RANDOM weights for {", ".join(random)}' if random else ''))


if __name__ == '__main__':
  cli.run(main)
