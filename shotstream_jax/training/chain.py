"""The whole method from nothing: StoryWorld pixels -> stage 0 (VAE) -> text -> precompute ->
stages 1-4 -> the shipped model -> evaluation. `launch/reproduce.py` is its command line.

    times = run_chain(root='out/storyworld', preset='storyworld')

Every step writes into its own folder under `root` and is skipped once its result exists, so
rerunning after a kill continues where it stopped (the training stages resume inside a step
from their last complete checkpoint). `root/chain.json` records each step's wall time and
`root/overrides.json` the config overrides the chain ran with (below): later runs and readers
of the root (the harness, the teacher probe) start from them, so a chain trained at another
size is evaluated at that size.

    data/        StoryWorld pixels (tfds, array_record)
    vae/         stage 0 workdir
    vae_decoder/ stage 0b: its decoder trained on   export/vae.safetensors  (+ .stats.json)
    export/tokenizer/, export/text.safetensors   SentencePiece vocabulary, frozen umT5
    precomputed/{train,heldout}/                 latents, context candidates, umT5 rows
    teacher_image/                               stage 1a: the teacher pre-trained on images
    teacher/ ode/ dmd_intra/ dmd_inter/          stages 1-4 workdirs (stage 1 starts from 1a)
    model/       the trained model directory (shotstream_jax/embedded.py layout)

`overrides` maps a step name to dotted config fields, e.g. {'teacher': {'train.num_steps': 5}};
two more keys apply to every step: 'data' (fields of `data.storyworld`, e.g. num_train) and
'model' (fields of the model config, e.g. model.num_layers; also the shipped model's config).
`steps` limits the run to some steps (their inputs must exist). `carry` copies the outputs of
an earlier run in first (e.g. a stage-0 export: stage 0 is then done).
"""

import importlib
import json
import os
import shutil
import time
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np
from safetensors import numpy as st_numpy

from shotstream_jax.convert import umt5 as umt5_convert
from shotstream_jax.data import precompute as pc
from shotstream_jax.data import prompts as prompts_lib
from shotstream_jax import embedded
from shotstream_jax import loading
from shotstream_jax.models import random_init
from shotstream_jax.models import tokenizer as tokenizer_lib
from shotstream_jax.training import inputs as inputs_lib
from shotstream_jax.training import train_loop
from shotstream_jax.training import vae_stage

STEPS = ('vae', 'vae_decoder', 'vae_export', 'text', 'precompute', 'teacher_image', 'teacher',
         'ode', 'dmd_intra', 'dmd_inter', 'model')
TRAIN_CONFIGS = {'vae': 'vae', 'vae_decoder': 'vae_decoder', 'teacher_image': 'teacher_image',
                 'teacher': 'teacher', 'ode': 'ode_init', 'dmd_intra': 'dmd_intra',
                 'dmd_inter': 'dmd_inter'}   # configs/train/<name>.py
TIMES = 'chain.json'
OVERRIDES = 'overrides.json'
# Override keys that shape the data or the networks: every step of a root must share them.
SHARED = ('data', 'model')
# Every digit, so shot prompts past the training stories' shot counts ("shot7:") tokenise.
DIGITS_LINE = ' '.join(f'shot{i}:' for i in range(10))


class Chain:
  """Paths and configs of one chain under `root` (see module docstring)."""

  def __init__(self, root: str, preset: str = 'storyworld',
               overrides: Optional[Dict[str, dict]] = None):
    self.root = os.path.abspath(root)
    self.preset = preset
    self.overrides = merge_overrides(read_overrides(self.root), overrides or {}, self.root)
    # Only training steps have a config to override (text, precompute, ... read data / model).
    unknown = sorted(set(self.overrides) - set(TRAIN_CONFIGS) - set(SHARED))
    if unknown:
      raise ValueError(f'overrides: no config for step(s) {unknown}; accepted: data, model, '
                       f'{", ".join(TRAIN_CONFIGS)}')
    self.data_dir = self.path('data')
    self.vae_file = self.path('export', 'vae.safetensors')
    # Teachers as files: only ever carried in (launch/export.py of a finished workdir); when
    # present, their stage is done and later stages start from the file.
    self.teacher_image_file = self.path('export', 'teacher_image.safetensors')
    self.teacher_file = self.path('export', 'teacher.safetensors')
    self.text_file = self.path('export', 'text.safetensors')
    self.tokenizer_dir = self.path('export', 'tokenizer')
    self.train_dir = self.path('precomputed', 'train')
    self.heldout_dir = self.path('precomputed', 'heldout')
    self.model_dir = self.path('model')

  def path(self, *parts) -> str:
    return os.path.join(self.root, *parts)

  def workdir(self, step: str) -> str:
    return self.path(step)

  def source(self, step: str) -> str:
    """Where later stages load `step`'s network from: its carried export file when there is
    one (teacher_image, teacher), else its workdir."""
    product = self._products().get(step)
    return product if product and os.path.exists(product) else self.workdir(step)

  def _products(self) -> Dict[str, str]:
    """Training steps whose product may be a file (stage 0's export, carried teachers)."""
    return {'vae': self.vae_file, 'vae_decoder': self.vae_file,
            'teacher_image': self.teacher_image_file, 'teacher': self.teacher_file}

  def config(self, step: str):
    """The training config of `step`, wired to this chain's data and earlier stages."""
    c = importlib.import_module(f'configs.train.{TRAIN_CONFIGS[step]}').get_config(self.preset)
    c.data.dir = self.data_dir
    c.train.progress = True
    if step == 'vae_decoder':
      c.vae_train.init_from = self.workdir('vae')
    elif step != 'vae':
      c.data.source = 'precomputed'
      c.data.train_dir, c.data.heldout_dir = self.train_dir, self.heldout_dir
    if step == 'teacher':
      c.teacher.init_from = self.source('teacher_image')
    elif step == 'ode':
      c.ode.init_from = self.source('teacher')
    elif step == 'dmd_intra':
      c.dmd.teacher_init = self.source('teacher')
      c.dmd.generator_init = self.workdir('ode')
    elif step == 'dmd_inter':
      c.dmd.teacher_init = self.source('teacher')
      c.dmd.generator_init = self.workdir('dmd_intra')
      c.dmd.critic_init = self.workdir('dmd_intra')
      c.dmd.vae_path = self.vae_file
    apply_overrides(c, self.overrides.get('model', {}))
    apply_overrides(c.data.storyworld, self.overrides.get('data', {}))
    return apply_overrides(c, self.overrides.get(step, {}))

  def model_config(self):
    """The model config (configs/shotstream.py) the chain's networks run under."""
    from configs import shotstream  # pylint: disable=g-import-not-at-top
    return apply_overrides(shotstream.get_config(self.preset), self.overrides.get('model', {}))

  # ---------------------------------------------------------------- steps

  def done(self, step: str) -> bool:
    # Training steps whose product is a file (carried in, or stage 0's export) are done with it.
    product = self._products().get(step)
    if product and os.path.exists(product):
      return True
    if step in TRAIN_CONFIGS:
      return _finished(self.workdir(step), self.config(step).train.num_steps)
    marker = {'vae_export': self.vae_file, 'text': self.text_file,
              'precompute': os.path.join(self.heldout_dir, pc.META_FILE),
              'model': os.path.join(self.model_dir, 'manifest.json')}[step]
    if step == 'precompute':
      return all(inputs_lib.precomputed_complete(d) for d in (self.train_dir, self.heldout_dir))
    return os.path.exists(marker)

  def run(self, step: str):
    if step in TRAIN_CONFIGS:
      train_loop.train(self.config(step), self.workdir(step))
    elif step == 'vae_export':
      c = self.config('vae_decoder')
      vae_stage.export_vae(c, self.workdir('vae_decoder'), self.vae_file, c.vae_train.stat_clips)
    elif step == 'text':
      self._text()
    elif step == 'precompute':
      self._precompute()
    elif step == 'model':
      self._model()
    else:
      raise ValueError(f'step: unknown {step!r}; accepted: {", ".join(STEPS)}')

  def _text(self):
    """A SentencePiece vocabulary of the training prompts, and the frozen random umT5."""
    c = self.config('teacher')
    sources, _ = inputs_lib.storyworld_sources(c.data.storyworld, self.data_dir)
    lines = [DIGITS_LINE]
    for ex in sources['train']:
      g = _text(ex['global_caption'])
      lines += [prompts_lib.shot_prompt(g, i, _text(cap))
                for i, cap in enumerate(ex['shot_captions'])]
    tokenizer_lib.train_sentencepiece(lines, self.tokenizer_dir, c.text.vocab_size)
    tok = tokenizer_lib.UMT5Tokenizer(self.tokenizer_dir, c.text.text_len)
    pieces = tok._sp.get_piece_size()  # pylint: disable=protected-access
    if pieces != c.text.vocab_size:
      raise ValueError(f'text.vocab_size: {c.text.vocab_size}, but the StoryWorld prompts '
                       f'support {pieces} pieces; set text.vocab_size={pieces}')
    params = random_init.embedded_text(c.text, c.seed)
    tmp = self.text_file + '.tmp'
    st_numpy.save_file(umt5_convert.umt5_to_torch(params, c.text), tmp)
    os.replace(tmp, self.text_file)

  def _precompute(self):
    c = self.config('teacher')
    encoders = pc.build_encoders(c, self.vae_file, self.text_file, self.tokenizer_dir)
    sources, name = inputs_lib.storyworld_sources(c.data.storyworld, self.data_dir)
    for split, out in (('train', self.train_dir), ('heldout', self.heldout_dir)):
      pc.precompute(sources[split], out, encoders, context_frames=c.model.context_frames,
                    source_name=f'storyworld/{name}:{split}')

  def _model(self):
    config = self.model_config()
    dit = loading.load_network_params(self.workdir('dmd_inter'), 'generator', config.model,
                                      field='dmd_inter')
    text = umt5_convert.load_umt5(self.text_file, config.text)
    manifest = {'made_by': 'launch/reproduce.py', 'preset': self.preset,
                'steps': read_times(self.root), 'overrides': self.overrides}
    embedded.write_model(self.model_dir, config, jax.device_get(dit), self.vae_file,
                         jax.device_get(text), self.tokenizer_dir, manifest)


def carry_in(carry: str, root: str, log=print) -> List[str]:
  """Copies every file under `carry` (a folder laid out like `root`, e.g. holding
  export/vae.safetensors and its .stats.json from an earlier run) into `root` where `root` has
  none yet; returns the copied paths, relative. Steps whose outputs arrive this way are skipped.

  Why: stage 0 alone is ~35 minutes on the 2-core CPU; a trained step carried between
  sessions (or machines) lets the next one spend its time on the stages still to train.
  """
  if not os.path.isdir(carry):
    raise FileNotFoundError(f'--carry: no folder at {carry}')
  copied = []
  for folder, _, files in os.walk(carry):
    for name in sorted(files):
      rel = os.path.relpath(os.path.join(folder, name), carry)
      dst = os.path.join(root, rel)
      if not os.path.exists(dst):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(os.path.join(carry, rel), dst + '.tmp')
        os.replace(dst + '.tmp', dst)
        copied.append(rel)
  if copied:
    log(f'chain: carried in from {carry}: {", ".join(sorted(copied))}')
  return sorted(copied)


def run_chain(root: str, preset: str = 'storyworld', overrides=None,
              steps: Optional[Sequence[str]] = None, log=print,
              carry: str = '') -> Dict[str, float]:
  """Runs the chain's steps in order (skipping finished ones); returns {step: seconds}.
  `carry`: a folder of earlier outputs copied in first (`carry_in`)."""
  chain = Chain(root, preset, overrides)
  todo = list(steps or STEPS)
  bad = [s for s in todo if s not in STEPS]
  if bad:
    raise ValueError(f'steps: unknown {bad}; accepted: {", ".join(STEPS)}')
  for step in TRAIN_CONFIGS:   # every override must apply before the root records it
    chain.config(step)
  os.makedirs(chain.root, exist_ok=True)
  _write_json(chain.root, OVERRIDES, chain.overrides)
  if carry:
    carry_in(carry, chain.root, log)
  times = read_times(chain.root)
  for step in STEPS:
    if step not in todo:
      continue
    if chain.done(step):
      log(f'chain: {step} done ({times.get(step, {}).get("seconds", 0):.0f}s), skipped')
      continue
    log(f'chain: {step} ...')
    start = time.time()
    chain.run(step)
    seconds = time.time() - start
    prev = times.get(step, {}).get('seconds', 0.0)   # earlier, killed attempts count too
    times[step] = {'seconds': round(prev + seconds, 1), 'finished': time.strftime('%F %T')}
    _write_json(chain.root, TIMES, times)
    log(f'chain: {step} finished in {seconds:.0f}s')
  return {k: v['seconds'] for k, v in times.items()}


def read_times(root: str) -> dict:
  return _read_json(root, TIMES, missing={})


def read_overrides(root: str) -> Optional[dict]:
  """The overrides an earlier run recorded under `root`; None when no run recorded any."""
  return _read_json(root, OVERRIDES, missing=None)


def merge_overrides(recorded: Optional[dict], given: dict, root: str = '') -> dict:
  """`given` on top of `recorded` (None: nothing recorded), field by field. The shared keys
  (data, model) may be repeated but never changed, nor added to a root that ran without them:
  networks trained under one model config cannot be continued or loaded under another."""
  out = {step: dict(fields) for step, fields in (recorded or {}).items()}
  for step, fields in given.items():
    for field, value in fields.items():
      if recorded is not None and step in SHARED:
        fields_then = recorded.get(step, {})
        if field not in fields_then or fields_then[field] != value:
          then = repr(fields_then[field]) if field in fields_then else 'the preset default'
          raise ValueError(f'--set {step}:{field}={value!r}: {root or "the root"} was run with '
                           f'{then} ({OVERRIDES}); data and model overrides cannot change '
                           'within a root, use a new --root')
      out.setdefault(step, {})[field] = value
  return out


def _read_json(root, name, missing):
  path = os.path.join(root, name)
  if not os.path.exists(path):
    return missing
  with open(path) as f:
    return json.load(f)


def _write_json(root, name, value):
  tmp = os.path.join(root, name + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, os.path.join(root, name))


def parse_overrides(items):
  """['teacher:train.num_steps=5', ...] -> {'teacher': {'train.num_steps': 5}}."""
  out = {}
  for item in items:
    step, sep, assignment = item.partition(':')
    field, eq, value = assignment.partition('=')
    if not sep or not eq or not field:
      raise ValueError(f'--set: {item!r}; expected step:dotted.field=value')
    try:
      value = json.loads(value)
    except json.JSONDecodeError:
      pass   # a plain string
    out.setdefault(step, {})[field] = value
  return out


def apply_overrides(config, overrides: dict):
  """config with dotted fields set, e.g. {'train.num_steps': 5}; unknown fields raise."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      if p not in node:
        raise ValueError(f'override {key}: no field {p!r}')
      node = node[p]
    if leaf not in node:
      raise ValueError(f'override {key}: no field {leaf!r}')
    if isinstance(node[leaf], tuple) and isinstance(value, list):
      value = tuple(value)   # JSON has no tuples: --set=model:model.patch_size=[1,2,2]
    try:
      node[leaf] = value
    except TypeError as e:
      raise ValueError(f'override {key}: {value!r} is not of type {type(node[leaf]).__name__} '
                       f'(the field holds {node[leaf]!r}; values are JSON)') from e
  return config


def _finished(workdir: str, num_steps: int) -> bool:
  ckpt = os.path.join(workdir, loading.CHECKPOINTS)
  if not os.path.isdir(ckpt):
    return False
  steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()]
  return bool(steps) and max(steps) >= num_steps


def _text(x) -> str:
  if isinstance(x, np.ndarray):
    x = x.item()
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)
