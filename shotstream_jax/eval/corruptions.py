"""Videos that must score low on the StoryWorld judge (eval/judge.py), for its tests and for the
harness's reference rows. Each renders a known story with one thing wrong.

    frames = swapped_protagonist(story, rng, height=32, width=32, frames_per_shot=21)
"""

import dataclasses

import numpy as np

from shotstream_jax.data import storyworld as sw

HIDDEN = ('texture', 'texture_colour', 'background')


def shuffled_shots(story: sw.Story, **render) -> np.ndarray:
  """Shots rotated by one (shot i shows shot i+1): every shot's framing contradicts its caption."""
  shots = story.shots[1:] + story.shots[:1]
  return sw.render_story(story, shots=shots, **render)


def _free_colours(story: sw.Story):
  p, s = story.protagonist, story.setting
  used = {p.colour, p.texture_colour, s.colour, s.pattern_colour}
  return [c for c in sw.COLOURS if c not in used]


def swapped_protagonist(story: sw.Story, rng: np.random.Generator, **render) -> np.ndarray:
  """From the second shot on, a different protagonist: other shape, colours and texture."""
  p = story.protagonist
  colours = rng.permutation(_free_colours(story))[:2]
  other = sw.Protagonist(
      shape=str(rng.choice([x for x in sw.SHAPES if x != p.shape])),
      colour=str(colours[0]), texture=str(rng.choice([x for x in sw.TEXTURES if x != p.texture])),
      texture_colour=str(colours[1]))
  return sw.render_story(story, protagonists=[p] + [other] * (len(story.shots) - 1), **render)


def changed_hidden(story: sw.Story, attribute: str, rng: np.random.Generator,
                   **render) -> np.ndarray:
  """From the second shot on, one never-captioned attribute changed (`HIDDEN`): the texture
  kind, the texture colour, or both setting colours. Captions stay true."""
  p, s = story.protagonist, story.setting
  free = list(rng.permutation(_free_colours(story)))
  if attribute == 'texture':
    later = [dataclasses.replace(p, texture=str(rng.choice(
        [t for t in sw.TEXTURES if t != p.texture and t != 'solid'] if p.texture == 'solid'
        else [t for t in sw.TEXTURES if t != p.texture])))]
  elif attribute == 'texture_colour':
    # A solid body shows no texture colour: give it stripes in the new colour.
    later = [dataclasses.replace(p, texture='stripes' if p.texture == 'solid' else p.texture,
                                 texture_colour=str(free[0]))]
  elif attribute == 'background':
    setting = dataclasses.replace(s, colour=str(free[0]), pattern_colour=str(free[1]))
    first = sw.render_story(story, shots=story.shots[:1], **render)
    rest = sw.render_story(dataclasses.replace(story, setting=setting), shots=story.shots[1:],
                           **render)
    return np.concatenate([first, rest])
  else:
    raise ValueError(f'attribute: {attribute!r}; accepted: {", ".join(HIDDEN)}')
  return sw.render_story(story, protagonists=[p] + later * (len(story.shots) - 1), **render)


def reframed(story: sw.Story, rng: np.random.Generator) -> sw.Story:
  """The same story with other framings (consecutive shots still differ): a legitimate change
  that must not cost identity. Render it and judge it against its own captions."""
  shots, framing = [], None
  for shot in story.shots:
    choices = [f for f in sw.FRAMINGS if f not in (framing, shot.framing)]
    framing = str(rng.choice(choices))
    shots.append(dataclasses.replace(shot, framing=framing))
  return dataclasses.replace(story, shots=tuple(shots))


def mixed_stories(stories, **render) -> np.ndarray:
  """Shot i taken from story i (each rendered with its own protagonist and setting)."""
  return np.concatenate([sw.render_story(st, shots=st.shots[i:i + 1], **render)
                         for i, st in enumerate(stories)])


def flickering(frames: np.ndarray, rng: np.random.Generator, amount: float = 0.25) -> np.ndarray:
  """Per-frame brightness jitter of +-amount."""
  gain = 1 + rng.uniform(-amount, amount, size=(frames.shape[0], 1, 1, 1))
  return np.clip(frames * gain, 0, 255).astype(np.uint8)


def uniform_noise(shape, rng: np.random.Generator) -> np.ndarray:
  return rng.integers(0, 256, size=shape, dtype=np.uint8)


def constant(shape, value=128) -> np.ndarray:
  return np.full(shape, value, np.uint8)
