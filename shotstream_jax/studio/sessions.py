"""Story sessions of the web studio, and the one worker that runs every session's shots.

    studio = Studio(pipe, StudioLimits())
    session = studio.open(send)             # send(message_dict): thread-safe, to one tab
    studio.handle(session, {'type': 'start', 'global_caption': 'A red circle in a street. '})
    studio.handle(session, {'type': 'shot', 'prompt': 'Wide shot of the circle; ...'})
    studio.close(session)                   # the tab went away: its queued shots are dropped

Why one worker: every tab shares one loaded model and one set of compiled functions
(`pipe.compile_counts` stays at one per function however many tabs and prompts), and the
accelerator runs one shot at a time anyway; a tab's shots run in the order it queued them and
tabs take turns shot by shot (FIFO). The queue is bounded (`StudioLimits.max_queued`): a shot
past it gets a "busy" message instead of waiting in memory, and so does a tab past
`max_sessions`. A closed tab's running shot stops at its next chunk and is forgotten (the
session's context never sees a half shot).
"""

import base64
import dataclasses
import itertools
import queue
import threading
import time
from typing import Callable, Dict, Optional

import numpy as np

Send = Callable[[dict], None]


@dataclasses.dataclass(frozen=True)
class StudioLimits:
  max_sessions: int = 8        # open tabs; one more is told the studio is busy
  max_queued: int = 8          # shots waiting for the worker, all tabs together
  max_prompt_chars: int = 400  # a shot prompt or global caption (StoryWorld's are ~60)
  pace_fps: float = 0.0        # > 0: stream no faster than this frame rate (0: as generated)
  seed: int = 0                # every story's seed (the same prompts give the same story)

  def __post_init__(self):
    # A queue of maxsize 0 is unbounded: the bound is what keeps memory flat under load.
    for name in ('max_sessions', 'max_queued', 'max_prompt_chars'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name}: must be >= 1, got {getattr(self, name)}')
    if self.pace_fps < 0:
      raise ValueError(f'pace_fps: must be >= 0, got {self.pace_fps}')


@dataclasses.dataclass
class Session:
  """One browser tab: its story (a pipeline StorySession) and what it has queued."""
  id: str
  send: Send
  story: Optional[object] = None      # pipeline.StorySession once a story started
  pending: int = 0                    # shots queued or running
  closed: bool = False


class StudioError(ValueError):
  """Bad input from a page: reported to that page as {'type': 'error', 'message': ...}."""


def frames_message(frames: np.ndarray) -> list:
  """uint8 [n, H, W, 3] -> one base64 string of raw RGB bytes per frame (the page draws them on
  a canvas; at 32x32 a frame is 3 KB, smaller and faster to decode than a PNG)."""
  return [base64.b64encode(np.ascontiguousarray(f).tobytes()).decode('ascii') for f in frames]


class Studio:
  """Sessions plus the worker thread (module docstring)."""

  def __init__(self, pipe, limits: StudioLimits = StudioLimits()):
    self.pipe = pipe
    self.limits = limits
    self.sessions: Dict[str, Session] = {}
    self._ids = itertools.count(1)
    self._lock = threading.Lock()
    self._jobs: 'queue.Queue' = queue.Queue(maxsize=limits.max_queued)
    self._worker = threading.Thread(target=self._work, name='studio-worker', daemon=True)
    self._worker.start()

  # ------------------------------------------------------------------ tabs

  def open(self, send: Send) -> Optional[Session]:
    """A new tab's session, or None (after a "busy" message to it) when there are too many."""
    with self._lock:
      if len(self.sessions) >= self.limits.max_sessions:
        send({'type': 'busy', 'message': f'the studio is busy: {len(self.sessions)} stories are '
                                         'open; try again when one closes'})
        return None
      session = Session(f's{next(self._ids)}', send)
      self.sessions[session.id] = session
    s = self.pipe.config.sampling
    send({'type': 'hello', 'session': session.id, 'height': s.height, 'width': s.width,
          'fps': s.fps, 'frames_per_shot': self.pipe.frames_per_shot,
          'max_prompt_chars': self.limits.max_prompt_chars})
    return session

  def close(self, session: Session) -> None:
    session.closed = True
    session.story = None
    with self._lock:
      self.sessions.pop(session.id, None)

  def get(self, session_id: str) -> Optional[Session]:
    return self.sessions.get(session_id)

  def queued(self) -> int:
    return self._jobs.qsize()

  def stop(self, timeout: float = 30.0) -> None:
    """Close every session and end the worker (their queued shots are dropped, a running one
    stops at its next chunk)."""
    for session in list(self.sessions.values()):
      self.close(session)
    self._jobs.put(None, timeout=timeout)   # the worker drains closed sessions' jobs quickly
    self._worker.join(timeout)

  # ------------------------------------------------------------------ messages

  def handle(self, session: Session, message) -> None:
    """One message from a tab; bad input becomes an error message to that tab."""
    try:
      self._handle(session, message)
    except StudioError as e:
      session.send({'type': 'error', 'message': str(e)})

  def _text(self, message: dict, field: str, required: bool) -> str:
    value = message.get(field, '')
    if not isinstance(value, str):
      raise StudioError(f'{field}: expected text, got {type(value).__name__}')
    value = value.strip()
    if required and not value:
      raise StudioError(f'{field}: empty; type what the next shot shows')
    if len(value) > self.limits.max_prompt_chars:
      raise StudioError(f'{field}: {len(value)} characters; at most '
                        f'{self.limits.max_prompt_chars} are accepted')
    return value

  def _handle(self, session: Session, message) -> None:
    if not isinstance(message, dict) or not isinstance(message.get('type'), str):
      raise StudioError('message: expected a JSON object with a "type" (start, shot, undo)')
    kind = message['type']
    if kind == 'start':
      caption = self._text(message, 'global_caption', required=False)
      if session.pending:
        raise StudioError('start: wait until the queued shots have finished')
      # The pipeline's convention: a global caption ends with a space before the shot text.
      session.story = self.pipe.session(caption + ' ' if caption else '', self.limits.seed)
      session.send({'type': 'started', 'global_caption': caption})
    elif kind == 'shot':
      prompt = self._text(message, 'prompt', required=True)
      if session.story is None:
        raise StudioError('shot: start a story first (a global caption, possibly empty)')
      with self._lock:   # the worker lowers `pending` from its thread
        try:
          self._jobs.put_nowait((session, session.story, prompt))
        except queue.Full:
          session.send({'type': 'busy', 'message': f'the studio is busy: {self.limits.max_queued}'
                                                   ' shots are queued; try again in a moment'})
          return
        session.pending += 1
      session.send({'type': 'queued', 'prompt': prompt, 'ahead': self._jobs.qsize() - 1})
    elif kind == 'undo':
      if session.story is None or not session.story.shot_lengths:
        raise StudioError('undo: no finished shot to undo')
      if session.pending:
        raise StudioError('undo: wait until the queued shots have finished')
      left = session.story.undo()
      session.send({'type': 'undone', 'shots': left})
    else:
      raise StudioError(f'type: unknown {kind!r}; accepted: start, shot, undo')

  # ------------------------------------------------------------------ worker

  def _work(self):
    while True:
      job = self._jobs.get()
      if job is None:
        return
      session, story, prompt = job
      try:
        if not session.closed and session.story is story:
          self._run_shot(session, story, prompt)
      except Exception as e:  # pylint: disable=broad-except  # a bad shot must not stop the studio
        session.send({'type': 'error', 'message': f'shot {prompt!r}: {type(e).__name__}: {e}'})
      finally:
        with self._lock:
          session.pending -= 1

  def _run_shot(self, session: Session, story, prompt: str):
    shot = len(story.shot_lengths) + 1
    session.send({'type': 'shot_start', 'shot': shot, 'prompt': prompt})
    pace = self.limits.pace_fps
    start = time.perf_counter()
    shown = 0
    stream = story.next_shot(prompt)
    for index, frames in enumerate(stream):
      if session.closed:
        stream.close()          # the half shot is forgotten by the session
        return
      shown += len(frames)
      if pace > 0:              # no faster than pace_fps: sleep until these frames are due
        time.sleep(max(0.0, shown / pace - (time.perf_counter() - start)))
      session.send({'type': 'chunk', 'shot': shot, 'chunk': index, 'frames': frames_message(frames),
                    'elapsed_s': round(time.perf_counter() - start, 4)})
    st = story.stats[-1]
    wall = time.perf_counter() - start
    session.send({'type': 'shot_done', 'shot': shot, 'prompt': prompt, 'frames': st.frames,
                  'first_frame_s': round(st.first_frame_s, 4), 'shot_s': round(wall, 4),
                  'fps': round(st.frames / wall, 2), 'paced_fps': pace,
                  'shots': len(story.shot_lengths)})
