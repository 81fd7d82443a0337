"""The CLIP BPE tokenizer for the text-alignment metric (eval/videos.py), from the files users bring.

    tok = load('clip-vit-base-patch32')            # a folder with vocab.json + merges.txt
    tok = load('bpe_simple_vocab_16e6.txt.gz')     # OpenAI's / open_clip's merges file
    ids, cut = tokenize(tok, ['a red ball'], 77)   # int32 [N, 77], tokens cut per text

transformers' CLIPTokenizer does the BPE; this module only builds it from either published form
and pads / truncates the way OpenAI's clip.tokenize(truncate=True) does.
"""

import gzip
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

TOKENIZER_FILES = ('vocab.json', 'merges.txt')
BPE_GZ = 'bpe_simple_vocab_16e6.txt.gz'


def bytes_to_unicode() -> Dict[int, str]:
  """GPT-2's reversible byte -> printable character table, which CLIP's BPE is built on."""
  bs = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('\xa1'), ord('\xac') + 1))
        + list(range(ord('\xae'), ord('\xff') + 1)))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def load(path: str, vocab_size: Optional[int] = None):
  """transformers' CLIPTokenizer from a folder with vocab.json + merges.txt (Hugging Face's
  openai/clip-vit-base-patch32) or from OpenAI's `bpe_simple_vocab_16e6.txt.gz` (shipped with the
  `clip` and `open_clip` packages), whose vocabulary is rebuilt as OpenAI's SimpleTokenizer does:
  the 256 byte characters, the same with '</w>', one token per merge, then <|startoftext|> and
  <|endoftext|>. `vocab_size`: the text tower's; the end-of-text id must be its last id, which
  eval/vit.py reads as the end of each prompt.
  """
  try:
    from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError('--clip_tokenizer: needs transformers (pip install -r '
                     'requirements-test.txt)') from e
  if os.path.isdir(path):
    missing = [f for f in TOKENIZER_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
      raise FileNotFoundError(f'--clip_tokenizer: {path} lacks {", ".join(missing)} (need '
                              f'{" and ".join(TOKENIZER_FILES)}, or pass {BPE_GZ})')
    tok = CLIPTokenizer.from_pretrained(path)
  elif os.path.isfile(path) and path.endswith('.gz'):
    with gzip.open(path, 'rt', encoding='utf-8') as f:
      merges = f.read().split('\n')[1:49152 - 256 - 2 + 1]   # OpenAI's SimpleTokenizer's slice
    merges = [tuple(m.split()) for m in merges if m]
    chars = list(bytes_to_unicode().values())
    vocab = (chars + [c + '</w>' for c in chars] + [''.join(m) for m in merges]
             + ['<|startoftext|>', '<|endoftext|>'])
    tok = CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges)
  else:
    raise FileNotFoundError(f'--clip_tokenizer: {path} is neither a folder with '
                            f'{" + ".join(TOKENIZER_FILES)} nor a {BPE_GZ} file')
  if vocab_size is not None and tok.eos_token_id != vocab_size - 1:
    raise ValueError(f'--clip_tokenizer: its end-of-text id {tok.eos_token_id} is not the last id '
                     f'{vocab_size - 1} of the CLIP text tower; use the tokenizer of these '
                     'weights')
  return tok


def tokenize(tokenizer, texts: Sequence[str], context: int) -> Tuple[np.ndarray, List[int]]:
  """(ids [N, context] int32, zero-padded; tokens cut from each text).

  A text over the context keeps its first context - 1 tokens and ends in end-of-text, as OpenAI's
  clip.tokenize(truncate=True) does.
  """
  ids = np.zeros((len(texts), context), np.int32)
  cut = []
  for i, row in enumerate(tokenizer(list(texts))['input_ids']):
    cut.append(max(0, len(row) - context))
    if len(row) > context:
      row = row[:context - 1] + row[-1:]
    ids[i, :len(row)] = row
  return ids, cut


def beside(path: str) -> Optional[str]:
  """The folder of a CLIP weights file if it also holds the tokenizer files (a Hugging Face
  download), else None."""
  folder = os.path.dirname(os.path.abspath(path))
  if all(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
    return folder
  return None
