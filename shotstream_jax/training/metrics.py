"""Training metrics as jsonl and TensorBoard event files (tensorboardX; no TensorFlow needed).

    writer = MetricWriter(workdir, resume_step=restored_step)
    writer.write(step, {'loss': 0.41, 'grad_norm/teacher': 1.3})
    writer.close()

`metrics.jsonl` holds one `{"step": s, ...}` line per write. On resume, lines past the restored
step (written by the killed run after its last checkpoint) are dropped so that the file reads
as one uninterrupted run. Only the primary process writes.
"""

import json
import os
from typing import Dict, Optional

import jax
import numpy as np

JSONL = 'metrics.jsonl'
TB_DIR = 'tb'


class MetricWriter:

  def __init__(self, workdir: str, resume_step: Optional[int] = None, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, JSONL)
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self.path):
      _truncate_after(self.path, resume_step or 0)
    if tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, TB_DIR))

  def write(self, step: int, metrics: Dict[str, float]):
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in metrics.items()}
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), **values}) + '\n')
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _truncate_after(path: str, step: int):
  with open(path) as f:
    lines = [l for l in f if l.strip()]
  keep = [l for l in lines if json.loads(l).get('step', 0) <= step]
  if len(keep) != len(lines):
    with open(path, 'w') as f:
      f.writelines(keep)


def read_jsonl(workdir: str):
  """All records of a run's metrics.jsonl (for tests and notebooks)."""
  with open(os.path.join(workdir, JSONL)) as f:
    return [json.loads(l) for l in f if l.strip()]
