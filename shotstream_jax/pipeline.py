"""The user-facing object: weights + prompt encoding + the streaming student + VAE decode.

    pipe = ShotStreamPipeline.embedded(shotstream.get_config('storyworld'))  # shipped weights
    pipe = ShotStreamPipeline.from_random(shotstream.get_config('tiny'))      # or .load(...)
    video = pipe.generate(story, seed=0)               # uint8 [T, H, W, 3]

    session = pipe.session(global_caption, seed=0)
    for frames in session.next_shot('a close-up of ...'):   # uint8 [n, H, W, 3] per chunk
      show(frames)                                          # first frames before the shot ends

Data path per shot: prompts -> umT5 rows (cached per prompt) -> cross-attention K/V of the caption
table (once per shot) -> context frames chosen from earlier decoded shots, VAE-encoded one frame
at a time -> global cache (one DiT pass) -> chunk scan with the local cache -> streaming VAE
decode. Every jitted function sees fixed shapes, so a story of any length and any prompts
compiles each of them once (`compile_counts`).
"""

import collections
import dataclasses
import functools
import logging
import time
from typing import Dict, Iterator, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from shotstream_jax import context as context_lib
from shotstream_jax.data import prompts as prompts_lib
from shotstream_jax import embedded
from shotstream_jax.io.video import to_uint8
from shotstream_jax import loading
from shotstream_jax.models import dit
from shotstream_jax.models import random_init
from shotstream_jax.models import tokenizer as tokenizer_lib
from shotstream_jax.models import vae as vae_lib
from shotstream_jax.sampling import causal
from shotstream_jax.sampling import story as story_lib
from shotstream_jax import text as text_lib

StoryLike = Union[prompts_lib.Story, dict, Sequence[str]]
# sampling.context: 'history' = the reference's global context from earlier shots; 'none' =
# every shot as a first shot (zero context: the "global cache off" ablation).
CONTEXT_MODES = ('history', 'none')


def latent_size(config):
  """(h, w) of the latents of `config.sampling`'s frames, checked against the VAE and patch."""
  s = config.sampling
  factor = vae_lib.spatial_factor(config.vae)
  multiple = factor * config.model.patch_size[1]
  for name, size in (('height', s.height), ('width', s.width)):
    if size < multiple or size % multiple:
      raise ValueError(f'sampling.{name}: must be a positive multiple of {multiple} (VAE '
                       f'{factor}x times patch {config.model.patch_size[1]}), got {size}')
  return s.height // factor, s.width // factor


def check_config(config) -> None:
  """Every sampling field a pipeline reads, checked in one place before any weights load, so a
  bad --config.sampling.* value is one line naming it rather than a failure minutes later."""
  s = config.sampling
  if s.context not in CONTEXT_MODES:
    raise ValueError(f'sampling.context: unknown {s.context!r}; accepted: '
                     f'{", ".join(CONTEXT_MODES)}')
  if not isinstance(s.fps, int) or s.fps < 1:
    raise ValueError(f'sampling.fps: must be a whole number >= 1 (frames per second of the '
                     f'mp4), got {s.fps!r}')
  causal.check_layout(config.model, s, latent_size(config))


def as_story(story: StoryLike) -> prompts_lib.Story:
  """A Story from a Story, a reference JSON dict, or a list of shot prompts."""
  if isinstance(story, prompts_lib.Story):
    return story
  if isinstance(story, dict):
    return prompts_lib.story_from_dict(story)
  if isinstance(story, str) or not isinstance(story, Sequence):
    raise ValueError('story: expected a reference JSON dict (global_caption, shot1..shotN) or '
                     f'a list of shot prompts, got {type(story).__name__}')
  if not story:
    raise ValueError('story: empty story; give at least one shot prompt')
  for i, p in enumerate(story):
    if not isinstance(p, str) or not p.strip():
      raise ValueError(f'story: shot {i + 1} has an empty prompt')
  return prompts_lib.Story(global_caption='', shots=tuple(story), source='story list')


@dataclasses.dataclass
class ShotStats:
  shot: int
  frames: int
  first_frame_s: float      # prompt -> first decoded frame of this shot
  total_s: float            # prompt -> last decoded frame of this shot
  decode_s: float = 0.0     # of total_s, spent in the VAE decode
  chunk_s: Sequence[float] = ()  # per chunk: denoise + cache pass (no decode)


class ShotStreamPipeline:
  """DiT, VAE and text-encoder params plus the jitted pieces of streaming generation."""

  def __init__(self, config, dit_params, vae_params, prompt_encoder, sampler=None):
    """`sampler`: what generates a shot (default the streaming causal student of
    `config`); e.g. sampling.teacher.TeacherSampler to run the teacher shot by shot."""
    self.config = config
    check_config(config)
    s = config.sampling
    self.vae = vae_lib.WanVAE(config.vae)
    self.latent_hw = latent_size(config)
    self.sampler = sampler or causal.CausalSampler(config.model, s, self.latent_hw)
    self.streams = isinstance(self.sampler, causal.CausalSampler)
    self.dit_params = dit_params
    self.vae_params = vae_params
    self.prompt_encoder = prompt_encoder
    self.budget = config.model.context_frames
    self.compile_counts: Dict[str, int] = collections.Counter()
    self._story_generators: Dict[tuple, story_lib.StoryGenerator] = {}

    vae, sampler = self.vae, self.sampler
    if self.streams:
      self._prefill = self._jit('prefill', sampler.prefill)
      self._chunk = self._jit('chunk', sampler.chunk)
    self._shot = self._jit('shot', sampler.shot)
    self._text_kv = self._jit(
        'text_kv', lambda p, rows: dit.WanTextKV(config.model).apply({'params': p}, rows))
    self._encode_context = self._jit(
        'encode_context', lambda p, f: jnp.swapaxes(vae_lib.encode_image(vae, p, f), 0, 1))
    self._decode = self._jit('decode', functools.partial(vae_lib.decode_step, vae))

  def _jit(self, name, fn):
    """jax.jit that counts its traces (= compilations) in `compile_counts[name]`."""
    def traced(*args):
      self.compile_counts[name] += 1
      return fn(*args)
    return jax.jit(traced)

  # ------------------------------------------------------------------ construction

  @classmethod
  def embedded(cls, config):
    """The preset's shipped trained model (`config.weights_dir`, shotstream_jax/embedded.py);
    raises FileNotFoundError naming what is missing when the preset ships none."""
    directory = embedded.model_dir(config)
    if directory is None:
      raise FileNotFoundError(
          f'weights: preset {config.preset!r} ships no trained model'
          + (f' ({config.weights_dir} is missing or incomplete; launch/reproduce.py makes it)'
             if config.get('weights_dir') else '') + '; use from_random or load')
    return cls.load(config, **embedded.paths(directory))

  @classmethod
  def from_random(cls, config, seed: int = 0, tokenizer=None):
    """Random weights for every network (the embedded default model; nothing to download).

    Drawn from the parameter shapes (`random_init`), not the modules' initializers: it takes
    milliseconds, and unlike Wan's zero-initialised head it makes outputs depend on the whole
    network.
    """
    return cls(config, random_init.embedded_dit(config.model, seed),
               random_init.embedded_vae(config.vae, seed),
               loading.embedded_prompt_encoder(config, seed, tokenizer))

  @classmethod
  def with_embedded_encoders(cls, config, dit_path: str, seed: int = 0):
    """A trained DiT with the embedded (random, `seed`) VAE and text encoder: how a `tiny`
    student trained on StoryWorld (encoded by those same draws) is meant to be run."""
    return cls(config, loading.load_dit(dit_path, config),
               random_init.embedded_vae(config.vae, seed),
               loading.embedded_prompt_encoder(config, seed))

  @classmethod
  def load(cls, config, dit_path: str, vae_path: str, text_path: str, tokenizer_path: str):
    """Weights from published files (.safetensors / .pt / .pth) or our orbax directories;
    the DiT also from a training workdir of ours (its 'generator'). shotstream_jax/loading.py
    reads them all."""
    dit_params = loading.load_dit(dit_path, config)
    vae_params = loading.load_vae(vae_path, config.vae, '--vae')
    text_params = loading.load_text(text_path, config.text, '--text_encoder')
    tokenizer = tokenizer_lib.UMT5Tokenizer(tokenizer_path, config.text.text_len)
    return cls(config, dit_params, vae_params,
               text_lib.PromptEncoder(text_params, config.text, tokenizer))

  # ------------------------------------------------------------------ generation

  @property
  def frames_per_shot(self) -> int:
    return vae_lib.pixel_frames(self.config.vae, self.config.sampling.shot_latent_frames)

  def warmup(self) -> float:
    """Compile every jitted piece of streaming generation on a throwaway 2-shot story (any
    story has the same shapes); returns the seconds it took."""
    start = time.perf_counter()
    session = self.session('warm-up', seed=0)
    for caption in ('first', 'second'):
      for _ in session.next_shot(caption):
        pass
    return time.perf_counter() - start

  def session(self, global_caption: str = '', seed: int = 0,
              keep_history: bool = True) -> 'StorySession':
    """A story directed shot by shot. keep_history=False keeps no finished shot's video or
    latents (`video()` is then unavailable): memory stays bounded however many shots stream
    to a writer (the CLI, interactive sessions)."""
    return StorySession(self, global_caption, seed, keep_history)

  def generate(self, story: StoryLike, seed: int = 0, streaming: bool = True) -> np.ndarray:
    """Every shot of `story`, uint8 [shots * frames_per_shot, H, W, 3].

    streaming=True runs the per-chunk path with streaming decode (what `session` yields);
    False runs each shot as one jitted `lax.scan` and decodes it whole. Same numbers.
    """
    story = as_story(story)
    session = self.session(story.global_caption, seed)
    for caption in story.shots:
      if streaming and self.streams:
        for _ in session.next_shot(caption):
          pass
      else:
        session.run_shot(caption)
    return session.video()

  def generate_batch(self, stories: Sequence[StoryLike], seeds: Sequence[int],
                     mesh: Optional[jax.sharding.Mesh] = None) -> np.ndarray:
    """Whole stories in one jitted call (sampling/story.py), uint8 [B, T, H, W, 3].

    Every story needs the same number of shots (one compilation per batch size and shot
    count); story i equals `generate(stories[i], seeds[i], streaming=False)`. `mesh`: split
    the stories over its 'data' axis.
    """
    if not self.streams:
      raise ValueError('generate_batch: needs the streaming student (this pipeline runs '
                       f'{type(self.sampler).__name__})')
    stories = [as_story(s) for s in stories]
    if not stories or len(seeds) != len(stories):
      raise ValueError(f'generate_batch: {len(stories)} stories and {len(seeds)} seeds; give '
                       'one seed per story, at least one story')
    shots = {len(s.shots) for s in stories}
    if len(shots) != 1:
      raise ValueError(f'generate_batch: every story needs the same number of shots, got '
                       f'{sorted(shots)}; batch stories by shot count')
    num_shots = shots.pop()
    key = (num_shots, mesh)
    if key not in self._story_generators:
      self._story_generators[key] = story_lib.StoryGenerator(
          self.sampler, self.vae, num_shots, self.frames_per_shot, self.budget,
          self.config.sampling.context, mesh)
    rows = jnp.stack([
        self.prompt_encoder([shot_text(self.prompt_encoder, s.global_caption, j, c)[0]
                             for j, c in enumerate(s.shots)]) for s in stories])
    return np.asarray(self._story_generators[key](self.dit_params, self.vae_params, rows,
                                                  np.asarray(seeds)))


def shot_text(prompt_encoder, global_caption: str, shot: int, caption: str):
  """(text, tokens cut) encoded for 0-based `shot`: prompts_lib.fit_shot_prompt under the
  tokenizer's budget, so a long global caption never erases the shot prompt (a cut is logged);
  an encoder without a tokenizer gets the reference text and truncates it itself."""
  tok = getattr(prompt_encoder, 'tokenizer', None)
  if tok is None:
    return prompts_lib.shot_prompt(global_caption, shot, caption), 0
  prompt, cut = prompts_lib.fit_shot_prompt(global_caption, shot, caption, tok.num_tokens,
                                            tok.text_len - 1)
  if cut:
    logging.warning('prompt: shot %d is %d tokens over text_len %d; cut from the end of the '
                    'global caption so the shot prompt is kept', shot + 1, cut, tok.text_len)
  return prompt, cut


class StorySession:
  """One story being directed shot by shot; holds decoded frames of earlier shots.

  Only frames that a later shot could still pick as context are kept: per shot at most
  sum_{c<=budget} c distinct indices, and only for the last `budget` shots (the context rule
  gives older shots no frames once there are more than `budget` earlier shots, and never again
  as the story grows). Memory therefore does not grow with the shot length nor, with
  keep_history=False, with the number of shots.
  """

  def __init__(self, pipe: ShotStreamPipeline, global_caption: str, seed: int,
               keep_history: bool = True):
    if not isinstance(global_caption, str):
      raise ValueError(f'global_caption: expected a string, got {type(global_caption).__name__}')
    self.pipe = pipe
    self.global_caption = global_caption
    self.keep_history = keep_history
    self.key = jax.random.key(seed)
    self.captions: List[str] = []
    self.shot_lengths: List[int] = []
    self._candidates: Dict[int, np.ndarray] = {}   # global pixel index -> frame in [-1, 1]
    self._video: List[np.ndarray] = []             # uint8 frames of each finished shot
    self.stats: List[ShotStats] = []
    self.latents: List[np.ndarray] = []            # [F, h, w, C] per shot
    self._prompts: Dict[tuple, str] = {}           # (shot, caption) -> encoded text
    self.prompt_cuts: Dict[int, int] = {}          # 0-based shot -> tokens cut from its prompt
    # Per finished shot (keep_history only): the older shots' candidates it made unselectable,
    # so `undo` can give them back.
    self._dropped: List[Dict[int, np.ndarray]] = []

  # -- per-shot inputs

  def _plan(self, caption: str) -> causal.ShotPlan:
    pipe = self.pipe
    # A shot whose stream was abandoned part-way is forgotten: it never becomes context.
    del self.captions[len(self.shot_lengths):]
    if not isinstance(caption, str) or not caption.strip():
      raise ValueError(f'prompt: shot {len(self.captions) + 1} has an empty prompt')
    choice = context_lib.shot_context(pipe.config.sampling.context, self.shot_lengths,
                                      pipe.budget)
    self.captions.append(caption)
    rows = pipe.prompt_encoder([self._prompt(j) for j in choice.caption_shots])
    text_kv = pipe._text_kv(pipe.dit_params, rows)
    h, w = pipe.latent_hw
    if choice.frame_indices:
      frames = np.stack([self._candidates[i] for i in choice.frame_indices])
      ctx = pipe._encode_context(pipe.vae_params, jnp.asarray(frames))
    else:  # first shot: exact zeros (the reference encodes black frames, then zeroes them)
      ctx = jnp.zeros((1, pipe.budget, h, w, pipe.config.model.in_channels), jnp.float32)
    return causal.ShotPlan(ctx, *map(jnp.asarray, choice.batch_ids(1)), text_kv)

  def _prompt(self, shot: int) -> str:
    """The text encoded for `shot` (`shot_text`; a cut is reported once per shot on stderr and
    kept in `self.prompt_cuts`)."""
    key = (shot, self.captions[shot])
    if key not in self._prompts:
      self._prompts[key], cut = shot_text(self.pipe.prompt_encoder, self.global_caption, shot,
                                          key[1])
      if cut:
        self.prompt_cuts[shot] = cut
    return self._prompts[key]

  def _shot_key(self):
    return jax.random.fold_in(self.key, len(self.captions) - 1)

  def _finish_shot(self, frames, video, latents, t0, first_s, decode_s=0.0, chunk_s=()):
    """Keep the shot's candidate context frames ([-1, 1]) and stats (its uint8 video and
    latents too with keep_history); drop candidates of shots no later shot can pick."""
    pipe = self.pipe
    if self.keep_history:
      self._video.append(video)
      self.latents.append(np.asarray(latents))
    n = frames.shape[0]
    start = sum(self.shot_lengths)
    keep = set()
    for count in range(1, pipe.budget + 1):
      keep.update(np.round(np.linspace(0, n - 1, count)).astype(int).tolist())
    for i in keep:
      self._candidates[start + i] = frames[i]
    self.shot_lengths.append(n)
    # With P > budget earlier shots, frame_budget gives the oldest P - budget shots nothing.
    selectable_from = sum(self.shot_lengths[:max(0, len(self.shot_lengths) - pipe.budget)])
    dropped = {i: self._candidates.pop(i) for i in list(self._candidates) if i < selectable_from}
    if self.keep_history:
      self._dropped.append(dropped)
    self.stats.append(ShotStats(len(self.shot_lengths), n, first_s, time.perf_counter() - t0,
                                decode_s, tuple(chunk_s)))

  # -- public

  def next_shot(self, caption: str) -> Iterator[np.ndarray]:
    """Generate the next shot, yielding uint8 frames [n, H, W, 3] as each chunk is decoded
    (a sampler that does not stream, the teacher's, yields the whole shot once)."""
    pipe = self.pipe
    if not pipe.streams:
      yield self.run_shot(caption)
      return
    t0 = time.perf_counter()
    plan = self._plan(caption)
    key = self._shot_key()
    global_cache = pipe._prefill(pipe.dit_params, plan)
    local = pipe.sampler.init_local(1)
    dcache = vae_lib.init_decode_cache(pipe.vae, 1, *pipe.latent_hw)
    decoded, shown, latents, first_s, decode_s, chunk_s = [], [], [], None, 0.0, []
    for index in range(pipe.sampler.num_chunks):
      t_chunk = time.perf_counter()
      x0, local = pipe._chunk(pipe.dit_params, plan, global_cache, local, jnp.int32(index), key)
      jax.block_until_ready(x0)
      t_decode = time.perf_counter()
      chunk_s.append(t_decode - t_chunk)
      frames, dcache = pipe._decode(pipe.vae_params, dcache, x0)
      frames = np.asarray(frames[0])
      decode_s += time.perf_counter() - t_decode
      if first_s is None:
        first_s = time.perf_counter() - t0
      decoded.append(frames)
      latents.append(x0[0])
      shown.append(to_uint8(frames))
      yield shown[-1]
    self._finish_shot(np.concatenate(decoded), np.concatenate(shown), jnp.concatenate(latents),
                      t0, first_s, decode_s, chunk_s)

  def run_shot(self, caption: str) -> np.ndarray:
    """The next shot through the jitted `lax.scan` over chunks and a whole-shot decode."""
    pipe = self.pipe
    t0 = time.perf_counter()
    plan = self._plan(caption)
    latents = jax.block_until_ready(pipe._shot(pipe.dit_params, plan, self._shot_key()))
    t_decode = time.perf_counter()
    dcache = vae_lib.init_decode_cache(pipe.vae, 1, *pipe.latent_hw)
    frames = np.asarray(pipe._decode(pipe.vae_params, dcache, latents)[0][0])
    now = time.perf_counter()
    video = to_uint8(frames)
    self._finish_shot(frames, video, latents[0], t0, now - t0, now - t_decode)
    return video

  def undo(self) -> int:
    """Forget the last finished shot: its frames leave the context and the video, and the
    next shot is generated in its place (with the same key, so the same prompt gives the same
    shot again). Returns the number of shots left. Needs keep_history."""
    if not self.keep_history:
      raise ValueError('undo: this session keeps no history (keep_history=False)')
    if not self.shot_lengths:
      raise ValueError('undo: no shot to undo')
    self.shot_lengths.pop()
    start = sum(self.shot_lengths)
    for i in [i for i in self._candidates if i >= start]:
      del self._candidates[i]
    self._candidates.update(self._dropped.pop())
    del self.captions[len(self.shot_lengths):]
    for items in (self._video, self.latents, self.stats):
      items.pop()
    self.prompt_cuts.pop(len(self.shot_lengths), None)
    return len(self.shot_lengths)

  def video(self) -> np.ndarray:
    """All frames of the finished shots, uint8 [T, H, W, 3]."""
    if not self.keep_history:
      raise ValueError('story: this session keeps no history (keep_history=False); write '
                       'the frames next_shot yields instead')
    if not self._video:
      raise ValueError('story: no shot has been generated yet')
    return np.concatenate(self._video)
