"""Fault injection for checkpoint tests: damage one step directory the ways real runs do.

    damage(os.path.join(workdir, 'checkpoints', '4'), 'truncate')

  delete    its state/ item removed (an interrupted copy or cleanup)
  empty     state/ present but empty (a full disk at create time)
  truncate  every file under state/ cut to half its size (a full disk mid-write)
  nan       state/ rewritten with every floating array NaN (a diverged run saved by an old
            version, or a hand-edited checkpoint): loads fine, must still be refused
"""

import os
import shutil

import numpy as np

WAYS = ('delete', 'empty', 'truncate', 'nan')


def damage(step_dir: str, how: str):
  state = os.path.join(step_dir, 'state')
  if not os.path.isdir(state):
    raise FileNotFoundError(f'no state/ item in {step_dir}')
  if how == 'delete':
    shutil.rmtree(state)
  elif how == 'empty':
    shutil.rmtree(state)
    os.makedirs(state)
  elif how == 'truncate':
    for root, _, files in os.walk(state):
      for name in files:
        path = os.path.join(root, name)
        size = os.path.getsize(path)
        with open(path, 'r+b') as f:
          f.truncate(size // 2)
  elif how == 'nan':
    import jax  # pylint: disable=g-import-not-at-top
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    with ocp.PyTreeCheckpointer() as ckptr:
      tree = ckptr.restore(state)
    tree = jax.tree.map(lambda x: np.full_like(x, np.nan) if np.issubdtype(
        np.asarray(x).dtype, np.floating) else x, tree)
    shutil.rmtree(state)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
      ckptr.save(state, args=ocp.args.StandardSave(tree))
  else:
    raise ValueError(f'how: {how!r}; accepted: {", ".join(WAYS)}')
