"""What the three networks (DiT, VAE, umT5) share: compute dtypes by name and param counts.

Each network module has the same surface: `init_params(cfg, key)`, `param_shapes(cfg)` and
`count_params(cfg)` of its config section; shotstream_jax/loading.py loads each from a path.
"""

import jax
import jax.numpy as jnp
import numpy as np

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def dtype_of(name: str, field: str = 'model.dtype'):
  """The jnp dtype a config names ('float32' | 'bfloat16' | 'float16'); `field` is named in
  the error."""
  if name not in _DTYPES:
    raise ValueError(f'{field}: unknown dtype {name!r}; accepted: {", ".join(_DTYPES)}')
  return _DTYPES[name]


def count(shapes) -> int:
  """Number of parameters of a params (or ShapeDtypeStruct) tree."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
