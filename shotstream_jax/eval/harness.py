"""The StoryWorld measurement harness: every model of the chain and its ablations on held-out
stories, judged from pixels (eval/judge.py). `launch/evaluate.py` is its command line.

    models = harness.models_from_chain('out/storyworld')       # or models_from_dir(...)
    result = harness.evaluate(models, num_stories=32, seed=0)
    harness.write_report(result, 'out/storyworld/eval')       # JSON, markdown, contact sheet

Rows (each the mean judge scores over the same held-out stories, one seed per story):
  ground truth; VAE round trip (each shot encoded as one clip and decoded); the teacher (Euler
  + CFG over [context | target], shot by shot on its own earlier shots); the stage-2, -3 and -4
  students (the 4-step streaming pipeline); ablations of the stage-4 student at inference
  (global cache off, RoPE shot phase, a position gap, context budget, a local window shorter
  than a shot), each also as its difference from the stage-4 student paired story by story,
  with a standard error. Per row, why shots show no scene (`diagnose`: the part of the
  judge's scene test each missed shot fails; the scene test on each chunk and on each latent
  frame of a shot alone; found by the caption's camera motion). Error accumulation: identity
  of shot k against shot 1 on longer stories, stage 3 vs stage 4. Speed: the stage-4 pipeline
  on this machine (FPS, first-frame latency).
"""

import copy
import dataclasses
import json
import os
import time
from typing import Callable, Dict, List, Optional

import jax
import numpy as np
import tqdm

from shotstream_jax.convert import dit as dit_convert
from shotstream_jax.convert import umt5 as umt5_convert
from shotstream_jax.convert import vae as vae_convert
from shotstream_jax.data import storyworld as sw
from shotstream_jax import embedded
from shotstream_jax.eval import judge
from shotstream_jax.io import video as video_io
from shotstream_jax import loading
from shotstream_jax.models import tokenizer as tokenizer_lib
from shotstream_jax.models import vae as vae_lib
from shotstream_jax import pipeline as pipeline_lib
from shotstream_jax.sampling import teacher as teacher_lib
from shotstream_jax import text as text_lib
from shotstream_jax.training import chain as chain_lib

KEYS = ('overall', 'identity', 'adherence', 'cuts', 'smoothness', 'found')
STUDENTS = ('stage 2 student', 'stage 3 student', 'stage 4 student')
# name -> dotted config overrides of the stage-4 student (inference only, same weights).
ABLATIONS = {
    'global cache off': {'sampling.context': 'none'},
    'RoPE shot phase 0': {'model.rope.theta': 0.0},
    'RoPE shot phase 1.0': {'model.rope.theta': 1.0},
    'position gap 3': {'model.rope.position_gap': 3},
    'context budget 1': {'model.context_frames': 1},
    'context budget 3': {'model.context_frames': 3},
    # The local window only matters in shots longer than 2 chunks: at the preset's 2-chunk
    # shots a chunk's in-shot history is 1 chunk, which any window holds. So both rows stream
    # 3-chunk shots (longer than training's) and differ only in the window.
    'shots of 3 chunks': {'sampling.shot_latent_frames': 9, 'sampling.local_frames': 9},
    'shots of 3 chunks, local window 1 chunk': {'sampling.shot_latent_frames': 9,
                                                'sampling.local_frames': 3},
}


@dataclasses.dataclass
class Models:
  """Everything the harness generates with; a missing network skips its rows."""
  config: object                       # configs/shotstream.py model config
  vae_params: object
  text_params: object
  tokenizer_path: str
  generators: Dict[str, object]        # STUDENTS name -> DiT params
  teacher: Optional[object] = None     # stage-1 DiT params
  teacher_guidance: float = 3.0
  teacher_steps: int = 50
  uncond: Optional[np.ndarray] = None  # teacher CFG text rows [L, D] (default zeros)


def prompt_encoder(m: Models):
  """The text encoder of `m` (its tokenizer folder and frozen umT5) for the pipelines."""
  tok = tokenizer_lib.UMT5Tokenizer(m.tokenizer_path, m.config.text.text_len)
  return text_lib.PromptEncoder(m.text_params, m.config.text, tok)


def models_from_chain(root: str, preset: str = 'storyworld', overrides=None) -> Models:
  """The networks of a `launch/reproduce.py` run under `root` (whichever stages finished)."""
  ch = chain_lib.Chain(root, preset, overrides)
  config = ch.model_config()
  load = lambda step, net: loading.load_network_params(ch.source(step), net, config.model,
                                                       field=step)
  generators = {}
  for name, step in zip(STUDENTS, ('ode', 'dmd_intra', 'dmd_inter')):
    if chain_lib.Chain.done(ch, step):
      generators[name] = load(step, 'generator')
  teacher = load('teacher', 'teacher') if ch.done('teacher') else None
  guidance = ch.config('ode').ode.guidance if ch.done('teacher') else 3.0
  return Models(config, vae_convert.load_vae(ch.vae_file, config.vae),
                umt5_convert.load_umt5(ch.text_file, config.text), ch.tokenizer_dir,
                generators, teacher, teacher_guidance=guidance)


def models_from_dir(directory: str, config) -> Models:
  """The shipped model of a model directory (shotstream_jax/embedded.py) as the stage-4 row."""
  p = embedded.paths(directory)
  return Models(config, vae_convert.load_vae(p['vae_path'], config.vae),
                umt5_convert.load_umt5(p['text_path'], config.text), p['tokenizer_path'],
                {STUDENTS[-1]: dit_convert.load_dit(p['dit_path'], config.model)})


def held_out_stories(num: int, seed: int = 0, num_shots=(2, 4), offset: int = 0) -> List[sw.Story]:
  """Held-out StoryWorld stories (never in a training split: `heldout` draws its own stream;
  `offset` keeps the long-story set apart from the main one)."""
  return [sw.sample_story(seed, 'heldout', offset + i, num_shots) for i in range(num)]


def _render(config, story):
  s = config.sampling
  return sw.render_story(story, s.height, s.width,
                         vae_lib.pixel_frames(config.vae, s.shot_latent_frames))


def _with(config, overrides: dict):
  return chain_lib.apply_overrides(copy.deepcopy(config), overrides)


def vae_round_trip(config, vae_params, frames, frames_per_shot: int) -> np.ndarray:
  """Each shot encoded as one clip and decoded (what precompute + generation do to a shot)."""
  vae = vae_lib.WanVAE(config.vae)
  run = _jit_round_trip(vae)
  shots = frames.reshape((-1, frames_per_shot) + frames.shape[1:])
  out = [np.asarray(run(vae_params, video_io.to_unit(s)[None])[0]) for s in shots]
  return video_io.to_uint8(np.concatenate(out))


_ROUND_TRIPS = {}


def _jit_round_trip(vae):
  key = repr(vae.cfg)
  if key not in _ROUND_TRIPS:
    _ROUND_TRIPS[key] = jax.jit(
        lambda p, x: vae_lib.decode(vae, p, vae_lib.encode(vae, p, x)))
  return _ROUND_TRIPS[key]


def teacher_sampler(models: Models):
  """The sampler the teacher generates with: Euler + CFG over [context | target], shot by
  shot on its own earlier shots, with `models`' guidance, steps and unconditional rows."""
  config = models.config
  uncond = models.uncond if models.uncond is not None else np.zeros(
      (config.model.text_len, config.model.text_dim), np.float32)
  return teacher_lib.TeacherSampler(config.model, config.sampling,
                                    pipeline_lib.latent_size(config), uncond,
                                    models.teacher_guidance, models.teacher_steps)


def teacher_row(models: Models) -> str:
  """The teacher's row name, its steps and guidance in it."""
  return f'teacher ({models.teacher_steps} Euler steps, CFG {models.teacher_guidance:g})'


def judge_story(frames, story) -> judge.Scores:
  """The judge's scores of a generated story's frames against its captions."""
  return judge.judge_video(frames, story.shot_captions(), global_caption=story.global_caption())


def mean_scores(scores: List[judge.Scores]) -> dict:
  """{KEYS entry: its mean over stories}: a harness row."""
  return {k: round(float(np.mean([getattr(s, k) for s in scores])), 4) for k in KEYS}


def generate_all(pipe, stories, seed, progress, name) -> List[np.ndarray]:
  """Every story through `pipe`, story i with generation seed `seed + i` (every row's)."""
  it = tqdm.tqdm(stories, desc=name, leave=False, disable=not progress)
  return [pipe.generate(st.as_json(), seed=seed + i) for i, st in enumerate(it)]


def evaluate(models: Models, num_stories: int = 32, seed: int = 0, ablations=True,
             long_stories: int = 64, long_shots: int = 8, speed: bool = True,
             progress: bool = True, sheet_stories: int = 4,
             log: Callable[[str], None] = print) -> dict:
  """All rows (module docstring) on `num_stories` held-out stories; a JSON-able dict with the
  frames of the first `sheet_stories` stories under 'sheet' (for `write_report`).

  `ablations`: True (all of ABLATIONS), False, or a list of their names.
  """
  if ablations is True:
    ablations = list(ABLATIONS)
  unknown = [a for a in (ablations or []) if a not in ABLATIONS]
  if unknown:
    raise ValueError(f'ablations: unknown {unknown}; accepted: {", ".join(ABLATIONS)}')
  config = models.config
  fps = vae_lib.pixel_frames(config.vae, config.sampling.shot_latent_frames)
  stories = held_out_stories(num_stories, seed)
  encoder = prompt_encoder(models)
  rows, sheet, started, judged, diagnosis = {}, {}, time.time(), {}, {}

  def add(name, videos, cfg=config):
    scores = [judge_story(v, st) for v, st in zip(videos, stories)]
    rows[name] = mean_scores(scores)
    judged[name] = scores
    diagnosis[name] = diagnose(videos, stories, scores, cfg)
    sheet[name] = [v for v in videos[:sheet_stories]]
    log(f'harness: {name}: ' + ', '.join(f'{k} {v:.3f}' for k, v in rows[name].items()))

  truth = [_render(config, st) for st in stories]
  add('ground truth', truth)
  add('VAE round trip', [vae_round_trip(config, models.vae_params, f, fps) for f in truth])

  def pipe(params, cfg=config, sampler=None):
    return pipeline_lib.ShotStreamPipeline(cfg, params, models.vae_params, encoder, sampler)

  if models.teacher is not None:
    add(teacher_row(models), generate_all(pipe(models.teacher, sampler=teacher_sampler(models)),
                                          stories, seed, progress, 'teacher'))
  for name in STUDENTS:
    if name in models.generators:
      add(name, generate_all(pipe(models.generators[name]), stories, seed, progress, name))

  final = models.generators.get(STUDENTS[-1])
  effects = {}
  if final is not None:
    for name in ablations or []:
      ablated = _with(config, ABLATIONS[name])
      add(f'ablation: {name}', generate_all(pipe(final, ablated), stories, seed, progress,
                                            name), ablated)
      effects[name] = paired_differences(judged[f'ablation: {name}'], judged[STUDENTS[-1]])

  accumulation, per_story = {}, {}
  if long_stories:
    longs = held_out_stories(long_stories, seed, (long_shots, long_shots), offset=100000)
    for name in STUDENTS[1:]:
      if name in models.generators:
        videos = generate_all(pipe(models.generators[name]), longs, seed, progress,
                              f'{name}, {long_shots} shots')
        to_first = np.array([judge_story(v, st).identity_to_first
                             for v, st in zip(videos, longs)])
        per_k = to_first.mean(0)
        accumulation[name] = [round(float(x), 4) for x in per_k]
        per_story[name] = to_first.mean(1)
        log(f'harness: {name}, identity of shot k vs shot 1, k = 2..{long_shots}: '
            + ' '.join(f'{x:.2f}' for x in per_k))

  timing = measure_speed(pipe(final)) if final is not None and speed else {}
  return {'num_stories': num_stories, 'seed': seed, 'rows': rows, 'diagnosis': diagnosis,
          'ablation_effects': effects,
          'identity_vs_first_shot': accumulation,
          'long_identity': long_identity_summary(per_story), 'long_shots': long_shots,
          'long_stories': long_stories if accumulation else 0, 'speed': timing,
          'wall_s': round(time.time() - started, 1), 'device': _device(),
          'sheet': sheet, 'sheet_captions': [st.as_json() for st in stories[:sheet_stories]]}


def latent_bounds(config, per: int = 1) -> List[tuple]:
  """[(first, end)) pixel frames of each group of `per` latent frames of a shot: the first
  latent frame decodes to one frame, every later one to the VAE's temporal factor
  (vae.pixel_frames)."""
  n = config.sampling.shot_latent_frames
  return [(vae_lib.pixel_frames(config.vae, c * per) if c else 0,
           vae_lib.pixel_frames(config.vae, (c + 1) * per)) for c in range(n // per)]


def chunk_bounds(config) -> List[tuple]:
  """latent_bounds of each chunk (`model.chunk_frames` latent frames) of a shot."""
  return latent_bounds(config, config.model.chunk_frames)


def diagnose(videos, stories, scores: List[judge.Scores], config) -> dict:
  """Why shots fail the judge's scene test (`found`, which gates identity, adherence and
  smoothness): {'not_found': {judge.MISSES kind: share of all shots}, 'found_by_chunk' and
  'found_by_frame': [the share of shots whose chunk c / latent frame c (its pixel frames),
  judged alone, shows a scene], 'found_by_motion': {camera: share of its shots found},
  'found_by_frame_and_motion': {camera: found_by_frame of its shots}}.

  Why: a shot is streamed chunk by chunk, and whether a scene is lost from the start or
  while the shot goes on (a later chunk repainting the setting's colours) points at different
  stages; the per-chunk test tells them apart, the per-frame test tells a loss at a chunk
  boundary (the student's caches) from one that grows frame by frame, and the split by the
  caption's camera motion tells copying a still scene from moving it. Shots are equally long
  (`config`'s)."""
  shots = [m for s in scores for m in s.shots]
  missed = {k: round(sum(m.miss == k for m in shots) / len(shots), 4) for k in judge.MISSES}
  per_shot = vae_lib.pixel_frames(config.vae, config.sampling.shot_latent_frames)
  parts = {'found_by_chunk': chunk_bounds(config), 'found_by_frame': latent_bounds(config)}
  found = {key: [] for key in parts}
  cameras = []
  for video, story in zip(videos, stories):
    for k, caption in enumerate(story.shot_captions()):
      shot = np.asarray(video[k * per_shot:(k + 1) * per_shot], np.float32)
      cameras.append(sw.camera(story.shots[k].motion))
      for key, bounds in parts.items():
        found[key].append([judge.measure_shot(shot[a:b], caption).found for a, b in bounds])
  share = lambda rows: [round(float(v), 4) for v in np.mean(rows, axis=0)]
  return dict(not_found=missed, **{key: share(rows) for key, rows in found.items()},
              found_by_motion=sw.mean_by_camera([m.found for m in shots], cameras),
              found_by_frame_and_motion=sw.mean_by_camera(found['found_by_frame'], cameras))


def mean_se(x) -> dict:
  """{'mean', 'se'}: the mean of `x` and its standard error (None for a single value)."""
  x = np.asarray(x, np.float64)
  se = round(float(x.std(ddof=1) / np.sqrt(len(x))), 4) if len(x) > 1 else None
  return {'mean': round(float(x.mean()), 4), 'se': se}


def long_identity_summary(per_story: Dict[str, np.ndarray]) -> dict:
  """Mean identity over k = 2..S of each model's long stories, with its standard error over
  stories, and stage 4 - stage 3 paired story by story (the same stories and seeds), so the
  question "does stage 4 hold a story at least as well as stage 3" gets an error bar: a story's
  identity varies far more between stories than between models (README, eleventh attempt)."""
  out = {name: mean_se(v) for name, v in per_story.items()}
  if all(name in per_story for name in STUDENTS[1:]):
    out['stage 4 - stage 3'] = mean_se(per_story[STUDENTS[2]] - per_story[STUDENTS[1]])
  return out


def paired_differences(scores: List[judge.Scores], base: List[judge.Scores]) -> dict:
  """{key: mean_se(scores - base)} over stories, for the KEYS: an ablation against the model
  it ablates, on the same stories and seeds. Story to story the judge's scores vary far more
  than an ablation moves them, so the difference of the rows' means alone cannot say whether
  an effect of a few hundredths is there; pairing removes the stories' own variance."""
  return {k: mean_se([getattr(a, k) - getattr(b, k) for a, b in zip(scores, base)])
          for k in KEYS}


def measure_speed(pipe, shots: int = 3, repeats: int = 3) -> dict:
  """FPS (with / without VAE decode) and first-frame latency of streaming generation
  (DESIGN 6): after warm-up, medians over `repeats` stories of `shots` shots."""
  compile_s = pipe.warmup()
  runs = []
  for r in range(repeats):
    story = held_out_stories(1, 50 + r, (shots, shots), offset=200000)[0]
    session = pipe.session(story.global_caption(), seed=r)
    start = time.perf_counter()
    for caption in story.shot_captions():
      for _ in session.next_shot(caption):
        pass
    wall = time.perf_counter() - start
    frames = sum(st.frames for st in session.stats)
    decode = sum(st.decode_s for st in session.stats)
    runs.append((frames / wall, frames / (wall - decode),
                 float(np.median([st.first_frame_s for st in session.stats]))))
  fps, fps_nodecode, first = (float(np.median(x)) for x in zip(*runs))
  return {'fps': round(fps, 2), 'fps_without_decode': round(fps_nodecode, 2),
          'first_frame_latency_s': round(first, 4), 'compile_s': round(compile_s, 1),
          'shots': shots, 'repeats': repeats, 'compile_counts': dict(pipe.compile_counts)}


def _device() -> str:
  d = jax.devices()[0]
  return f'{d.platform}: {d.device_kind} x{jax.device_count()}, {os.cpu_count()} CPU cores'


# ----------------------------------------------------------------------------- report


def plus_minus(v: dict, fmt: str = '.3f') -> str:
  """A `mean_se` dict as 'mean +- se' ('n/a' for the error of a single value)."""
  return f'{v["mean"]:{fmt}} +- ' + ('n/a' if v['se'] is None else f'{v["se"]:.3f}')


def markdown(result: dict) -> str:
  lines = [f'StoryWorld judge, {result["num_stories"]} held-out stories (seed {result["seed"]}), '
           f'means; {result["device"]}', '',
           '| video | ' + ' | '.join(KEYS) + ' |', '|---|' + '---|' * len(KEYS)]
  for name, row in result['rows'].items():
    lines.append(f'| {name} | ' + ' | '.join(f'{row[k]:.3f}' for k in KEYS) + ' |')
  diagnosis = result.get('diagnosis') or {}
  if diagnosis:
    lines += ['', 'Why shots show no scene: the share of all shots missing each part of the '
              "judge's scene test; the share of shots whose chunk c / latent frame c, judged "
              'alone, shows a scene; the share of static / panning / zooming shots found:', '',
              '| video | ' + ' | '.join(judge.MISSES) +
              ' | found by chunk | found by latent frame | found by motion |',
              '|---|' + '---|' * (len(judge.MISSES) + 3)]
    for name, d in diagnosis.items():
      lines.append(f'| {name} | ' + ' | '.join(f'{d["not_found"][k]:.3f}' for k in judge.MISSES)
                   + ''.join(' | ' + ' / '.join(f'{v:.3f}' for v in d.get(key, ()))
                             for key in ('found_by_chunk', 'found_by_frame'))
                   + ' | ' + ' / '.join(f'{c} {v:.3f}' for c, v in
                                        d.get('found_by_motion', {}).items()) + ' |')
  effects = result.get('ablation_effects') or {}
  if effects:
    keys = ('identity', 'adherence', 'overall', 'found')
    lines += ['', 'Ablation minus the stage-4 student, paired story by story (mean +- standard '
              'error over stories):', '', '| ablation | ' + ' | '.join(keys) + ' |',
              '|---|' + '---|' * len(keys)]
    for name, d in effects.items():
      lines.append(f'| {name} | ' + ' | '.join(plus_minus(d[k], '+.3f') for k in keys) + ' |')
  acc = result.get('identity_vs_first_shot') or {}
  if acc:
    n = result['long_shots']
    lines += ['', f'Identity of shot k against shot 1, {result["long_stories"]} stories of '
              f'{n} shots:', '', '| model | ' + ' | '.join(f'k={k}' for k in range(2, n + 1))
              + ' |', '|---|' + '---|' * (n - 1)]
    for name, values in acc.items():
      lines.append(f'| {name} | ' + ' | '.join(f'{v:.3f}' for v in values) + ' |')
    means = result.get('long_identity') or {}
    if means:
      lines += ['', f'Mean over k = 2..{n} +- standard error over stories: ' + '; '.join(
          f'{name} {plus_minus(v)}' for name, v in means.items())
          + ' (the difference paired story by story).']
  sp = result.get('speed') or {}
  if sp:
    lines += ['', f'Speed of the stage-4 pipeline ({result["device"]}): {sp["fps"]} FPS '
              f'({sp["fps_without_decode"]} without decode), first-frame latency '
              f'{sp["first_frame_latency_s"]} s, medians of {sp["repeats"]} {sp["shots"]}-shot '
              f'stories after {sp["compile_s"]} s of compilation.']
  return '\n'.join(lines) + '\n'


def contact_sheet(result: dict, scale: int = 3, names=None) -> np.ndarray:
  """uint8 image: per story a block of rows (ground truth, then each model), columns = each
  shot's first, middle and last frame."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  sheet = result['sheet']
  names = [n for n in (names or sheet) if n in sheet]
  blocks = []
  label_w = 150
  for s in range(len(sheet[names[0]])):
    rows = []
    for name in names:
      video = sheet[name][s]
      shots = len(result['sheet_captions'][s]) - 1
      per = len(video) // shots
      picks = [video[k * per + j] for k in range(shots) for j in (0, per // 2, per - 1)]
      strip = np.concatenate([np.pad(f, ((1, 1), (1, 1), (0, 0))) for f in picks], axis=1)
      strip = strip.repeat(scale, 0).repeat(scale, 1)
      label = Image.new('RGB', (label_w, strip.shape[0]), (255, 255, 255))
      ImageDraw.Draw(label).text((4, strip.shape[0] // 2 - 6), name[:24], fill=(0, 0, 0))
      rows.append(np.concatenate([np.asarray(label), strip], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255)
            for r in rows]
    blocks.append(np.concatenate(rows + [np.full((8, width, 3), 255, np.uint8)], axis=0))
  width = max(b.shape[1] for b in blocks)
  blocks = [np.pad(b, ((0, 0), (0, width - b.shape[1]), (0, 0)), constant_values=255)
            for b in blocks]
  return np.concatenate(blocks, axis=0)


def write_report(result: dict, out_dir: str, sheet_names=None) -> Dict[str, str]:
  """results.json (without frames), results.md and contact_sheet.png under `out_dir`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  paths = {k: os.path.join(out_dir, f) for k, f in (
      ('json', 'results.json'), ('md', 'results.md'), ('png', 'contact_sheet.png'))}
  with open(paths['json'], 'w') as f:
    json.dump({k: v for k, v in result.items() if k != 'sheet'}, f, indent=1)
  with open(paths['md'], 'w') as f:
    f.write(markdown(result))
  default = ['ground truth', 'VAE round trip'] + [n for n in result['rows']
                                                  if n.startswith('teacher')] + list(STUDENTS)
  Image.fromarray(contact_sheet(result, names=sheet_names or default)).save(paths['png'])
  return paths
