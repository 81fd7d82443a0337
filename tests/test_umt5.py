"""umT5 encoder, importer, tokenizer and prompt cache vs transformers (DESIGN 4.6, 5)."""

import io
import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shotstream
from shotstream_jax import text as text_lib
from shotstream_jax.convert import common
from shotstream_jax.convert import umt5 as convert
from shotstream_jax.models import tokenizer as tokenizer_lib
from shotstream_jax.models import umt5

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')


def _tiny(**overrides):
  cfg = shotstream.get_config('tiny').text
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _hf_config(cfg):
  return transformers.UMT5Config(
      vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
      num_layers=cfg.num_layers, num_heads=cfg.num_heads,
      relative_attention_num_buckets=cfg.relative_buckets,
      relative_attention_max_distance=cfg.relative_max_distance, feed_forward_proj='gated-gelu',
      layer_norm_epsilon=cfg.eps, dropout_rate=0.0)


def _hf_model(cfg, seed=0):
  """A transformers UMT5EncoderModel with every weight random (norm scales too)."""
  torch.manual_seed(seed)
  model = transformers.UMT5EncoderModel(_hf_config(cfg)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'layer_norm' in name:
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif 'relative_attention_bias' in name:
        p.normal_(0, 1.0)
      elif p.ndim == 2 and 'shared' not in name and 'embed_tokens' not in name:
        p.normal_(0, p.shape[1]**-0.5)
  return model


def _to_original(hf_sd):
  """The same weights under Wan's original file names (written out here, not by the importer)."""
  rename = {
      'SelfAttention.q.weight': 'attn.q.weight', 'SelfAttention.k.weight': 'attn.k.weight',
      'SelfAttention.v.weight': 'attn.v.weight', 'SelfAttention.o.weight': 'attn.o.weight',
      'SelfAttention.relative_attention_bias.weight': 'pos_embedding.embedding.weight',
      'DenseReluDense.wi_0.weight': 'ffn.gate.0.weight',
      'DenseReluDense.wi_1.weight': 'ffn.fc1.weight', 'DenseReluDense.wo.weight': 'ffn.fc2.weight',
  }
  out = {}
  for k, v in hf_sd.items():
    if k == 'shared.weight':
      out['token_embedding.weight'] = v
    elif k == 'encoder.final_layer_norm.weight':
      out['norm.weight'] = v
    elif k != 'encoder.embed_tokens.weight':
      i, sub, rest = re.fullmatch(r'encoder\.block\.(\d+)\.layer\.([01])\.(.+)', k).groups()
      name = ('norm1.weight' if sub == '0' else 'norm2.weight') if rest == 'layer_norm.weight' \
          else rename[rest]
      out[f'blocks.{i}.{name}'] = v
  return out


def _batch(cfg, lengths, seq_len, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, cfg.vocab_size, (len(lengths), seq_len)).astype(np.int32)
  for row, n in enumerate(lengths):
    ids[row, n - 1] = 1  # EOS
    ids[row, n:] = 0     # pad
  return ids, np.asarray(lengths, np.int32)


def _hf_forward(model, ids, lengths):
  mask = torch.as_tensor(np.arange(ids.shape[1])[None] < lengths[:, None]).long()
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(ids).long(),
                 attention_mask=mask).last_hidden_state.numpy()


def test_relative_buckets_match_transformers():
  cfg = _hf_config(shotstream.get_config('wan_1_3b').text)
  attn = transformers.models.umt5.modeling_umt5.UMT5Attention(cfg, has_relative_attention_bias=True)
  n = 600
  rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
  want = attn._relative_position_bucket(rel).numpy()  # pylint: disable=protected-access
  np.testing.assert_array_equal(umt5.relative_position_buckets(n, 32, 128), want)


@pytest.mark.parametrize('layout', ['transformers', 'original'])
@pytest.mark.parametrize('variant', ['tiny', 'long'])
def test_parity_with_transformers(layout, variant):
  # 'long' covers the log-spaced buckets and the max-distance clip at a small size.
  if variant == 'tiny':
    cfg, lengths, seq_len = _tiny(), [12, 5, 1], 12
  else:
    cfg, lengths, seq_len = _tiny(relative_max_distance=16, text_len=48), [40, 23, 9], 40
  model = _hf_model(cfg)
  sd = model.state_dict()
  sd = _to_original(sd) if layout == 'original' else sd
  params = convert.umt5_from_torch(sd, cfg)
  ids, lengths = _batch(cfg, lengths, seq_len)
  want = _hf_forward(model, ids, lengths)
  got = np.asarray(jax.jit(lambda p, i, n: umt5.encode_text(p, cfg, i, n))(params, ids, lengths))
  assert got.shape == (len(lengths), cfg.text_len, cfg.d_model) and got.dtype == np.float32
  for row, n in enumerate(lengths):
    np.testing.assert_allclose(got[row, :n], want[row, :n], rtol=1e-5, atol=1e-5)
    assert not np.any(got[row, n:])  # post-processing: exactly 0 past the real length


def test_layouts_and_value_types_give_same_params(tmp_path):
  cfg = _tiny()
  sd = _hf_model(cfg).state_dict()
  ref = convert.umt5_from_torch(sd, cfg)
  as_numpy = {k: v.numpy() for k, v in sd.items() if k != 'shared.weight'}  # untied copy only
  variants = {'numpy': convert.umt5_from_torch(as_numpy, cfg),
              'original': convert.umt5_from_torch(_to_original(sd), cfg)}
  torch.save(_to_original(sd), tmp_path / 'enc.pth')
  variants['pth'] = convert.load_umt5(str(tmp_path / 'enc.pth'), cfg)
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: v.numpy() for k, v in sd.items() if k != 'encoder.embed_tokens.weight'},
            str(tmp_path / 'enc.safetensors'))
  variants['safetensors'] = convert.load_umt5(str(tmp_path / 'enc.safetensors'), cfg)
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), umt5.param_shapes(cfg))
  for name, params in variants.items():
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == shapes, name
    jax.tree.map(np.testing.assert_array_equal, params, ref)


def test_bf16_import_is_exact_and_runs():
  cfg = _tiny(dtype='bfloat16')
  sd = {k: v.to(torch.bfloat16) for k, v in _hf_model(cfg).state_dict().items()}
  params = convert.umt5_from_torch(sd, cfg)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  want = sd['encoder.block.1.layer.1.DenseReluDense.wo.weight'].float().numpy().T
  np.testing.assert_array_equal(np.asarray(params['blocks']['ffn']['fc2']['kernel'][1], np.float32),
                                want)
  ids, lengths = _batch(cfg, [7, 3], 10)
  got = umt5.encode_text(params, cfg, ids, lengths)
  ref = umt5.encode_text(jax.tree.map(lambda x: x.astype(jnp.float32), params),
                         _tiny(), ids, lengths)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=0.1, rtol=0.05)


def test_mismatched_checkpoint_errors():
  cfg = _tiny()
  sd = dict(_hf_model(cfg).state_dict())
  with pytest.raises(common.CheckpointError, match=r'wrong shapes: .*wi_0.weight: expected'):
    convert.umt5_from_torch(sd, _tiny(d_ff=48))
  with pytest.raises(common.CheckpointError,
                     match=r'1 missing keys: encoder.block.1.layer.0.SelfAttention.k.weight'):
    convert.umt5_from_torch({k: v for k, v in sd.items() if 'block.1.layer.0.Self' not in k
                             or not k.endswith('k.weight')}, cfg)
  with pytest.raises(common.CheckpointError, match=r'unexpected keys: blocks.2.norm1.weight'):
    orig = _to_original(sd)
    convert.umt5_from_torch({**orig, 'blocks.2.norm1.weight': orig['blocks.0.norm1.weight']}, cfg)
  with pytest.raises(common.CheckpointError, match='not a umT5 encoder state dict'):
    convert.umt5_from_torch({'patch_embedding.weight': np.zeros(3)}, cfg)
  with pytest.raises(ValueError, match='dtype: unknown param dtype'):
    convert.umt5_from_torch(sd, cfg, dtype='float16')


def test_umt5_xxl_param_count_matches_transformers():
  cfg = shotstream.get_config('wan_1_3b').text
  assert (cfg.vocab_size, cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.num_layers) == (
      256384, 4096, 64, 64, 10240, 24)
  with torch.device('meta'):
    model = transformers.UMT5EncoderModel(_hf_config(cfg))
  want = sum(p.numel() for p in model.parameters())  # the tied embedding counted once
  assert umt5.count_params(cfg) == want == 5_680_910_336


# ----------------------------------------------------------------------------- tokenizer

_SENTENCES = [
    'A red fox jumps over the lazy dog in the snowy forest.',
    'Close-up shot: a woman smiles at the camera, warm light, 4K.',
    'Die Katze schläft auf dem Sofa neben dem Fenster.',
    '一只猫在窗边的沙发上睡觉。镜头缓缓推进。',
    'Le chat dort sur le canapé près de la fenêtre.',
    'shot1: the hero walks into the bar; shot2: he orders a drink!',
]
_PROMPTS = _SENTENCES + [
    '  a   fox\tand\na dog  ', 'fox <extra_id_0> dog </s> cat <pad>', 'Tom &amp;amp; Jerry',
    '“quoted” text — ＡＢＣ，full width',
    'zebra xylophone quokka',  # unseen pieces -> <unk>
    ' '.join(_SENTENCES * 3),  # longer than text_len: truncated with EOS kept
]
_EXTRA_IDS = 7


@pytest.fixture(scope='module')
def tok_dirs(tmp_path_factory):
  """(spm-only folder laid out like google/umt5-xxl, folder saved by transformers)."""
  spm = pytest.importorskip('sentencepiece')
  root = tmp_path_factory.mktemp('umt5_tok')
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_SENTENCES * 8), model_writer=model, vocab_size=120,
      model_type='unigram', pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
      character_coverage=1.0, minloglevel=2)
  spm_dir = root / 'spm'
  spm_dir.mkdir()
  (spm_dir / 'spiece.model').write_bytes(model.getvalue())
  (spm_dir / 'tokenizer_config.json').write_text(json.dumps(dict(
      tokenizer_class='T5Tokenizer', eos_token='</s>', pad_token='<pad>', unk_token='<unk>',
      extra_ids=_EXTRA_IDS,
      additional_special_tokens=[f'<extra_id_{i}>' for i in range(_EXTRA_IDS)])))
  hf_dir = root / 'hf'
  transformers.AutoTokenizer.from_pretrained(str(spm_dir)).save_pretrained(str(hf_dir))
  assert (hf_dir / 'tokenizer.json').exists()
  return spm_dir, hf_dir


@pytest.mark.parametrize('source', ['spiece.model', 'tokenizer.json'])
def test_tokenizer_matches_transformers(tok_dirs, source):
  spm_dir, hf_dir = tok_dirs
  folder = spm_dir if source == 'spiece.model' else hf_dir
  text_len = 32
  ours = tokenizer_lib.UMT5Tokenizer(str(folder), text_len=text_len)
  assert ours.backend == ('sentencepiece' if source == 'spiece.model' else 'tokenizers')
  hf = transformers.AutoTokenizer.from_pretrained(str(folder))
  assert (hf.eos_token_id, hf.pad_token_id) == (ours.eos_id, ours.pad_id) == (1, 0)
  cleaned = [tokenizer_lib.clean_prompt(p) for p in _PROMPTS]
  want = hf(cleaned, padding='max_length', truncation=True, max_length=text_len)
  ids, lengths = ours(_PROMPTS)
  np.testing.assert_array_equal(ids, np.asarray(want['input_ids']))
  np.testing.assert_array_equal(lengths, np.asarray(want['attention_mask']).sum(1))
  assert lengths[-1] == text_len and ids[-1, -1] == 1  # truncated, EOS kept
  assert 2 in ids[-2]  # unknown words map to <unk>
  extra0 = hf.convert_tokens_to_ids('<extra_id_0>')
  assert extra0 in ids[7]  # sentinels are special tokens, not spelled out


def test_tokenizer_bad_input(tok_dirs, tmp_path):
  tok = tokenizer_lib.UMT5Tokenizer(str(tok_dirs[0]), text_len=8)
  with pytest.raises(ValueError, match=r'prompt: empty prompt \(row 1\)'):
    tok(['a fox', ' \n '])
  assert tok('', allow_empty=True)[1].tolist() == [1]
  with pytest.raises(ValueError, match='prompts: empty list'):
    tok([])
  with pytest.raises(FileNotFoundError, match='no usable tokenizer'):
    tokenizer_lib.UMT5Tokenizer(str(tmp_path))


def test_clean_prompt():
  assert tokenizer_lib.clean_prompt('  Tom &amp;amp; Jerry\n\n  run\t ') == 'Tom & Jerry run'
  if tokenizer_lib.ftfy is not None:  # the reference's ftfy.fix_text step
    assert tokenizer_lib.clean_prompt('“quoted” cafÃ©') == '"quoted" café'


def test_prompt_encoder_encodes_each_prompt_once(tok_dirs):
  cfg = _tiny()
  params = umt5.init_params(cfg, jax.random.key(1))
  tok = tokenizer_lib.UMT5Tokenizer(str(tok_dirs[0]), text_len=cfg.text_len)
  enc = text_lib.PromptEncoder(params, cfg, tok, max_entries=3)
  out = enc(['a red fox', 'a red fox', '  a  red fox ', 'the dog'])
  assert enc.encode_calls == 2 and out.shape == (4, cfg.text_len, cfg.d_model)
  np.testing.assert_array_equal(out[0], out[2])
  ids, lengths = tok(['the dog'])
  np.testing.assert_array_equal(out[3], umt5.encode_text(params, cfg, ids, lengths)[0])
  enc('a cat sleeps')
  enc('the dog')
  assert enc.encode_calls == 3
  assert enc._encode._cache_size() == 1  # pylint: disable=protected-access  # one compilation
  enc(['x1', 'x2', 'x3'])  # evicts the least recently used entries (LRU of 3)
  enc('the dog')
  assert enc.encode_calls == 7


_PEAK_SCRIPT = r'''
import sys, threading, time
from configs import shotstream
from shotstream_jax.convert import umt5 as convert

def anon_kib():
  for line in open('/proc/self/status'):
    if line.startswith('RssAnon:'):
      return int(line.split()[1])

peak = [anon_kib()]
def watch():
  while True:
    peak[0] = max(peak[0], anon_kib())
    time.sleep(0.02)
threading.Thread(target=watch, daemon=True).start()
cfg = shotstream.get_config('wan_1_3b').text
params = convert.load_umt5(sys.argv[1], cfg)
print('PEAK_ANON_KIB', max(peak[0], anon_kib()))
'''


@pytest.mark.huge
def test_umt5_xxl_import_fits_in_host_memory(tmp_path):
  """A full-size bf16 umT5-XXL .pth (original names) imports with one copy of the weights.

  The file's tensors are uninitialised (their values do not matter here); page-cache pages of
  the mmapped file are reclaimable, so only anonymous memory is measured.
  """
  cfg = shotstream.get_config('wan_1_3b').text
  sd = {k: torch.empty(shape, dtype=torch.bfloat16)
        for k, shape in convert.checkpoint_shapes(cfg, 'original').items()}
  path = tmp_path / 'models_t5_umt5-xxl-enc-bf16.pth'
  torch.save(sd, path)
  del sd
  weights_gib = umt5.count_params(cfg) * 2 / 2**30
  try:
    out = subprocess.run([sys.executable, '-c', _PEAK_SCRIPT, str(path)], capture_output=True,
                         text=True, check=True, cwd=str(pathlib.Path(__file__).parents[1]))
  finally:
    path.unlink()  # 11 GiB
  peak_gib = int(re.search(r'PEAK_ANON_KIB (\d+)', out.stdout).group(1)) / 2**20
  print(f'umT5-XXL import: weights {weights_gib:.2f} GiB, peak anonymous memory {peak_gib:.2f} GiB')
  # one copy of the weights + the largest leaf being built (the 2 GiB embedding) + runtime
  assert peak_gib < weights_gib + 3.5


@pytest.mark.slow
def test_parity_at_umt5_xxl_widths():
  """umT5-XXL layer shapes (2 of its 24 layers, a small vocab) at a 300-token prompt, fp32."""
  cfg = shotstream.get_config('wan_1_3b').text
  cfg.vocab_size, cfg.num_layers, cfg.dtype = 1024, 2, 'float32'
  model = _hf_model(cfg)
  params = convert.umt5_from_torch(model.state_dict(), cfg)
  ids, lengths = _batch(cfg, [300, 17], 320)
  want = _hf_forward(model, ids, lengths)
  got = np.asarray(jax.jit(lambda p, i, n: umt5.encode_text(p, cfg, i, n))(params, ids, lengths))
  assert got.shape == (2, 512, 4096)
  for row, n in enumerate(lengths):
    np.testing.assert_allclose(got[row, :n], want[row, :n], rtol=1e-4, atol=1e-4)
    assert not np.any(got[row, n:])
