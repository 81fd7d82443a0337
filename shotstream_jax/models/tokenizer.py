"""The umT5 tokenizer, read from the `google/umt5-xxl` folder a user brings (DESIGN 4.6, 4.7).

    tok = UMT5Tokenizer('Wan2.1-T2V-1.3B/google/umt5-xxl', text_len=512)
    ids, lengths = tok(['a cat', 'a dog on a sofa'])   # int32 [2, 512], int32 [2]

Ids equal those of the Hugging Face tokenizer built from the same folder, as the reference calls
it (pad to `text_len`, truncate, EOS appended inside the length): from `tokenizer.json` with the
`tokenizers` package when both are there (what `AutoTokenizer` loads), else from `spiece.model`
with `sentencepiece`, splitting out the special tokens (`</s>`, `<pad>`, `<unk>`,
`<extra_id_N>`) as the HF tokenizer does.

Prompt cleaning is the reference's `clean='whitespace'`: ftfy.fix_text, HTML-unescape twice,
collapse whitespace, strip. ftfy (a small pure-Python package) is used when installed; without
it the ftfy step is skipped with a warning, which only matters for mojibake, curly quotes and
similar Unicode repairs.
"""

import html
import json
import logging
import os
import re
import zlib
from typing import Optional, Sequence, Union

import numpy as np

try:
  import ftfy  # pylint: disable=g-import-not-at-top
except ImportError:  # optional: see module docstring
  ftfy = None

_warned_ftfy = False


def clean_prompt(text: str) -> str:
  """The reference's prompt cleaning: ftfy, HTML-unescape twice, collapse whitespace."""
  global _warned_ftfy
  if ftfy is not None:
    text = ftfy.fix_text(text)
  elif not _warned_ftfy:
    logging.warning('ftfy is not installed: prompts are cleaned without ftfy.fix_text '
                    '(pip install ftfy to match the reference exactly)')
    _warned_ftfy = True
  text = html.unescape(html.unescape(text)).strip()
  return re.sub(r'\s+', ' ', text).strip()


def _read_json(path):
  if not os.path.isfile(path):
    return {}
  with open(path, encoding='utf-8') as f:
    return json.load(f)


class _PaddedTokenizer:
  """Shared call of the tokenizers: clean, encode, append EOS, truncate, pad to `text_len`.

  Subclasses set `text_len`, `clean`, `pad_id`, `eos_id` and implement `encode(text)`.
  """

  def num_tokens(self, prompt: str) -> int:
    """Tokens of `prompt` (cleaned as `__call__` cleans it), EOS not counted: the prompt fits
    untruncated when this is at most `text_len - 1`."""
    return len(self.encode(clean_prompt(prompt) if self.clean else prompt))

  def __call__(self, prompts: Union[str, Sequence[str]], allow_empty: bool = False,
               clean: Optional[bool] = None):
    """Cleaned, tokenised, EOS-terminated, truncated and padded prompts.

    `clean` overrides the tokenizer's setting (pass False for prompts cleaned already: cleaning
    is not idempotent on nested HTML escapes).

    Returns:
      ids: int32 [B, text_len], padded with `pad_id`.
      lengths: int32 [B], real tokens per row including EOS (>= 1, <= text_len).
    """
    if isinstance(prompts, str):
      prompts = [prompts]
    if not len(prompts):
      raise ValueError('prompts: empty list; pass at least one prompt string')
    clean = self.clean if clean is None else clean
    ids = np.full((len(prompts), self.text_len), self.pad_id, np.int32)
    lengths = np.zeros((len(prompts),), np.int32)
    for row, prompt in enumerate(prompts):
      if not isinstance(prompt, str):
        raise TypeError(f'prompt: expected a string, got {type(prompt).__name__}')
      text = clean_prompt(prompt) if clean else prompt
      if not text and not allow_empty:
        raise ValueError(f'prompt: empty prompt (row {row})')
      tokens = self.encode(text)[:self.text_len - 1] + [self.eos_id]
      ids[row, :len(tokens)] = tokens
      lengths[row] = len(tokens)
    return ids, lengths


class UMT5Tokenizer(_PaddedTokenizer):
  """Prompt strings -> (ids [B, text_len], lengths [B]) as the reference's HF tokenizer gives.

  Attributes:
    text_len: padded length; prompts longer than `text_len - 1` tokens are truncated.
    backend: 'tokenizers' (tokenizer.json) or 'sentencepiece' (spiece.model).
    pad_id, eos_id: ids of `<pad>` and `</s>`.
  """

  def __init__(self, path: str, text_len: int = 512, clean: bool = True):
    """`path`: the tokenizer folder, or its `tokenizer.json` / `spiece.model` file."""
    if text_len < 1:
      raise ValueError(f'text_len: must be >= 1, got {text_len}')
    if not os.path.exists(path):
      raise FileNotFoundError(f'tokenizer: {path} does not exist; pass the google/umt5-xxl folder')
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config = _read_json(os.path.join(folder, 'tokenizer_config.json'))
    self.text_len = text_len
    self.clean = clean
    self._eos = str(config.get('eos_token') or '</s>')
    self._pad = str(config.get('pad_token') or '<pad>')
    tok_json = path if path.endswith('.json') else os.path.join(folder, 'tokenizer.json')
    spm_file = path if path.endswith('.model') else os.path.join(folder, 'spiece.model')
    if not path.endswith('.model') and os.path.isfile(tok_json) and _has('tokenizers'):
      self._init_tokenizers(tok_json)
    elif os.path.isfile(spm_file) and _has('sentencepiece'):
      self._init_sentencepiece(spm_file, config)
    else:
      raise FileNotFoundError(
          f'tokenizer: no usable tokenizer in {path}; expected tokenizer.json (needs the '
          '`tokenizers` package) or spiece.model (needs `sentencepiece`)')

  def _init_tokenizers(self, file):
    import tokenizers  # pylint: disable=g-import-not-at-top
    tok = tokenizers.Tokenizer.from_file(file)
    tok.no_truncation()
    tok.no_padding()
    self._tok = tok
    self.backend = 'tokenizers'
    self.eos_id, self.pad_id = self._special_id(tok.token_to_id)

  def _init_sentencepiece(self, file, config):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    sp = sentencepiece.SentencePieceProcessor(model_file=file)
    self._sp = sp
    self.backend = 'sentencepiece'
    specials = {}
    for piece in (self._eos, self._pad, '<unk>'):
      if sp.id_to_piece(sp.piece_to_id(piece)) == piece:
        specials[piece] = sp.piece_to_id(piece)
    # HF's T5 sentinels: <extra_id_i> = vocab + extra_ids - 1 - i (after the spm pieces, reversed),
    # unless the config lists the added tokens with their ids.
    added = config.get('added_tokens_decoder') or {}
    if added:
      specials.update({v['content']: int(k) for k, v in added.items()})
    else:
      n = int(config.get('extra_ids', 100))
      specials.update({f'<extra_id_{i}>': sp.get_piece_size() + n - 1 - i for i in range(n)})
    self._specials = specials
    self._split = re.compile('(' + '|'.join(
        re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ')')
    self.eos_id, self.pad_id = self._special_id(specials.get)

  def _special_id(self, lookup):
    ids = []
    for name, token in (('eos_token', self._eos), ('pad_token', self._pad)):
      i = lookup(token)
      if i is None:
        raise ValueError(f'tokenizer: {name} {token!r} is not in the vocabulary')
      ids.append(int(i))
    return ids

  def encode(self, text: str) -> list:
    """Token ids of one (already cleaned) string, without EOS."""
    if self.backend == 'tokenizers':
      return list(self._tok.encode(text, add_special_tokens=False).ids)
    ids = []
    for part in self._split.split(text):
      if part in self._specials:
        ids.append(self._specials[part])
      elif part:
        ids.extend(self._sp.encode(part))
    return ids


def _has(module: str) -> bool:
  try:
    __import__(module)
    return True
  except ImportError:
    return False


def train_sentencepiece(sentences: Sequence[str], folder: str, vocab_size: int,
                        model_type: str = 'bpe', extra_ids: int = 0) -> str:
  """Trains a SentencePiece vocabulary and writes a tokenizer folder laid out like
  google/umt5-xxl (spiece.model + tokenizer_config.json; pad 0, eos 1, unk 2, no BOS), so
  `UMT5Tokenizer(folder)` reads it exactly as it reads the real one. Returns the folder.

  Deterministic for the same sentences and settings (one thread). `vocab_size` is an upper
  bound: a small corpus may support fewer pieces (the trained size is `get_piece_size()`).
  """
  import io  # pylint: disable=g-import-not-at-top
  import sentencepiece  # pylint: disable=g-import-not-at-top
  sentences = [s for s in sentences if s.strip()]
  if not sentences:
    raise ValueError('sentences: nothing to train a vocabulary on')
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
      model_type=model_type, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
      hard_vocab_limit=False, split_digits=True, num_threads=1, minloglevel=2)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'spiece.model'), 'wb') as f:
    f.write(model.getvalue())
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
    json.dump(dict(tokenizer_class='T5Tokenizer', eos_token='</s>', pad_token='<pad>',
                   unk_token='<unk>', extra_ids=extra_ids,
                   additional_special_tokens=[f'<extra_id_{i}>' for i in range(extra_ids)]),
              f, indent=1)
  return folder


class HashTokenizer(_PaddedTokenizer):
  """Words and punctuation hashed into the vocabulary (pad 0, eos 1, unk 2, words 3..V-1).

  For random-weight presets (`tiny`) that have no umT5 vocabulary to load: it keeps the whole
  prompt -> embedding path real (cleaning, padding, EOS, zeroing past the length) without a
  download, and a word per token keeps the reference's ~2,000-character story prompts within
  512 tokens, so different shots get different embeddings.
  """
  pad_id = 0
  eos_id = 1
  backend = 'hash'

  def __init__(self, text_len: int, vocab_size: int, clean: bool = True):
    if vocab_size < 4:
      raise ValueError(f'text.vocab_size: the hash tokenizer needs >= 4, got {vocab_size}')
    if text_len < 1:
      raise ValueError(f'text_len: must be >= 1, got {text_len}')
    self.text_len = text_len
    self.vocab_size = vocab_size
    self.clean = clean

  def encode(self, text: str) -> list:
    words = re.findall(r'\w+|[^\w\s]', text)
    return [3 + zlib.crc32(w.encode('utf-8')) % (self.vocab_size - 3) for w in words]
