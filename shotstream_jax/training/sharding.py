"""Device mesh, logical-axis rules and shardings for training (DESIGN 3, Sharding).

    mesh = make_mesh(config.mesh)                        # axes ('data', 'fsdp', 'tensor')
    rules = logical_rules(config)                        # ('embed', 'fsdp'), ('heads', 'tensor'), ...
    shardings = shardings_from_boxed(dit_boxed_shapes(config.model), mesh, rules)
    params = jax.device_put(params, shardings)           # FSDP-sharded
    batch = shard_batch(host_batch, mesh)                # leading axis over ('data', 'fsdp')

The DiT annotates its params with logical names ('layers', 'embed', 'heads', 'mlp', 'norm');
the config maps them to mesh axes, so re-sharding is a config change. The mesh is a plain
`Mesh(...)` (Auto axis types): `jax.make_mesh` defaults to Explicit axes, under which
`with_sharding_constraint`-style code changes meaning. `jax.distributed.initialize()` belongs to
the entry point, before anything here runs.
"""

import contextlib
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from shotstream_jax.mesh_axes import AXES, BATCH_AXES  # pylint: disable=unused-import
from shotstream_jax.models import dit


def mesh_shape(mesh_cfg, num_devices: int) -> tuple:
  """Sizes of ('data', 'fsdp', 'tensor') from the config; one -1 takes the remaining devices."""
  sizes = [int(mesh_cfg[a]) for a in AXES]
  if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
    raise ValueError(f'mesh: sizes {dict(zip(AXES, sizes))} invalid; accepted: positive '
                     'integers and at most one -1 (= the remaining devices)')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'mesh: {num_devices} devices are not divisible by {known} '
                       f'(mesh {dict(zip(AXES, sizes))})')
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f'mesh: {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, '
                     f'have {num_devices}')
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A Mesh over `devices` (default: all devices of all processes) shaped by `mesh_cfg`."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  try:   # topology-aware order on TPU; a plain reshape elsewhere
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, AXES)


def logical_rules(config) -> tuple:
  """The config's `logical_axis_rules` as a tuple of (logical name, mesh axes or None)."""
  rules = []
  for name, axes in config.logical_axis_rules:
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None and a not in AXES:
        raise ValueError(f'logical_axis_rules: {name!r} maps to unknown mesh axis {a!r}; '
                         f'accepted: {", ".join(AXES)} or None')
    rules.append((name, axes))
  return tuple(rules)


def shardings_from_boxed(boxed, mesh: Mesh, rules) -> Any:
  """NamedShardings (for the unboxed tree) from a tree of logically-partitioned shapes.

  A dimension that its mesh axes do not divide is an error that names the param.
  """
  specs = nn.get_partition_spec(boxed)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  shapes = nn.meta.unbox(boxed)

  def check(path, shape, sharding):
    for size, axes in zip(shape.shape, tuple(sharding.spec) + (None,) * len(shape.shape)):
      n = int(np.prod([mesh.shape[a] for a in _as_tuple(axes)]))
      if size % n:
        raise ValueError(f'sharding: param {jax.tree_util.keystr(path)} of shape '
                         f'{tuple(shape.shape)} has a dimension {size} not divisible by mesh '
                         f'axes {axes} ({n} devices); change mesh or logical_axis_rules')
  jax.tree_util.tree_map_with_path(check, shapes, shardings)
  return shardings


def _as_tuple(axes):
  if axes is None:
    return ()
  return tuple(axes) if isinstance(axes, tuple) else (axes,)


def dit_boxed_shapes(model_cfg):
  """Shapes of `WanDiT(cfg).init` with their logical-axis boxes (nothing is allocated)."""
  model = dit.WanDiT(model_cfg)
  lat = jnp.zeros((1, *model_cfg.patch_size, model_cfg.in_channels), jnp.float32)  # one token
  ctx = jnp.zeros((1, 1, model_cfg.text_dim), jnp.float32)
  variables = jax.eval_shape(lambda k: model.init(k, lat, jnp.zeros((1, 1)), ctx),
                             jax.random.key(0))
  return variables['params']


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules):
  """The context a training step is traced in: the ambient mesh (kernels XLA cannot partition
  read it: models/attention.py) and the logical rules, which turn the model's activation
  layouts (`dit.ACT_*`, `nn.with_logical_constraint`; no-ops outside this context) into
  sharding constraints."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) axis over ('data', 'fsdp'); the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_size_multiple(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def shard_batch(batch, mesh: Mesh):
  """Host-local numpy batch -> global jax arrays sharded over ('data', 'fsdp').

  Each process passes its own slice (leading axis = global batch / process_count), as the
  grain loader yields it; on one host that is the whole batch.
  """
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return jax.tree.map(put, batch)


def batch_shardings(batch, mesh: Mesh):
  """The NamedSharding of every leaf of a batch (for jit's in_shardings)."""
  return jax.tree.map(lambda x: batch_sharding(mesh, len(np.shape(x)) if not hasattr(x, 'ndim')
                                                else x.ndim), batch)
