"""Prompt -> umT5 embedding with a per-process cache (DESIGN 4.3, 4.6).

A story re-uses prompts (every shot prompt starts with the global caption; the same story is
rerun), and umT5-XXL is the slowest model per call on a small device, so each distinct cleaned
prompt is encoded once. Prompts are encoded one per call at the fixed `text_len`, so the jitted
encoder compiles exactly once per process.
"""

import collections
from typing import Sequence, Union

import jax
import jax.numpy as jnp

from shotstream_jax.models import tokenizer as tokenizer_lib
from shotstream_jax.models import umt5


class PromptEncoder:
  """Cached `prompts -> [N, text_len, d_model]` umT5 embeddings (zeros past each length).

  Attributes:
    encode_calls: how many prompts went through the encoder (cache misses), for tests and logs.
  """

  def __init__(self, params, text_cfg, tokenizer, max_entries: int = 256):
    if tokenizer.text_len != text_cfg.text_len:
      raise ValueError(f'tokenizer: text_len {tokenizer.text_len} differs from text.text_len '
                       f'{text_cfg.text_len}')
    if max_entries < 1:
      raise ValueError(f'max_entries: must be >= 1, got {max_entries}')
    self.params = params
    self.cfg = text_cfg
    self.tokenizer = tokenizer
    self.max_entries = max_entries
    self.encode_calls = 0
    self._cache = collections.OrderedDict()  # cleaned prompt -> [text_len, d_model]
    self._encode = jax.jit(lambda p, ids, lengths: umt5.encode_text(p, text_cfg, ids, lengths))

  def _key(self, prompt: str) -> str:
    if not isinstance(prompt, str):
      raise TypeError(f'prompt: expected a string, got {type(prompt).__name__}')
    return tokenizer_lib.clean_prompt(prompt) if self.tokenizer.clean else prompt

  def __call__(self, prompts: Union[str, Sequence[str]]) -> jax.Array:
    """Embeddings of one prompt or a list of prompts, [N, text_len, d_model]."""
    if isinstance(prompts, str):
      prompts = [prompts]
    if not len(prompts):
      raise ValueError('prompts: empty list; pass at least one prompt string')
    rows = []
    for prompt in prompts:
      key = self._key(prompt)
      if key in self._cache:
        self._cache.move_to_end(key)
      else:
        ids, lengths = self.tokenizer([key], clean=False)
        self._cache[key] = self._encode(self.params, jnp.asarray(ids), jnp.asarray(lengths))[0]
        self.encode_calls += 1
        if len(self._cache) > self.max_entries:
          self._cache.popitem(last=False)
      rows.append(self._cache[key])
    return jnp.stack(rows)
