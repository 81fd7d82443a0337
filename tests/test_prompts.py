"""Prompt formats: the reference demo files parse unchanged; malformed input names file/line/field."""

import json
import os

import pytest

from shotstream_jax.data import prompts

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'reference',
                    'shotstream_demo')
needs_demo = pytest.mark.skipif(not os.path.isdir(DEMO),
                                reason=f'reference demo folder absent: {os.path.normpath(DEMO)}')


def test_prompt_rule_is_zero_based_concatenation():
  s = prompts.Story('A story. ', ('first', 'second'))
  assert s.prompts() == ['A story. shot0:first', 'A story. shot1:second']


@needs_demo
def test_demo_testset_parses_unchanged():
  rows = prompts.read_csv(os.path.join(DEMO, 'testset.csv'))
  assert [r.line for r in rows] == [2, 3, 4, 5, 6, 7]
  assert [r.num_shots for r in rows] == [5, 5, 5, 6, 5, 5]
  assert [os.path.basename(r.json_path) for r in rows] == [
      '01.json', '05.json', '02.json', '03.json', '04.json', '06.json']
  for r in rows:
    assert r.frame_ranges == tuple((81 * i, 81 * (i + 1)) for i in range(r.num_shots))
    assert len(r.story.shots) == r.num_shots and r.story.global_caption
  with open(os.path.join(DEMO, 'json', '01.json')) as f:
    raw = json.load(f)
  p = rows[0].story.prompts()
  assert p[0] == raw['global_caption'] + 'shot0:' + raw['shot1']
  assert p[4] == raw['global_caption'] + 'shot4:' + raw['shot5']


@needs_demo
def test_demo_train_sample_parses():
  rows = prompts.read_csv(os.path.join(DEMO, 'train_sample.csv'), require_video=True,
                          resolve=False)
  assert len(rows) == 1
  assert rows[0].frame_ranges == ((0, 56), (56, 114), (114, 130), (130, 155), (170, 250))
  assert rows[0].video_path == 'demo/data/sample/0001.mp4'
  story = prompts.load_story(os.path.join(DEMO, 'train_sample_0001.json'), num_shots=5)
  assert len(story.shots) == 5 and story.shots[0].startswith('An underwater view')


def _write(tmp_path, name, text):
  p = tmp_path / name
  p.write_text(text)
  return str(p)


def _story(tmp_path, name='s.json', **fields):
  d = {'global_caption': 'G. ', 'shot1': 'a', 'shot2': 'b'}
  d.update(fields)
  d = {k: v for k, v in d.items() if v is not None}
  return _write(tmp_path, name, json.dumps(d))


HEADER = 'shot_num_from_caption,json_path,video_path,frame_number\n'


@pytest.mark.parametrize('fields,needle', [
    ({'shot1': None, 'shot2': None}, 'empty story'),
    ({'shot2': '  '}, 'shot2: empty prompt'),
    ({'global_caption': None}, 'global_caption: missing'),
    ({'global_caption': ''}, 'global_caption: must be a non-empty'),
    ({'shot2': None, 'shot3': 'c'}, 'shot2: missing'),
    ({'shot0': 'z'}, 'shot0: shots are numbered from shot1'),   # was dropped silently
])
def test_bad_story(tmp_path, fields, needle):
  path = _story(tmp_path, **fields)
  with pytest.raises(prompts.PromptFormatError, match=needle) as e:
    prompts.load_story(path)
  assert path in str(e.value)


def test_bad_json_syntax_names_line(tmp_path):
  path = _write(tmp_path, 'bad.json', '{\n "global_caption": "x",\n "shot1": "a",,\n}')
  with pytest.raises(prompts.PromptFormatError, match=r'bad\.json:3: invalid JSON'):
    prompts.load_story(path)


@pytest.mark.parametrize('row,needle', [
    ('2,s.json,v.mp4,"[[0, 9], [9"', 'line 3|:3: field frame_number: unparsable'),
    ('2,s.json,v.mp4,"[[0, 9], [5, 12]]"', ':3: field frame_number: range 1 .*non-increasing'),
    ('2,s.json,v.mp4,"[[0, 9], [12, 12]]"', ':3: field frame_number: range 1'),
    ('2,s.json,v.mp4,"[[0, 9.5], [12, 20]]"', ':3: field frame_number: frame ranges must be'),
    ('3,s.json,v.mp4,"[[0, 9], [9, 18]]"', ':3: field frame_number: 2 ranges but'),
    ('x,s.json,v.mp4,"[[0, 9], [9, 18]]"', ':3: field shot_num_from_caption'),
    ('2,nope.json,v.mp4,"[[0, 9], [9, 18]]"', ':3: field json_path: nope.json not found'),
    ('2,,v.mp4,"[[0, 9], [9, 18]]"', ':3: field json_path: empty'),
    ('2,s.json,,"[[0, 9], [9, 18]]"', ':3: field video_path: empty'),
    ('2,s.json,v.mp4', ':3: expected 4 fields'),
    ('3,empty.json,v.mp4,"[[0, 9], [9, 18], [20, 30]]"', ':3: field json_path: .*shot3: missing'),
])
def test_bad_csv_row_names_file_line_field(tmp_path, row, needle):
  _story(tmp_path)
  _story(tmp_path, name='empty.json')
  good = '2,s.json,v.mp4,"[[0, 9], [12, 20]]"\n'
  path = _write(tmp_path, 'data.csv', HEADER + good + row + '\n')
  with pytest.raises(prompts.PromptFormatError, match=needle) as e:
    prompts.read_csv(path, require_video=True)
  assert str(e.value).startswith(path)


def test_bad_csv_header_and_empty(tmp_path):
  path = _write(tmp_path, 'h.csv', 'shot_num_from_caption,json_path\n1,a.json\n')
  with pytest.raises(prompts.PromptFormatError, match=r'h\.csv:1: header lacks column frame_number'):
    prompts.read_csv(path)
  path = _write(tmp_path, 'e.csv', HEADER)
  with pytest.raises(prompts.PromptFormatError, match='no data rows'):
    prompts.read_csv(path)


def test_gaps_allowed_and_paths_relative_to_csv(tmp_path):
  sub = tmp_path / 'sub'
  sub.mkdir()
  _story(tmp_path)
  path = _write(sub, 'data.csv', HEADER + '2,s.json,v.mp4,"[[0, 56], [70,114]]"\n')
  (row,) = prompts.read_csv(path, require_video=True)
  assert row.frame_ranges == ((0, 56), (70, 114))
  assert row.json_path == str(tmp_path / 's.json')  # found in the CSV folder's parent
  assert row.story.shots == ('a', 'b') and row.line == 2


def _words(text):
  return len(text.replace(':', ' ').split())    # a tokenizer with one token per word


def test_fit_shot_prompt_keeps_the_shot_and_as_much_global_as_fits():
  g = ' '.join(f'g{i}' for i in range(30)) + '. '
  assert prompts.fit_shot_prompt('A B. ', 1, 'x y', _words, 10) == ('A B. shot1:x y', 0)
  prompt, cut = prompts.fit_shot_prompt(g, 2, 'pan left', _words, 10)
  assert prompt == 'g0 g1 g2 g3 g4 g5 g6 shot2:pan left' and _words(prompt) == 10
  assert cut == _words(prompts.shot_prompt(g, 2, 'pan left')) - 10 == 23
  prompt, cut = prompts.fit_shot_prompt(g, 0, ' '.join(['w'] * 12), _words, 10)
  assert prompt.startswith('shot0:') and cut == 30 + 13 - 10   # the shot alone is too long
