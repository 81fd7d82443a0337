r"""Generate a multi-shot story to mp4, streaming chunk by chunk.

  # the embedded default model (trained StoryWorld weights shipped in weights/storyworld/):
  python launch/generate.py --prompts=configs/stories/storyworld.json --out=out/story.mp4

  # random weights of a preset (shapes, speed; the video is noise):
  python launch/generate.py --config=configs/shotstream.py:tiny \
      --prompts=configs/stories/harbour.json --out=out/story.mp4

  # the published model (files as distributed; orbax directories from convert.py work too):
  python launch/generate.py --config=configs/shotstream.py:wan_1_3b \
      --ckpt=shotstream_merged.pt --vae=Wan2.1-T2V-1.3B/Wan2.1_VAE.pth \
      --text_encoder=Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth \
      --tokenizer=Wan2.1-T2V-1.3B/google/umt5-xxl --prompts=story.json --out=story.mp4

`--prompts` takes a reference story JSON (`global_caption`, `shot1..shotN`) or a reference
`testset.csv` (every row; shots = its `frame_number` ranges; `--out` is then a folder).
`--interactive` reads the global caption and then one shot prompt per line from stdin, writing
each shot's frames to a growing (fragmented) mp4 before asking for the next prompt.
At the end it prints FPS (with and without VAE decode) and first-frame latency (DESIGN 6).
"""

import json
import os
import sys
import time

from absl import flags
import jax
import numpy as np
from tqdm import tqdm

from shotstream_jax import cli
from shotstream_jax import pipeline as pipeline_lib
from shotstream_jax.data import prompts as prompts_lib
from shotstream_jax.io import video as video_lib

_CONFIG = cli.define_config_file('config', 'configs/shotstream.py:storyworld',
                                 'Config: configs/shotstream.py:<preset>.')
_PROMPTS = flags.DEFINE_string('prompts', 'configs/stories/storyworld.json',
                                'Story JSON or testset CSV.')
_OUT = flags.DEFINE_string('out', 'out/story.mp4', 'Output mp4 (a folder for a CSV).')
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed.')
_MODEL = cli.define_model_flags()
_INTERACTIVE = flags.DEFINE_bool('interactive', False, 'Read prompts from stdin, shot by shot.')
_SCAN = flags.DEFINE_bool('scan', False, 'Run each shot as one jitted lax.scan (no streaming).')
_WARMUP = flags.DEFINE_bool('warmup', True, 'Compile before timing (2 throwaway shots).')


def run_story(pipe, story, out_path, seed, scan=False, writer=None):
  """Generate `story` shot by shot into `out_path`; returns the session (with stats).
  Frames stream to the mp4 as they are decoded; `out_path` appears only when it is complete."""
  session = pipe.session(story.global_caption, seed, keep_history=False)
  own = video_lib.VideoWriter(out_path, fps=pipe.config.sampling.fps) if writer is None else None
  writer = writer or own
  try:
    with tqdm(total=len(story.shots) * pipe.sampler.num_chunks, unit='chunk',
              desc=os.path.basename(out_path)) as bar:
      for i, caption in enumerate(story.shots):
        bar.set_postfix(shot=f'{i + 1}/{len(story.shots)}')
        if scan:
          writer.write(session.run_shot(caption))
          bar.update(pipe.sampler.num_chunks)
          continue
        for frames in session.next_shot(caption):
          writer.write(frames)
          bar.update(1)
  except BaseException:
    if own is not None:
      own.abort()
    raise
  if own is not None:
    own.close()
  return session


def report(pipe, sessions, wall_s) -> dict:
  """FPS over the whole run (DESIGN 6), also without the time spent in VAE decode."""
  stats = [st for s in sessions for st in s.stats]
  frames = sum(st.frames for st in stats)
  decode_s = sum(st.decode_s for st in stats)
  return dict(frames=frames, wall_s=round(wall_s, 3), fps=round(frames / wall_s, 3),
              fps_without_decode=round(frames / (wall_s - decode_s), 3),
              first_frame_latency_s=round(float(np.median([st.first_frame_s for st in stats])), 3),
              compile_counts=dict(pipe.compile_counts),
              device=f'{jax.devices()[0].platform}: {jax.devices()[0].device_kind}')


def interactive(pipe, out_path, seed, lines):
  """stdin: a global caption, then a shot prompt per line; an empty line or EOF stops."""
  print('global caption (may be empty):', file=sys.stderr, flush=True)
  global_caption = next(lines, '').rstrip('\n')
  session = pipe.session(global_caption, seed, keep_history=False)
  with video_lib.VideoWriter(out_path, fps=pipe.config.sampling.fps, fragmented=True) as writer:
    while True:
      print(f'shot {len(session.captions) + 1} prompt (empty line ends):', file=sys.stderr,
            flush=True)
      prompt = next(lines, '').strip()
      if not prompt:
        break
      for frames in session.next_shot(prompt):
        writer.write(frames)
      st = session.stats[-1]
      print(f'shot {st.shot}: {st.frames} frames written to {out_path} (first frame after '
            f'{st.first_frame_s:.2f}s, shot {st.total_s:.2f}s)', file=sys.stderr, flush=True)
  if not session.stats:
    raise ValueError('--interactive: stdin gave no shot prompt (closed, or an empty line '
                     f'first); nothing was generated and {out_path} was not written')
  return session


def generate(config, prompts_path, out, seed, ckpt=None, vae=None, text_encoder=None,
             tokenizer=None, interactive_lines=None, scan=False, do_warmup=True) -> dict:
  """Library entry point of the CLI (tests call it); returns the timing report."""
  pipeline_lib.check_config(config)
  stories = []
  # Output paths first: a bad --out must fail in a line, before minutes of model building.
  out_is_dir = interactive_lines is None and bool(prompts_path) and \
      prompts_path.lower().endswith('.csv')
  out = cli.check_new_path(out, '--out', exist_ok=True,
                           suffixes=None if out_is_dir else ('.mp4',))
  if out_is_dir and os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f'--out: {out} is a file; with a CSV of stories --out is a folder')
  if interactive_lines is None:
    if not prompts_path:
      raise ValueError('--prompts: required (a story JSON or a testset CSV), or use '
                       '--interactive')
    if prompts_path.lower().endswith('.csv'):
      rows = prompts_lib.read_csv(prompts_path)
      stories = [(r.story, os.path.join(out, f'{i:03d}_{os.path.splitext(os.path.basename(r.json_path))[0]}.mp4'))
                 for i, r in enumerate(rows)]
    else:
      stories = [(prompts_lib.load_story(prompts_path), out)]
  pipe = cli.build_pipeline(config, ckpt, vae, text_encoder, tokenizer)
  if do_warmup:
    print(f'compiling (warm-up): {pipe.warmup():.1f}s', file=sys.stderr)
  start = time.perf_counter()
  if interactive_lines is not None:
    sessions = [interactive(pipe, out, seed, interactive_lines)]
  else:
    sessions = [run_story(pipe, story, path, seed, scan) for story, path in stories]
  result = report(pipe, sessions, time.perf_counter() - start)
  result['outputs'] = [path for _, path in stories] or [out]
  return result


def main(argv):
  del argv
  cli.quiet_logs()
  lines = iter(sys.stdin) if _INTERACTIVE.value else None
  result = cli.exit_on_user_error(
      generate, _CONFIG.value, _PROMPTS.value, _OUT.value, _SEED.value,
      *(h.value for h in _MODEL.values()), lines,
      _SCAN.value, _WARMUP.value)
  print(json.dumps(result, indent=1))


if __name__ == '__main__':
  cli.run(main)
