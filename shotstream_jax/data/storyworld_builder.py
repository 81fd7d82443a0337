"""tfds builder for StoryWorld (storyworld.py): array_record splits 'train' and 'heldout', no TF.

    cfg = configs.data.get_config('tiny').storyworld
    builder = StoryWorld(cfg=cfg, data_dir=...)
    builder.download_and_prepare()
    sources = builder.as_data_source()      # {'train': ..., 'heldout': ...}

Examples carry the same fields as the reference builder (frames, shot_index, shot_captions,
global_caption) plus the ground truth: per-shot `framing` and `motion` indices and the story's
`identity` attributes (storyworld.make_example). The config picks the sizes and the seed; its
values name the builder config, so different sizes never share a directory.
"""

import numpy as np
import tensorflow_datasets as tfds

from shotstream_jax.data import storyworld as sw


class StoryWorld(tfds.core.GeneratorBasedBuilder):
  """Procedural multi-shot stories with known ground truth."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  code_path = None   # no download checksums; tfds' lookup needs a package absent on Python >= 3.9

  def __init__(self, *, cfg, **kwargs):
    sw.check_sizes(cfg.height, cfg.width, cfg.frames_per_shot)
    if not 1 <= cfg.min_shots <= cfg.max_shots:
      raise ValueError(f'min_shots/max_shots: need 1 <= min <= max, got '
                       f'{cfg.min_shots}/{cfg.max_shots}')
    if cfg.num_train < 1 or cfg.num_heldout < 1:
      raise ValueError(f'num_train/num_heldout: need >= 1, got {cfg.num_train}/{cfg.num_heldout}')
    self._cfg = cfg
    kwargs.setdefault('file_format', 'array_record')
    name = (f'{cfg.height}x{cfg.width}_f{cfg.frames_per_shot}_s{cfg.min_shots}-{cfg.max_shots}'
            f'_n{cfg.num_train}-{cfg.num_heldout}_seed{cfg.seed}_ss{cfg.supersample}')
    super().__init__(config=tfds.core.BuilderConfig(name=name), **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    c = self._cfg
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split('\n')[0],
        features=tfds.features.FeaturesDict({
            'frames': tfds.features.Tensor(shape=(None, c.height, c.width, 3), dtype=np.uint8),
            'shot_index': tfds.features.Tensor(shape=(None,), dtype=np.int32),
            'shot_captions': tfds.features.Sequence(tfds.features.Text()),
            'global_caption': tfds.features.Text(),
            'framing': tfds.features.Tensor(shape=(None,), dtype=np.int32),
            'motion': tfds.features.Tensor(shape=(None,), dtype=np.int32),
            'identity': tfds.features.Tensor(shape=(7,), dtype=np.int32),
            'story_id': tfds.features.Text(),
        }))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples('train', self._cfg.num_train),
            'heldout': self._generate_examples('heldout', self._cfg.num_heldout)}

  def _generate_examples(self, split, count):
    c = self._cfg
    for i in range(count):
      yield f'{split}-{i:08d}', sw.make_example(
          c.seed, split, i, c.height, c.width, c.frames_per_shot, (c.min_shots, c.max_shots),
          c.supersample)
