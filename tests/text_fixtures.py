"""A tiny sentencepiece tokenizer folder laid out like google/umt5-xxl, trained in a test."""

import pathlib

from shotstream_jax.models import tokenizer

SENTENCES = (
    'A red circle in a room. shot0:Wide shot of the circle; the camera is static.',
    'A blue square in a field. shot1:Close-up shot of the square; the camera pans left.',
    'A green diamond in a street. shot2:Medium shot of the diamond; the camera zooms in.',
    'A yellow triangle; the camera pans right, then zooms out. Purple, cyan, orange, white.',
)


def write_tokenizer_folder(folder, sentences=SENTENCES, vocab_size: int = 96,
                           extra_ids: int = 4) -> pathlib.Path:
  """spiece.model + tokenizer_config.json (pad 0, eos 1, unk 2) in `folder`; returns it."""
  return pathlib.Path(tokenizer.train_sentencepiece(
      list(sentences) * 8, str(folder), vocab_size, model_type='unigram', extra_ids=extra_ids))
