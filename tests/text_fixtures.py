"""A tiny sentencepiece tokenizer folder laid out like google/umt5-xxl, trained in a test."""

import io
import json
import pathlib

SENTENCES = (
    'A red circle in a room. shot0:Wide shot of the circle; the camera is static.',
    'A blue square in a field. shot1:Close-up shot of the square; the camera pans left.',
    'A green diamond in a street. shot2:Medium shot of the diamond; the camera zooms in.',
    'A yellow triangle; the camera pans right, then zooms out. Purple, cyan, orange, white.',
)


def write_tokenizer_folder(folder, sentences=SENTENCES, vocab_size: int = 96,
                           extra_ids: int = 4) -> pathlib.Path:
  """spiece.model + tokenizer_config.json (pad 0, eos 1, unk 2) in `folder`; returns it."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(sentences) * 8), model_writer=model, vocab_size=vocab_size,
      model_type='unigram', pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
      character_coverage=1.0, minloglevel=2)
  (folder / 'spiece.model').write_bytes(model.getvalue())
  (folder / 'tokenizer_config.json').write_text(json.dumps(dict(
      tokenizer_class='T5Tokenizer', eos_token='</s>', pad_token='<pad>', unk_token='<unk>',
      extra_ids=extra_ids,
      additional_special_tokens=[f'<extra_id_{i}>' for i in range(extra_ids)])))
  return folder
