"""Streaming generation: cached chunk forward vs the block-causal full forward, scan vs
per-chunk streaming, one compilation per story, context selection and bad input."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shotstream
from shotstream_jax import context
from shotstream_jax import pipeline as pipeline_lib
from shotstream_jax.models import cache as cache_lib
from shotstream_jax.models import dit
from shotstream_jax.sampling import causal
from shotstream_jax.sampling import schedule

sys.path.insert(0, os.path.dirname(__file__))
import model_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position

ATOL = 3e-5


@pytest.mark.parametrize('earlier_shots', [[], [9, 9]], ids=['first_shot', 'third_shot'])
def test_cached_chunks_equal_block_causal_forward(earlier_shots):
  """Prefill + chunk-by-chunk with both caches == one masked forward over the whole sequence."""
  cfg = shotstream.get_config('tiny')
  cfg.model.rope.theta = 0.3
  cfg.model.rope.position_gap = 2
  cfg.sampling.shot_latent_frames = 9
  cfg.sampling.local_frames = 9
  m = cfg.model
  params = model_fixtures.random_dit(m)
  sampler = causal.CausalSampler(m, cfg.sampling, (4, 6))
  choice = context.choose_context(earlier_shots, m.context_frames)
  rng = np.random.default_rng(len(earlier_shots))
  cf, n, f = m.context_frames, m.chunk_frames, cfg.sampling.shot_latent_frames
  rows = jnp.asarray(rng.standard_normal((cf + 1, 9, m.text_dim)), jnp.float32)
  ctx = jnp.asarray(rng.standard_normal((1, cf, 4, 6, 16)) * bool(earlier_shots), jnp.float32)
  xs = jnp.asarray(rng.standard_normal((1, f, 4, 6, 16)), jnp.float32)
  t_chunks = rng.uniform(0, 1000, f // n).astype(np.float32)
  plan = causal.ShotPlan(ctx, jnp.asarray([choice.ctx_shot]), jnp.asarray([choice.ctx_caption]),
                         jnp.asarray([choice.gen_shot]), jnp.asarray([choice.gen_caption]),
                         dit.WanTextKV(m).apply({'params': params}, rows))

  full = dit.WanDiT(m).apply(
      {'params': params}, jnp.concatenate([ctx, xs], axis=1),
      jnp.concatenate([jnp.zeros(cf), jnp.repeat(t_chunks, n)])[None], rows,
      frame_pos=jnp.arange(cf + f),
      frame_shot=jnp.asarray(list(choice.ctx_shot) + [choice.gen_shot] * f),
      frame_caption=jnp.asarray(list(choice.ctx_caption) + [choice.gen_caption] * f),
      attention='block_causal', chunk_frames=n, context_frames=cf)

  global_cache = sampler.prefill(params, plan)
  local = sampler.init_local(1)
  for c in range(f // n):
    v, kv = sampler.forward(params, plan, global_cache, local, c, xs[:, c * n:(c + 1) * n],
                            jnp.full((1, n), t_chunks[c]), return_kv=True)
    np.testing.assert_allclose(v, full[:, cf + c * n:cf + (c + 1) * n], atol=ATOL)
    local = sampler.write_local(local, kv, c)
  assert int(local.length) == f * sampler.tokens_per_frame


def test_local_window_is_a_ring_buffer():
  """local_frames < shot: chunk c sees the context, chunk c-1 and itself (sliding window)."""
  cfg = shotstream.get_config('tiny')
  cfg.sampling.shot_latent_frames = 9
  cfg.sampling.local_frames = 3
  m = cfg.model
  params = model_fixtures.random_dit(m, seed=3)
  sampler = causal.CausalSampler(m, cfg.sampling, (4, 6))
  choice = context.choose_context([], m.context_frames)
  rows = jnp.asarray(np.random.default_rng(5).standard_normal((7, 9, m.text_dim)), jnp.float32)
  plan = causal.ShotPlan(jnp.zeros((1, 6, 4, 6, 16)), jnp.asarray([choice.ctx_shot]),
                         jnp.asarray([choice.ctx_caption]), jnp.asarray([choice.gen_shot]),
                         jnp.asarray([choice.gen_caption]),
                         dit.WanTextKV(m).apply({'params': params}, rows))
  xs = jnp.asarray(np.random.default_rng(6).standard_normal((1, 9, 4, 6, 16)), jnp.float32)
  t = jnp.full((1, 3), 500.0)
  g = sampler.prefill(params, plan)
  local, kvs = sampler.init_local(1), []
  for c in range(3):
    v, kv = sampler.forward(params, plan, g, local, c, xs[:, 3 * c:3 * c + 3], t, return_kv=True)
    kvs.append(kv)
    local = sampler.write_local(local, kv, c)
    assert int(local.length) == min(3 * (c + 1), 3) * sampler.tokens_per_frame
  # Independently: chunk 2 with only chunk 1's K/V as the local segment.
  k1, v1 = kvs[1]
  window = cache_lib.from_kv((k1, v1))
  v_ref = sampler.forward(params, plan, g, window, 2, xs[:, 6:9], t)
  v_ring = sampler.forward(params, plan, g, sampler.write_local(
      sampler.write_local(sampler.init_local(1), kvs[0], 0), kvs[1], 1), 2, xs[:, 6:9], t)
  np.testing.assert_allclose(v_ring, v_ref, atol=ATOL)


def test_schedule_is_the_reference():
  t, sigma = schedule.sampling_schedule(shotstream.get_config('wan_1_3b').sampling)
  np.testing.assert_allclose(t, [1000.0, 957.93, 888.89, 737.59], atol=0.01)
  np.testing.assert_allclose(sigma, t / 1000, rtol=1e-6)
  grid = schedule.shifted_grid()
  assert grid.shape == (1000,) and grid[0] == 1.0 and grid[-1] > 0
  with pytest.raises(ValueError, match='sampling.denoising_steps: must be strictly decreasing'):
    schedule.denoising_sigmas([500, 740])


def test_context_choice_rule():
  assert context.frame_budget(4, 6) == [1, 1, 2, 2]
  assert context.frame_budget(8, 6) == [0, 0, 1, 1, 1, 1, 1, 1]
  first = context.choose_context([], 6)
  assert first.frame_indices == () and first.ctx_shot == (0,) * 6 and first.gen_shot == 1
  assert set(first.caption_shots) == {0}
  c = context.choose_context([81, 81, 81, 81], 6)
  assert c.frame_indices == (0, 81, 162, 242, 243, 323)
  assert c.ctx_shot == (0, 1, 2, 2, 3, 3) and c.gen_shot == 4
  assert c.caption_shots[:5] == (0, 1, 2, 3, 4) and c.gen_caption == 4
  many = context.choose_context([5] * 8, 6)  # 8 earlier shots: shots 0 and 1 get no frame
  assert many.ctx_shot == (2, 3, 4, 5, 6, 7) and many.gen_shot == 8
  assert many.caption_shots[many.ctx_caption[0]] == 2 and many.caption_shots[many.gen_caption] == 8


@pytest.fixture(scope='module')
def pipe():
  return pipeline_lib.ShotStreamPipeline.from_random(shotstream.get_config('tiny'), seed=0)


def test_scan_equals_streaming_and_compiles_once(pipe):
  prompts = ['a red fox in snow', 'the fox jumps', 'close-up of its eyes', 'a wide valley',
             'night falls']
  s1 = pipe.session('A fox story. ', seed=3)
  chunks = [frames for p in prompts for frames in s1.next_shot(p)]
  assert len(chunks) == 5 * pipe.sampler.num_chunks
  assert chunks[0].shape[0] == 1 + 4 * (pipe.sampler.chunk_frames - 1)  # first chunk of a shot
  assert dict(pipe.compile_counts) == {'text_kv': 1, 'prefill': 1, 'chunk': 1,
                                      'encode_context': 1, 'decode': 2}
  encodes = pipe.prompt_encoder.encode_calls
  s2 = pipe.session('A fox story. ', seed=3)
  for p in prompts:
    s2.run_shot(p)
  counts = dict(pipe.compile_counts)
  assert counts['shot'] == 1 and counts['decode'] == 3  # + the whole-shot decode
  assert pipe.prompt_encoder.encode_calls == encodes  # same prompts: all cached
  for a, b in zip(s1.latents, s2.latents):
    np.testing.assert_allclose(a, b, atol=1e-5)
  v1, v2 = s1.video(), s2.video()
  assert v1.shape == v2.shape == (5 * pipe.frames_per_shot, 64, 96, 3)
  assert np.abs(v1.astype(int) - v2).max() <= 1
  # Another story with new prompts reuses every compiled function.
  s3 = pipe.session('Another story. ', seed=4)
  for p in ['one', 'two']:
    for _ in s3.next_shot(p):
      pass
  assert {k: pipe.compile_counts[k] for k in counts} == counts
  assert not np.array_equal(s3.latents[0], s1.latents[0])


def test_generate_story_forms(pipe):
  story = {'global_caption': 'G. ', 'shot1': 'a', 'shot2': 'b'}
  a = pipe.generate(story, seed=1)
  assert a.shape == (2 * pipe.frames_per_shot, 64, 96, 3) and a.dtype == np.uint8
  b = pipe.generate(['a', 'b'], seed=1)  # list form: empty global caption
  assert b.shape == a.shape and not np.array_equal(a, b)
  np.testing.assert_array_equal(pipe.generate(story, seed=1), a)  # deterministic


def test_bad_inputs(pipe):
  cases = [
      (lambda: pipe.generate([]), 'story: empty story'),
      (lambda: pipe.generate(['ok', '  ']), 'story: shot 2 has an empty prompt'),
      (lambda: pipe.generate({'global_caption': 'g'}), 'empty story'),
      (lambda: pipe.generate('just a string'), 'story: expected a reference JSON dict'),
      (lambda: list(pipe.session('g').next_shot('')), 'prompt: shot 1 has an empty prompt'),
      (lambda: pipe.session('g').video(), 'story: no shot has been generated yet'),
  ]
  for fn, msg in cases:
    with pytest.raises(ValueError, match=msg):
      fn()
  cfg = shotstream.get_config('tiny')
  cfg.sampling.height = 72
  with pytest.raises(ValueError, match='sampling.height: must be a positive multiple of 16'):
    pipeline_lib.ShotStreamPipeline(cfg, pipe.dit_params, pipe.vae_params, pipe.prompt_encoder)
  cfg = shotstream.get_config('tiny')
  cfg.model.chunk_frames = 4
  with pytest.raises(ValueError, match=r'model.chunk_frames: must divide sampling.shot_latent_'):
    pipeline_lib.ShotStreamPipeline(cfg, pipe.dit_params, pipe.vae_params, pipe.prompt_encoder)
  cfg = shotstream.get_config('tiny')
  cfg.sampling.local_frames = 4
  with pytest.raises(ValueError, match='sampling.local_frames: must be a positive multiple'):
    pipeline_lib.ShotStreamPipeline(cfg, pipe.dit_params, pipe.vae_params, pipe.prompt_encoder)


def test_long_global_caption_never_erases_the_shot_prompt(pipe, caplog):
  """Past text_len the global caption is cut, not the shot prompt: shots stay distinct."""
  tok = pipe.prompt_encoder.tokenizer
  g = 'a very long global caption about the harbour and its boats ' * 80
  assert tok.num_tokens(g) > tok.text_len
  s = pipe.session(g + '. ', seed=0)
  s.captions += ['shot prompt number 0', 'shot prompt number 1']
  rows = pipe.prompt_encoder([s._prompt(0), s._prompt(1)])
  assert set(s.prompt_cuts) == {0, 1} and all(c > 0 for c in s.prompt_cuts.values())
  assert 'cut from the end of the global caption' in caplog.text
  assert all(tok.num_tokens(s._prompt(i)) <= tok.text_len - 1 for i in range(2))
  assert s._prompt(1).endswith('shot1:shot prompt number 1')
  assert float(jnp.abs(rows[0] - rows[1]).max()) > 1e-3      # the reference rule gives 0 here
  short = pipe.session('G. ', seed=0)
  short.captions.append('a')
  assert short._prompt(0) == 'G. shot0:a' and not short.prompt_cuts


def test_abandoned_stream_is_forgotten(pipe):
  """Stopping a shot's stream part-way leaves the session as if that shot never happened."""
  s = pipe.session('G. ', seed=2)
  for _ in s.next_shot('first'):
    pass
  stream = s.next_shot('abandoned')
  next(stream)
  stream.close()
  for _ in s.next_shot('second'):
    pass
  ref = pipe.session('G. ', seed=2)
  ref.run_shot('first')
  ref.run_shot('second')
  assert s.captions == ['first', 'second'] and len(s.stats) == 2
  assert s.video().shape == ref.video().shape
  np.testing.assert_allclose(s.latents[1], ref.latents[1], atol=1e-5)


def test_undo_restores_the_context_of_a_long_story(pipe):
  """Undoing shot 8 (budget 6: finishing it made shot 2's frames unselectable) gives them back:
  shot 8 again, on the same prompt, is the shot it was; and a different prompt sees the same
  context as a session that never had the undone shot."""
  assert pipe.budget == 6
  prompts = [f'shot number {i}' for i in range(1, 9)]
  s = pipe.session('G. ', seed=3)
  for p in prompts:
    s.run_shot(p)
  eighth = s.latents[-1]
  assert s.undo() == 7 and len(s.video()) == 7 * pipe.frames_per_shot
  assert s.captions == prompts[:7] and len(s.stats) == 7
  s.run_shot(prompts[7])
  np.testing.assert_array_equal(s.latents[-1], eighth)
  s.undo()
  s.run_shot('another ending')
  ref = pipe.session('G. ', seed=3)
  for p in prompts[:7] + ['another ending']:
    ref.run_shot(p)
  np.testing.assert_array_equal(s.latents[-1], ref.latents[-1])
  for _ in range(8):
    s.undo()
  with pytest.raises(ValueError, match='undo: no shot to undo'):
    s.undo()
  with pytest.raises(ValueError, match='keeps no history'):
    pipe.session('G. ', keep_history=False).undo()


def _rss_mb():
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) for l in f if l.startswith('VmRSS:')) / 1024


def _held_bytes(session):
  arrays = list(session._candidates.values()) + session._video + session.latents
  return sum(a.nbytes for a in arrays)


@pytest.mark.skipif(not os.path.exists('/proc/self/status'), reason='needs /proc (Linux)')
def test_memory_is_bounded_over_40_shots(pipe):
  """keep_history=False (what the CLI streams with): after shot 8 nothing more is held, and the
  process RSS after shot 40 is within 10% of that after shot 8. 40 shots also walk the context
  rule far past the budget: a pruned frame it still needed would raise a KeyError."""
  s = pipe.session('A long story. ', seed=0, keep_history=False)
  held, rss = {}, {}
  for shot in range(1, 41):
    for _ in s.next_shot(f'shot number {shot}'):
      pass
    held[shot], rss[shot] = _held_bytes(s), _rss_mb()
  assert held[40] == held[8] > 0 and max(held.values()) == held[8]
  assert rss[40] <= 1.10 * rss[8], (rss[8], rss[40])
  assert len(s._candidates) <= sum(range(1, pipe.budget + 1)) * pipe.budget
  with pytest.raises(ValueError, match='keeps no history'):
    s.video()


def test_filled_local_attention_equals_masked():
  """sampling.local_attention 'filled' (attend to the filled chunks only) and 'masked' (the
  whole capacity under a mask) give the same shot: 3 chunks, so fills 0, 1 and 2 all run."""
  cfg = shotstream.get_config('tiny')
  cfg.sampling.shot_latent_frames = cfg.sampling.local_frames = 9
  params = model_fixtures.random_dit(cfg.model)
  m, rng = cfg.model, np.random.default_rng(0)
  choice = context.choose_context([9], m.context_frames)
  rows = jnp.asarray(rng.standard_normal((m.context_frames + 1, 9, m.text_dim)), jnp.float32)
  plan = causal.ShotPlan(
      jnp.asarray(rng.standard_normal((1, m.context_frames, 4, 6, 16)), jnp.float32),
      jnp.asarray([choice.ctx_shot]), jnp.asarray([choice.ctx_caption]),
      jnp.asarray([choice.gen_shot]), jnp.asarray([choice.gen_caption]),
      dit.WanTextKV(m).apply({'params': params}, rows))
  shots = {}
  for mode in ('filled', 'masked'):
    cfg.sampling.local_attention = mode
    sampler = causal.CausalSampler(m, cfg.sampling, (4, 6))
    shots[mode] = jax.jit(sampler.shot)(params, plan, jax.random.key(1))
  np.testing.assert_allclose(shots['filled'], shots['masked'], atol=ATOL)
  cfg.sampling.local_attention = 'sparse'
  with pytest.raises(ValueError, match='sampling.local_attention: unknown'):
    causal.CausalSampler(m, cfg.sampling, (4, 6))
