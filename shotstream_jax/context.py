"""Global context of the next shot: which earlier frames, their shot ids and caption rows.

Reference rule (DESIGN 4.2-4.4): with P earlier shots the budget of `context_frames` (6) frames is
split `budget // P` per shot, the remainder going one each to the *last* shots; inside shot j the
chosen decoded pixel frames are `round(linspace(first_j, last_j, count_j))`. A frame from shot j
carries RoPE shot id j; the new shot's frames carry `last id + 1`. The first shot has all-zero
context latents with id 0 (so shots 0 and 1 both generate with id 1).

Captions: each frame attends to its own shot's caption. We route through a fixed-size caption
table (`context_frames + 1` rows: the distinct context shots in order, then the current shot,
padded with the current one) so that the shape never changes; this is the reference's routing
(caption index = shot id into the list of shot prompts) written with compact row indices, and for
the first shot every frame uses caption 0, as the reference does.
"""

import dataclasses
from typing import List, Sequence, Tuple

import numpy as np


def frame_budget(num_prev_shots: int, budget: int) -> List[int]:
  """Frames taken from each earlier shot."""
  if num_prev_shots < 1:
    return []
  counts = [budget // num_prev_shots] * num_prev_shots
  for i in range(1, budget % num_prev_shots + 1):
    counts[-i] += 1
  return counts


@dataclasses.dataclass(frozen=True)
class ContextChoice:
  """What the next shot conditions on; indices are into the concatenated decoded frames."""
  frame_indices: Tuple[int, ...]   # [Cf] pixel-frame indices (empty for the first shot)
  ctx_shot: Tuple[int, ...]        # [Cf] RoPE shot ids
  ctx_caption: Tuple[int, ...]     # [Cf] caption-table rows
  gen_shot: int
  gen_caption: int
  caption_shots: Tuple[int, ...]   # [Cf + 1] which shot's prompt fills each table row

  def batch_ids(self, batch: int):
    """(ctx_shot [B, Cf], ctx_caption [B, Cf], gen_shot [B], gen_caption [B]) int32: this
    choice's ids for every row of a batch, the id fields of a `causal.ShotPlan`."""
    rep = lambda x: np.broadcast_to(np.asarray(x, np.int32), (batch,) + np.shape(x))
    return rep(self.ctx_shot), rep(self.ctx_caption), rep(self.gen_shot), rep(self.gen_caption)


def _picks(shot_lengths: Sequence[int], target: int, budget: int):
  """(shot j, frame indices into all shots concatenated) of the context of shot `target`."""
  starts = np.concatenate([[0], np.cumsum(shot_lengths)[:-1]]).astype(int)
  for j, count in enumerate(frame_budget(target, budget)):
    if count:
      first, last = starts[j], starts[j] + shot_lengths[j] - 1
      yield j, np.round(np.linspace(first, last, count)).astype(int).tolist()


def context_indices(shot_lengths: Sequence[int], target: int, budget: int) -> np.ndarray:
  """Frame indices (into all shots concatenated) the reference picks as context for `target`."""
  return np.asarray([i for _, idx in _picks(shot_lengths, target, budget) for i in idx], np.int32)


def context_candidates(shot_lengths: Sequence[int], budget: int) -> np.ndarray:
  """Sorted union of `context_indices` over every target shot 1..S-1 (what precompute keeps)."""
  picks = [context_indices(shot_lengths, s, budget) for s in range(1, len(shot_lengths))]
  return np.unique(np.concatenate(picks)).astype(np.int32) if picks else np.zeros(0, np.int32)


def choose_context(shot_lengths: Sequence[int], budget: int) -> ContextChoice:
  """The context of shot `len(shot_lengths)` given the decoded frame count of earlier shots."""
  shot = len(shot_lengths)
  rows = budget + 1
  if shot == 0:
    return ContextChoice((), (0,) * budget, (0,) * budget, 1, 0, (0,) * rows)
  if any(n < 1 for n in shot_lengths):
    raise ValueError(f'shot_lengths: every earlier shot needs frames, got {list(shot_lengths)}')
  indices, ids = [], []
  for j, idx in _picks(shot_lengths, shot, budget):
    indices += idx
    ids += [j] * len(idx)
  distinct = sorted(set(ids))
  row = {j: r for r, j in enumerate(distinct)}
  table = tuple(distinct) + (shot,) * (rows - len(distinct))
  return ContextChoice(tuple(indices), tuple(ids), tuple(row[j] for j in ids), ids[-1] + 1,
                       len(distinct), table)


def no_context(shot: int, budget: int) -> ContextChoice:
  """The 'global cache off' ablation: shot `shot` conditioned as a first shot (zero context
  latents with id 0, generated frames id 1) but on its own caption."""
  return ContextChoice((), (0,) * budget, (0,) * budget, 1, 0, (shot,) * (budget + 1))


def shot_context(mode: str, shot_lengths: Sequence[int], budget: int) -> ContextChoice:
  """The context of shot `len(shot_lengths)` under `sampling.context`: 'history' (the
  reference rule, `choose_context`) or 'none' (the global cache off, `no_context`)."""
  if mode == 'history':
    return choose_context(shot_lengths, budget)
  return no_context(len(shot_lengths), budget)
