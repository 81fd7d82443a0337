"""launch/generate.py as a user runs it: the reference demo files, flags, stdin, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from shotstream_jax.io import video as video_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(os.path.dirname(REPO), 'shared', 'reference', 'shotstream_demo')
FRAMES_PER_SHOT = 21  # tiny: 6 latent frames -> 1 + 4 * 5 pixel frames


def run_cli(*args, stdin=None, timeout=600):
  return subprocess.run([sys.executable, 'launch/generate.py', *args], cwd=REPO, input=stdin,
                        capture_output=True, text=True, timeout=timeout)


def last_json(stdout):
  return json.loads(stdout[stdout.index('{'):])


@pytest.fixture
def story(tmp_path):
  path = tmp_path / 'story.json'
  path.write_text(json.dumps({'global_caption': 'A lighthouse at dusk. ',
                              'shot1': 'wide shot of the sea', 'shot2': 'close-up of the lamp'}))
  return str(path)


@pytest.mark.skipif(not os.path.isdir(DEMO), reason='shared/reference demo files not present')
def test_reference_testset_csv_runs_unchanged(tmp_path):
  res = run_cli('--config=configs/shotstream.py:tiny', f'--prompts={DEMO}/testset.csv',
                f'--out={tmp_path}/videos', '--nowarmup')
  assert res.returncode == 0, res.stderr[-3000:]
  report = last_json(res.stdout)
  shots = {'01': 5, '05': 5, '02': 5, '03': 6, '04': 5, '06': 5}  # testset.csv's frame ranges
  assert len(report['outputs']) == 6
  for path in report['outputs']:
    name = os.path.basename(path).split('_')[1][:2]
    frames = video_lib.read_video(path)
    assert frames.shape == (shots[name] * FRAMES_PER_SHOT, 64, 96, 3), path
  assert report['frames'] == sum(shots.values()) * FRAMES_PER_SHOT
  assert report['compile_counts'] == {'text_kv': 1, 'prefill': 1, 'chunk': 1,
                                      'encode_context': 1, 'decode': 2}
  for key in ('fps', 'fps_without_decode', 'first_frame_latency_s'):
    assert report[key] > 0


@pytest.mark.skipif(not os.path.isdir(DEMO), reason='shared/reference demo files not present')
def test_reference_json_and_theta_flag(tmp_path, story):
  res = run_cli('--config=configs/shotstream.py:tiny', f'--prompts={DEMO}/json/03.json',
                f'--out={tmp_path}/03.mp4', '--nowarmup')
  assert res.returncode == 0, res.stderr[-3000:]
  assert video_lib.read_video(f'{tmp_path}/03.mp4').shape[0] == 6 * FRAMES_PER_SHOT
  outs = {}
  for name, flags in (('default', []), ('theta0', ['--config.model.rope.theta=0'])):
    res = run_cli('--config=configs/shotstream.py:tiny', f'--prompts={story}',
                  f'--out={tmp_path}/{name}.mp4', '--nowarmup', *flags)
    assert res.returncode == 0, res.stderr[-3000:]
    outs[name] = video_lib.read_video(f'{tmp_path}/{name}.mp4').astype(int)
  assert outs['default'].shape == (2 * FRAMES_PER_SHOT, 64, 96, 3)
  assert np.abs(outs['default'] - outs['theta0']).mean() > 1.0  # the RoPE phase matters


def test_interactive_stdin(tmp_path):
  res = run_cli('--config=configs/shotstream.py:tiny', '--interactive', '--nowarmup',
                f'--out={tmp_path}/live.mp4',
                stdin='A quiet harbour. \nboats at dawn\na gull lands\n\n')
  assert res.returncode == 0, res.stderr[-3000:]
  assert 'shot 1: 21 frames written' in res.stderr and 'shot 2: 21 frames written' in res.stderr
  assert video_lib.read_video(f'{tmp_path}/live.mp4').shape[0] == 2 * FRAMES_PER_SHOT


@pytest.mark.parametrize('stdin', ['', '\n', 'A harbour. \n\n'])
def test_interactive_without_a_shot_fails(tmp_path, stdin):
  res = run_cli('--config=configs/shotstream.py:tiny', '--interactive', '--nowarmup',
                f'--out={tmp_path}/live.mp4', stdin=stdin)
  assert res.returncode == 2, res.stderr[-2000:]
  assert res.stderr.strip().splitlines()[-1].startswith('error: --interactive: stdin gave no')
  assert not os.path.exists(tmp_path / 'live.mp4') and '{' not in res.stdout


@pytest.mark.parametrize('case', ['missing', 'bad_json', 'empty_story', 'bad_csv', 'no_text',
                                  'bad_ckpt', 'resolution', 'out_txt', 'out_no_suffix',
                                  'out_is_dir', 'out_under_file', 'fps0', 'shot_frames0',
                                  'preset', 'unknown_field', 'field_type', 'config_file'])
def test_bad_input_one_line(tmp_path, story, case):
  bad_json = tmp_path / 'bad.json'
  bad_json.write_text('{"global_caption": "x",\n "shot1": }')
  empty = tmp_path / 'empty.json'
  empty.write_text('{"global_caption": "x"}')
  csv = tmp_path / 'bad.csv'
  csv.write_text('shot_num_from_caption,json_path,frame_number\n2,empty.json,"[[0, 81]"\n')
  ckpt = tmp_path / 'dit.pt'
  ckpt.write_bytes(b'not a checkpoint')
  args, expected = {
      'missing': ([f'--prompts={tmp_path}/nope.json'], 'cannot read story JSON'),
      'bad_json': ([f'--prompts={bad_json}'], 'bad.json:2: invalid JSON'),
      'empty_story': ([f'--prompts={empty}'], 'empty story'),
      'bad_csv': ([f'--prompts={csv}'], 'bad.csv'),
      # --ckpt alone is fine at tiny (embedded encoders); a partial set names what is missing.
      'no_text': ([f'--prompts={story}', f'--ckpt={ckpt}', f'--vae={ckpt}'],
                  '--text_encoder: required with --ckpt'),
      'bad_ckpt': ([f'--prompts={story}', f'--ckpt={ckpt}'], 'cannot read'),
      'resolution': ([f'--prompts={story}', '--config.sampling.height=72'],
                     'sampling.height: must be a positive multiple of 16'),
      # --out is checked before any model is built (it used to fail after, in ffmpeg).
      'out_txt': ([f'--prompts={story}', f'--out={tmp_path}/o.txt'], '--out: '),
      'out_no_suffix': ([f'--prompts={story}', f'--out={tmp_path}/o'], 'must end in .mp4'),
      'out_is_dir': ([f'--prompts={story}', f'--out={tmp_path}'], 'is a directory'),
      'out_under_file': ([f'--prompts={story}', f'--out={ckpt}/o.mp4'], 'is a file'),
      'fps0': ([f'--prompts={story}', '--config.sampling.fps=0'], 'sampling.fps: must be'),
      'shot_frames0': ([f'--prompts={story}', '--config.sampling.shot_latent_frames=0'],
                       'sampling.shot_latent_frames: must be >= 1'),
      # flag parsing (absl + ml_collections) used to print a traceback for these
      'preset': ([f'--prompts={story}', '--config=configs/shotstream.py:bogus'],
                 "--config=configs/shotstream.py:bogus: config preset: unknown preset 'bogus'"),
      'unknown_field': ([f'--prompts={story}', '--config.sampling.nope=1'],
                        "--config.sampling.nope: unknown config field 'nope'"),
      'field_type': ([f'--prompts={story}', '--config.sampling.fps=abc'],
                     '--config.sampling.fps=abc: invalid literal'),
      'config_file': ([f'--prompts={story}', '--config=configs/nope.py'],
                      "--config: [Errno 2] No such file or directory: 'configs/nope.py'"),
  }[case]
  res = run_cli('--config=configs/shotstream.py:tiny', f'--out={tmp_path}/o.mp4', *args,
                timeout=300)
  assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and expected in last, last
  assert 'Traceback' not in res.stderr


def test_truncated_checkpoint_is_named(tmp_path, story):
  ckpt = tmp_path / 'dit.pt'
  ckpt.write_bytes(b'PK\x03\x04 truncated')
  res = run_cli('--config=configs/shotstream.py:tiny', f'--prompts={story}', f'--ckpt={ckpt}',
                '--vae=v.pth', '--text_encoder=t.pth', f'--tokenizer={tmp_path}',
                f'--out={tmp_path}/o.mp4', timeout=300)
  assert res.returncode == 2, res.stderr[-2000:]
  last = res.stderr.strip().splitlines()[-1]
  assert 'checkpoint: cannot read' in last and 'dit.pt' in last, last


def test_compilation_cache_is_written_then_reused(tmp_path, story):
  """--compilation_cache: the first run writes XLA's programs, a second identical run finds
  every one of them (it adds no entry: JAX writes each miss, the suite's threshold being 0
  seconds) and writes the same video; a folder that cannot be created is one line."""
  cache = tmp_path / 'xla'
  args = ('--config=configs/shotstream.py:tiny', f'--prompts={story}', '--nowarmup',
          f'--compilation_cache={cache}')
  first = run_cli(*args, f'--out={tmp_path}/a.mp4')
  assert first.returncode == 0, first.stderr[-3000:]
  written = sorted(os.listdir(cache))
  assert len(written) >= 5, written            # text K/V, prefill, chunk, decode, encode ...
  second = run_cli(*args, f'--out={tmp_path}/b.mp4')
  assert second.returncode == 0, second.stderr[-3000:]
  assert sorted(os.listdir(cache)) == written
  np.testing.assert_array_equal(video_lib.read_video(f'{tmp_path}/a.mp4'),
                                video_lib.read_video(f'{tmp_path}/b.mp4'))
  (tmp_path / 'file').write_text('x')
  bad = run_cli(*args[:3], f'--compilation_cache={tmp_path}/file/xla', f'--out={tmp_path}/c.mp4')
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [
      f'error: --compilation_cache: cannot create {tmp_path}/file/xla: Not a directory']
