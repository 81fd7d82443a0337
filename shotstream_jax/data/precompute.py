"""Encode a multi-shot dataset once (VAE latents, umT5 embeddings) into array_record shards.

Training reads these shards, never the pixels: umT5-XXL and the VAE cost far more per example
than a training step (DESIGN 3, Data).

    encoders = build_encoders(config, tokenizer_path='google/umt5-xxl')  # random weights w/o paths
    result = precompute(source, 'out/', encoders, context_frames=6)
    ds = PrecomputedSource('out/')                         # len / getitem: a grain data source
    ex = ds[0]; neg = ds.negative()                        # dicts of numpy arrays

One record per example (`source[i]`: a record of the reference builder or StoryWorld), a msgpack
dict (flax.serialization) with, for S shots:
  id, global_caption, shot_captions [S], prompts [S]   strings; prompts = shot_prompt(global, i, c)
  shot_frames [S]            pixel frames of each shot in the example (gaps already dropped)
  latents [L, h, w, z]       each shot's first 4k+1 frames encoded as one clip, shots back to back
  shot_latent_frames [S]     latent frames per shot (sum L); latent_shot [L] the shot of each
  ctx_latents [C, h, w, z]   context candidates, each pixel frame encoded alone as a 1-frame clip
  ctx_frame_index [C]        index of that frame among the example's frames (all shots concatenated)
  ctx_shot [C]               its shot
  text_emb [sum(text_lengths), d], text_lengths [S]   umT5 rows up to each prompt's real length
  + the source's labels when present (framing, motion, identity, frame_index, frame_ranges, ...).

Context candidates are exactly the frames the reference rule (DESIGN 4.4) can pick for any target
shot of the example: with P earlier shots each gets `budget // P` frames (the remainder to the last
shots), at round(linspace(first, last, count)) inside the shot, over the shot's full frames. So
training applies that rule to `shot_frames` and looks the indices up in `ctx_frame_index`; a
frame chosen for several targets is stored once. Text is stored at its real length (the encoder
zeroes every row past it, so padding back with zeros is exact) and the reader pads it back to
[S, text_len, d]; that saves 5-10x for umT5-XXL's 512 x 4096 rows.

Sharding and resuming: examples go to shards of `examples_per_shard` in order; process p of n
writes the shards with `index % n == p`. A shard is written to `<name>.tmp` and renamed when
complete, so a rerun skips finished shards and a killed run leaves no half shard that looks
complete. `meta.json` records what the shards were made with; a rerun with other settings is
refused rather than mixed in.
"""

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Dict, List, Optional

from array_record.python import array_record_module
from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from shotstream_jax import context as context_lib
from shotstream_jax import loading
from shotstream_jax import text as text_lib
from shotstream_jax.data import loader as loader_lib
from shotstream_jax.data import prompts as prompts_lib
from shotstream_jax.io import video as video_io
from shotstream_jax.models import random_init
from shotstream_jax.models import tokenizer as tokenizer_lib
from shotstream_jax.models import vae as vae_lib

FORMAT_VERSION = 1
META_FILE = 'meta.json'
NEGATIVE_FILE = 'negative.msgpack'
SHARD_SUFFIX = '.array_record'
TMP_SUFFIX = '.tmp'
LATENT_DTYPES = ('float32', 'bfloat16')
# Wan2.1's default negative prompt, used by the reference for CFG (ODE init, real score).
NEGATIVE_PROMPT = ('色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，'
                   '低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，'
                   '毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走')
# Source fields copied into the record when present (labels for judges and bookkeeping).
PASSTHROUGH = ('framing', 'motion', 'identity', 'frame_index', 'frame_ranges', 'video_path',
               'json_path', 'line', 'story_id')


# ----------------------------------------------------------------------------- encoders


@dataclasses.dataclass
class Encoders:
  """The VAE and the cached prompt encoder, with jitted per-shape encode functions."""
  vae: vae_lib.WanVAE
  vae_params: Any
  prompt_encoder: text_lib.PromptEncoder
  weights: Dict[str, str] = dataclasses.field(default_factory=dict)  # what was loaded, for meta

  def __post_init__(self):
    self.encode_clip = jax.jit(functools.partial(vae_lib.encode, self.vae))
    self.encode_images = jax.jit(functools.partial(vae_lib.encode_image, self.vae))

  @property
  def tokenizer(self):
    return self.prompt_encoder.tokenizer

  def text(self, prompt: str) -> np.ndarray:
    """[real length, d] umT5 rows of one prompt (rows past the length are zeros and dropped)."""
    length = int(self.tokenizer([prompt])[1][0])
    return np.asarray(self.prompt_encoder(prompt)[0, :length])


def build_encoders(config, vae_path: Optional[str] = None, text_path: Optional[str] = None,
                   tokenizer_path: Optional[str] = None, seed: int = 0) -> Encoders:
  """VAE + umT5 + tokenizer of `config` (configs/shotstream.py); random weights where no path.

  Random weights are for tests and smoke runs; they are logged as warnings and recorded in the
  output's meta.json.
  """
  if tokenizer_path:
    tok = tokenizer_lib.UMT5Tokenizer(tokenizer_path, config.text.text_len)
    weights = {'tokenizer': os.path.abspath(tokenizer_path)}
  elif config.preset == 'tiny':    # tiny's embedded tokenizer, as generation uses at tiny
    tok = tokenizer_lib.HashTokenizer(config.text.text_len, config.text.vocab_size)
    weights = {'tokenizer': 'embedded(hash)'}
  else:
    raise ValueError(f'tokenizer: required at preset {config.preset!r}; pass the tokenizer '
                     'folder (spiece.model or tokenizer.json: google/umt5-xxl for wan_1_3b, '
                     '<chain root>/export/tokenizer for storyworld)')

  def params(what, path, load, embedded, meaning):
    if path:
      weights[what] = os.path.abspath(path)
      return load(path, config[what], what)
    logging.warning('%s: no checkpoint given: RANDOM weights (seed %d); %s are meaningless for '
                    'training a real model', what, seed, meaning)
    weights[what] = f'embedded(seed={seed})'
    return embedded(config[what], seed)

  vae = vae_lib.WanVAE(config.vae)
  vae_params = params('vae', vae_path, loading.load_vae, random_init.embedded_vae, 'latents')
  text_params = params('text', text_path, loading.load_text, random_init.embedded_text,
                       'embeddings')
  return Encoders(vae, vae_params, text_lib.PromptEncoder(text_params, config.text, tok), weights)


# ----------------------------------------------------------------------------- one example


def _text(x) -> str:
  if isinstance(x, np.ndarray):
    x = x.item()
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def example_id(ex: dict, index: int) -> str:
  for key in ('story_id', 'video_path'):
    if key in ex:
      value = _text(ex[key])
      return f'{value}:{int(ex["line"])}' if key == 'video_path' and 'line' in ex else value
  return str(index)


def encode_example(ex: dict, encoders: Encoders, context_frames: int, index: int = 0,
                   latent_dtype: str = 'float32') -> Dict[str, Any]:
  """The record of one source example (layout in the module docstring)."""
  eid = example_id(ex, index)
  frames = np.asarray(ex['frames'])
  if frames.dtype != np.uint8 or frames.ndim != 4:
    # mp4 bytes (reference builder with frames_format='mp4')
    from shotstream_jax.data import reference_builder  # pylint: disable=g-import-not-at-top
    frames = reference_builder.decode_frames(ex['frames'])
  shot_index = np.asarray(ex['shot_index'])
  captions = [_text(c) for c in ex['shot_captions']]
  global_caption = _text(ex['global_caption'])
  num_shots = len(captions)
  shot_frames = np.array([(shot_index == s).sum() for s in range(num_shots)], np.int32)
  if len(shot_index) != len(frames) or np.any(np.diff(shot_index) < 0):
    raise ValueError(f'example {eid}: shot_index must be non-decreasing with one entry per frame')
  if num_shots == 0 or np.any(shot_frames == 0) or shot_frames.sum() != len(frames):
    raise ValueError(f'example {eid}: every one of the {num_shots} captioned shots needs frames '
                     f'(frames per shot {shot_frames.tolist()}, {len(frames)} frames in all)')
  out_dtype = jnp.dtype(latent_dtype)
  latents, latent_shot = [], []
  starts = np.concatenate([[0], np.cumsum(shot_frames)[:-1]])
  tf = vae_lib.temporal_factor(encoders.vae.cfg)
  for s in range(num_shots):
    n = (int(shot_frames[s]) - 1) // tf * tf + 1     # the reference keeps the first 4k+1 frames
    clip = video_io.to_unit(frames[starts[s]:starts[s] + n])[None]
    z = np.asarray(encoders.encode_clip(encoders.vae_params, clip)[0])
    latents.append(z)
    latent_shot.append(np.full(len(z), s, np.int32))
  ctx_index = context_lib.context_candidates(shot_frames, context_frames)
  ctx = _encode_frames(encoders, frames[ctx_index], max(context_frames, 1))
  text = [encoders.text(prompts_lib.shot_prompt(global_caption, i, c))
          for i, c in enumerate(captions)]
  record = {
      'id': eid,
      'global_caption': global_caption,
      'shot_captions': captions,
      'prompts': [prompts_lib.shot_prompt(global_caption, i, c) for i, c in enumerate(captions)],
      'shot_frames': shot_frames,
      'latents': np.concatenate(latents).astype(out_dtype),
      'shot_latent_frames': np.array([len(z) for z in latents], np.int32),
      'latent_shot': np.concatenate(latent_shot),
      'ctx_latents': ctx.astype(out_dtype),
      'ctx_frame_index': ctx_index,
      'ctx_shot': shot_index[ctx_index].astype(np.int32),
      'text_emb': np.concatenate(text),
      'text_lengths': np.array([len(t) for t in text], np.int32),
  }
  for key in PASSTHROUGH:
    if key in ex and key not in record:
      value = ex[key]
      record[key] = (_text(value) if isinstance(value, (str, bytes)) or
                     (isinstance(value, np.ndarray) and value.dtype == object) else
                     np.asarray(value))
  return record


def _encode_frames(encoders: Encoders, frames: np.ndarray, group: int) -> np.ndarray:
  """Each frame alone as a 1-frame clip, in fixed-size groups (one compilation)."""
  h, w = frames.shape[1:3]
  f = vae_lib.spatial_factor(encoders.vae.cfg)
  if not len(frames):
    return np.zeros((0, h // f, w // f, encoders.vae.cfg.z_dim), np.float32)
  out = []
  for i in range(0, len(frames), group):
    chunk = frames[i:i + group]
    padded = np.concatenate([chunk, np.zeros((group - len(chunk),) + chunk.shape[1:], np.uint8)])
    z = encoders.encode_images(encoders.vae_params, video_io.to_unit(padded))
    out.append(np.asarray(z[:len(chunk), 0]))
  return np.concatenate(out)


# ----------------------------------------------------------------------------- shards


def shard_name(index: int, count: int) -> str:
  return f'shard-{index:05d}-of-{count:05d}{SHARD_SUFFIX}'


@dataclasses.dataclass
class PrecomputeResult:
  out_dir: str
  num_examples: int
  num_shards: int
  processed: List[int]      # shards written by this call
  skipped: List[int]        # shards of this process found complete


def _write_atomic(path: str, data: bytes):
  tmp = path + TMP_SUFFIX
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def _check_meta(out_dir: str, meta: dict):
  """Write meta.json, or check that an existing one was made with the same settings."""
  path = os.path.join(out_dir, META_FILE)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    for key in sorted(set(old) | set(meta)):
      if old.get(key) != meta.get(key):
        raise ValueError(f'out: {out_dir} holds a precompute made with different settings '
                         f'({key}: {old.get(key)!r} there, {meta.get(key)!r} now); choose a '
                         'new --out or delete it')
    return
  _write_atomic(path, json.dumps(meta, indent=1, ensure_ascii=False).encode())


def precompute(source, out_dir: str, encoders: Encoders, *, context_frames: int = 6,
               examples_per_shard: int = 64, process_index: Optional[int] = None,
               process_count: Optional[int] = None, latent_dtype: str = 'float32',
               source_name: str = '', progress: bool = True) -> PrecomputeResult:
  """Encode `source` (len + getitem of example dicts) into shards under `out_dir`; resumable."""
  process_index, process_count = loader_lib.host_slice(process_index, process_count,
                                                       'process_index/process_count')
  if examples_per_shard < 1:
    raise ValueError(f'examples_per_shard: must be >= 1, got {examples_per_shard}')
  if context_frames < 0:
    raise ValueError(f'context_frames: must be >= 0, got {context_frames}')
  if latent_dtype not in LATENT_DTYPES:
    raise ValueError(f'latent_dtype: {latent_dtype!r}; accepted: {", ".join(LATENT_DTYPES)}')
  num_examples = len(source)
  if num_examples == 0:
    raise ValueError(f'data: the source {source_name or ""} has no examples')
  num_shards = -(-num_examples // examples_per_shard)
  os.makedirs(out_dir, exist_ok=True)
  meta = {
      'format': FORMAT_VERSION, 'source': source_name, 'num_examples': num_examples,
      'examples_per_shard': examples_per_shard, 'num_shards': num_shards,
      'context_frames': context_frames, 'latent_dtype': latent_dtype,
      'vae': {k: v for k, v in encoders.vae.cfg.items()},
      'text_len': encoders.prompt_encoder.cfg.text_len,
      'text_dim': encoders.prompt_encoder.cfg.d_model,
      'weights': encoders.weights, 'negative_prompt': NEGATIVE_PROMPT,
  }
  meta = json.loads(json.dumps(meta))  # tuples -> lists, as they read back
  _check_meta(out_dir, meta)
  if process_index == 0 and not os.path.exists(os.path.join(out_dir, NEGATIVE_FILE)):
    emb = encoders.text(NEGATIVE_PROMPT)
    _write_atomic(os.path.join(out_dir, NEGATIVE_FILE), serialization.msgpack_serialize(
        {'prompt': NEGATIVE_PROMPT, 'text_emb': emb, 'text_length': np.int32(len(emb))}))
  mine = [i for i in range(num_shards) if i % process_count == process_index]
  todo = [i for i in mine
          if not os.path.exists(os.path.join(out_dir, shard_name(i, num_shards)))]
  skipped = [i for i in mine if i not in todo]
  if skipped:
    logging.info('precompute: %d of this process\'s %d shards already complete; skipping them',
                 len(skipped), len(mine))
  total = sum(min(examples_per_shard, num_examples - i * examples_per_shard) for i in todo)
  bar = tqdm.tqdm(total=total, desc='precompute', unit='ex', disable=not progress)
  for i in todo:
    final = os.path.join(out_dir, shard_name(i, num_shards))
    tmp = final + TMP_SUFFIX
    if os.path.exists(tmp):   # left by a killed run: never trusted
      os.remove(tmp)
    writer = array_record_module.ArrayRecordWriter(tmp, 'group_size:1')
    try:
      for j in range(i * examples_per_shard, min((i + 1) * examples_per_shard, num_examples)):
        record = encode_example(source[j], encoders, context_frames, j, latent_dtype)
        writer.write(serialization.msgpack_serialize(record))
        bar.update(1)
    finally:
      writer.close()
    os.replace(tmp, final)
  bar.close()
  return PrecomputeResult(out_dir, num_examples, num_shards, todo, skipped)


def write_shapes_only(out_dir: str, config, num_shots: int) -> str:
  """One all-zero record with the layout and sizes precompute writes for `config` (a training
  config: `num_shots` shots of `sampling.shot_latent_frames` latents at its resolution, the
  context candidates of `model.context_frames`, caption rows of `text.d_model`), in a folder
  PrecomputedSource reads. Why: compiling a training step ahead of time for a chip you do not
  have (shotstream_jax/aot_train.py) needs a stage's batch shapes, and a stage reads its
  batches from precomputed shards; encoding real video at 480p just for shapes would take
  hours. Returns out_dir."""
  if num_shots < 1:
    raise ValueError(f'num_shots: must be >= 1, got {num_shots}')
  latents = config.sampling.shot_latent_frames
  frames = vae_lib.pixel_frames(config.vae, latents)
  factor = vae_lib.spatial_factor(config.vae)
  hw = (config.sampling.height // factor, config.sampling.width // factor)
  z = config.vae.z_dim
  shot_frames = np.full(num_shots, frames, np.int32)
  ctx_index = context_lib.context_candidates(shot_frames, config.model.context_frames)
  frame_shot = np.repeat(np.arange(num_shots, dtype=np.int32), frames)
  record = {
      'id': 'shapes-only', 'global_caption': '', 'shot_captions': [''] * num_shots,
      'prompts': [''] * num_shots, 'shot_frames': shot_frames,
      'latents': np.zeros((num_shots * latents,) + hw + (z,), np.float32),
      'shot_latent_frames': np.full(num_shots, latents, np.int32),
      'latent_shot': np.repeat(np.arange(num_shots, dtype=np.int32), latents),
      'ctx_latents': np.zeros((len(ctx_index),) + hw + (z,), np.float32),
      'ctx_frame_index': ctx_index, 'ctx_shot': frame_shot[ctx_index],
      'text_emb': np.zeros((num_shots, config.text.d_model), np.float32),
      'text_lengths': np.ones(num_shots, np.int32),
  }
  os.makedirs(out_dir, exist_ok=True)
  writer = array_record_module.ArrayRecordWriter(os.path.join(out_dir, shard_name(0, 1)),
                                                 'group_size:1')
  writer.write(serialization.msgpack_serialize(record))
  writer.close()
  meta = {'format': FORMAT_VERSION, 'source': 'shapes-only', 'num_examples': 1,
          'examples_per_shard': 1, 'num_shards': 1,
          'context_frames': config.model.context_frames, 'latent_dtype': 'float32',
          'text_len': config.text.text_len, 'text_dim': config.text.d_model}
  _write_atomic(os.path.join(out_dir, META_FILE), json.dumps(meta, indent=1).encode())
  _write_atomic(os.path.join(out_dir, NEGATIVE_FILE), serialization.msgpack_serialize(
      {'prompt': '', 'text_emb': np.zeros((1, config.text.d_model), np.float32),
       'text_length': np.int32(1)}))
  return out_dir


# ----------------------------------------------------------------------------- reader


class PrecomputedSource:
  """Random access over a finished precompute: `len`, `[i]` -> dict of numpy arrays.

  A grain data source (`grain.MapDataset.source(PrecomputedSource(dir))`). pad_text=True adds
  `text` [S, text_len, d] (zeros past each length, exactly what the encoder returned) in place
  of the packed `text_emb` rows.
  """

  def __init__(self, out_dir: str, pad_text: bool = True):
    path = os.path.join(out_dir, META_FILE)
    if not os.path.exists(path):
      raise FileNotFoundError(f'precomputed: no {META_FILE} in {out_dir}; run launch/precompute.py')
    with open(path) as f:
      self.meta = json.load(f)
    n = self.meta['num_shards']
    self.paths = [os.path.join(out_dir, shard_name(i, n)) for i in range(n)]
    missing = [i for i, p in enumerate(self.paths) if not os.path.exists(p)]
    if missing:
      raise FileNotFoundError(f'precomputed: {out_dir} is incomplete, shards {missing} of {n} '
                              'missing; rerun launch/precompute.py to finish it')
    self.out_dir = out_dir
    self.pad_text = pad_text
    self._readers = None

  def __len__(self) -> int:
    return self.meta['num_examples']

  def __getstate__(self):   # readers are reopened in each grain worker
    return {k: v for k, v in self.__dict__.items() if k != '_readers'} | {'_readers': None}

  def _reader(self, shard: int):
    if self._readers is None:
      self._readers = [None] * len(self.paths)
    if self._readers[shard] is None:
      self._readers[shard] = array_record_module.ArrayRecordReader(
          self.paths[shard], 'readahead_buffer_size:0')
    return self._readers[shard]

  def __getitem__(self, index: int) -> Dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'index {index} out of range for {len(self)} examples')
    per = self.meta['examples_per_shard']
    data = self._reader(index // per).read([index % per])[0]
    record = serialization.msgpack_restore(data)
    if self.pad_text:
      record['text'] = self._pad(record.pop('text_emb'), record['text_lengths'])
    return record

  def _pad(self, rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    out = np.zeros((len(lengths), self.meta['text_len'], rows.shape[-1]), rows.dtype)
    ends = np.cumsum(lengths)
    for s, (end, n) in enumerate(zip(ends, lengths)):
      out[s, :n] = rows[end - n:end]
    return out

  def negative(self) -> np.ndarray:
    """The negative prompt's embedding, [text_len, d] (or its real rows if pad_text=False)."""
    with open(os.path.join(self.out_dir, NEGATIVE_FILE), 'rb') as f:
      neg = serialization.msgpack_restore(f.read())
    if not self.pad_text:
      return neg['text_emb']
    return self._pad(neg['text_emb'], np.array([neg['text_length']]))[0]
