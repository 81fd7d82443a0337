"""The studio's ASGI app: one page, one websocket per tab, the story so far as mp4.

    app = make_app(Studio(pipe, StudioLimits()))
    uvicorn.run(app, host='127.0.0.1', port=8000)      # launch/studio.py does this

Why FastAPI + websockets (README, "Studio"): a shot streams as a few chunk messages per
second that the server pushes as soon as each is decoded, and prompts travel the other way
at any time; one websocket per tab carries both, and its lifetime is the session's (a closed
tab ends it). A page of plain HTML and JavaScript draws the raw frames on a canvas: no build
step, nothing fetched from elsewhere.

Protocol (JSON text messages). Page -> server: {"type": "start", "global_caption"},
{"type": "shot", "prompt"}, {"type": "undo"}. Server -> page: hello, started, queued,
shot_start, chunk (frames as base64 raw RGB), shot_done (latency, FPS), undone, error, busy.
"""

import asyncio
import json
import os
import tempfile

import fastapi
from fastapi import responses

from shotstream_jax.io import video as video_lib
from shotstream_jax.studio import sessions as sessions_lib

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'page.html')


def story_mp4(session, fps: int) -> bytes:
  """The finished shots of a session as mp4 bytes."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'story.mp4')
    video_lib.write_video(path, session.story.video(), fps=fps)
    with open(path, 'rb') as f:
      return f.read()


def make_app(studio: sessions_lib.Studio) -> fastapi.FastAPI:
  app = fastapi.FastAPI(title='shotstream_jax studio', docs_url=None, redoc_url=None)
  with open(PAGE) as f:
    page = f.read()

  @app.get('/')
  def index():
    return responses.HTMLResponse(page)

  @app.get('/status')
  def status():
    return {'sessions': len(studio.sessions), 'queued': studio.queued(),
            'compile_counts': dict(studio.pipe.compile_counts)}

  @app.get('/story/{session_id}.mp4')
  def download(session_id: str):
    session = studio.get(session_id)
    if session is None or session.story is None or not session.story.shot_lengths:
      raise fastapi.HTTPException(404, 'no finished shot in this story yet')
    data = story_mp4(session, studio.pipe.config.sampling.fps)
    return responses.Response(data, media_type='video/mp4', headers={
        'Content-Disposition': f'attachment; filename="story_{session_id}.mp4"'})

  @app.websocket('/ws')
  async def websocket(ws: fastapi.WebSocket):
    await ws.accept()
    loop = asyncio.get_running_loop()
    outbox: asyncio.Queue = asyncio.Queue()
    send = lambda message: loop.call_soon_threadsafe(outbox.put_nowait, message)

    async def pump():
      while True:
        message = await outbox.get()
        await ws.send_text(json.dumps(message))
        if message.get('type') == 'busy' and session is None:
          await ws.close()
          return

    session = studio.open(send)
    sender = asyncio.create_task(pump())
    if session is None:
      await sender            # delivers the busy message, then closes
      return
    try:
      while True:
        received = await ws.receive()
        if received['type'] == 'websocket.disconnect':
          break
        try:
          message = json.loads(received.get('text') or '')
        except ValueError:
          send({'type': 'error', 'message': 'message: not JSON text; expected {"type": ...}'})
          continue
        studio.handle(session, message)
    except fastapi.WebSocketDisconnect:
      pass
    finally:
      studio.close(session)
      sender.cancel()

  return app
