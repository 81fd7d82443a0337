"""The contract between a training stage and `train_loop.train`.

    class MyStage(stage.Stage):
      networks = ('teacher',)                      # the param subtrees of the train state
      def boxed_shapes(self): ...                  # {net: logically-boxed shapes} -> shardings
      def init_params(self, key, shardings): ...   # {net: params}, random or loaded
      def train_iterator(self, index, count, batch_size): ...   # grain, get/set_state
      def loss(self, params, batch, key): ...      # (scalar, {name: scalar}) inside jit

The loop owns the rest (mesh, state, checkpoints, guards, logging). A stage overrides
`trained()` when some networks are frozen or read another optim section, `train_step()` when
its update is not one gradient step of `loss` (DMD: a generator step every N critic steps), and
`eval_batches()` / `eval_metrics()` for held-out metrics.
"""

import abc
import re
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import flax
import jax
import optax

from shotstream_jax import loading
from shotstream_jax.models import dit
from shotstream_jax.training import inputs as inputs_lib
from shotstream_jax.training import optim as optim_lib


def default_train_step(loss_fn: Callable, tx: optax.GradientTransformation) -> Callable:
  """step(state, batch) -> (state, metrics): grad of loss_fn, optimizer update."""
  def step(state, batch):
    key, sub = jax.random.split(jax.random.wrap_key_data(state.rng))
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, sub)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(aux, loss=loss)
    for net in grads:
      metrics[f'grad_norm/{net}'] = optax.tree.norm(grads[net])
    return state.replace(params=params, opt_state=opt_state,
                         rng=jax.random.key_data(key)), metrics
  return step


class Stage(abc.ABC):
  """A training stage: networks, their init, a data stream and a loss (see module doc)."""
  networks: Tuple[str, ...] = ()

  def __init__(self, config, workdir: str):
    del workdir
    self.config = config

  @abc.abstractmethod
  def boxed_shapes(self) -> Dict[str, Any]:
    """{network: param shapes boxed with logical axis names} (unboxed = replicated)."""

  @abc.abstractmethod
  def init_params(self, key, shardings) -> Dict[str, Any]:
    """{network: params} laid out by `shardings` (a fresh run; resumes restore instead)."""

  @abc.abstractmethod
  def train_iterator(self, shard_index: int, shard_count: int, batch_size: int):
    """This host's stream of training batches; a grain iterator with get_state/set_state."""

  def loss(self, params, batch, key):
    """(scalar loss, {name: scalar}) inside jit; what the default `train_step` descends."""
    raise NotImplementedError(f'{type(self).__name__}: define loss() or train_step()')

  def eval_batches(self, batch_size: int) -> Iterable:
    """Host batches of held-out metrics; none by default."""
    del batch_size
    return []

  def eval_metrics(self, params, batch, key):
    """{name: scalar} of one held-out batch inside jit (only called with eval_batches)."""
    raise NotImplementedError(f'{type(self).__name__}: eval_batches without eval_metrics')

  def trained(self) -> Dict[str, str]:
    """{network: its `config.optim` section} of the networks that train; the others are
    frozen (optim.FROZEN). Default: every network, each with a section of its own name."""
    return {n: n for n in self.networks}

  def optimizer(self) -> optax.GradientTransformation:
    return optim_lib.make_optimizer(self.config.optim, self.trained())

  def train_step(self, tx: optax.GradientTransformation):
    """step(state, batch) -> (state, metrics): one gradient step of `loss`."""
    return default_train_step(self.loss, tx)

  def check_frozen_sections(self) -> None:
    """A frozen network may keep an optim section (a shared config), but it must not ask to
    train: its `trainable` regex has to match no param."""
    frozen = [n for n in self.networks if n not in self.trained() and n in self.config.optim]
    if not frozen:
      return
    boxed = self.boxed_shapes()
    for net in frozen:
      pattern = self.config.optim[net].trainable
      names = [optim_lib.param_path(path) for path, _ in
               jax.tree_util.tree_flatten_with_path(flax.linen.meta.unbox(boxed[net]))[0]]
      hit = [n for n in names if not pattern or re.search(pattern, n)]
      if hit:
        raise ValueError(f'optim.{net}.trainable: must match no param (the {net} is frozen in '
                         f"stage {self.config.stage}; drop the section), got {pattern!r} "
                         f'matching {hit[0]!r}')


class PrecomputedStage(Stage):
  """A stage on the precomputed latent shards (stages 1-4: training/inputs.py).

  Its `__init__` sets `train_dir` / `heldout_dir` (inputs_lib.prepare, after the config is
  validated), `example` (record, rng -> example) and, where training examples differ from
  held-out ones, `train_example`; `eval_limit` is the number of held-out batches an evaluation
  reads (0 = the whole split, None = no held-out metrics).
  """
  train_dir: str = ''
  heldout_dir: str = ''
  example: Callable = None
  train_example: Optional[Callable] = None
  eval_limit: Optional[int] = None

  def __init__(self, config, workdir: str):
    super().__init__(config, workdir)
    self._random_dit = {}   # layout -> jitted random init (dit_params)

  def train_iterator(self, shard_index: int, shard_count: int, batch_size: int):
    return inputs_lib.train_iterator(self.config, self.train_dir,
                                     self.train_example or self.example, shard_index,
                                     shard_count, batch_size)

  def eval_batches(self, batch_size: int):
    """Held-out batches, a fixed list (the same examples every evaluation)."""
    if self.eval_limit is None:
      return []
    return inputs_lib.heldout_batches(self.config, self.heldout_dir, self.example, batch_size,
                                      self.eval_limit)

  def dit_params(self, path: str, network: str, field: str, key, sharding):
    """A DiT laid out by `sharding`: `network` read from `path` (any source loading.py
    reads), or Wan's random init from `key` when `path` is '' (compiled once per layout, so
    the networks of a stage share one compile)."""
    if path:
      return loading.load_network_params(path, network, self.config.model, sharding=sharding,
                                         field=field)
    layout = tuple(jax.tree.leaves(sharding))
    if layout not in self._random_dit:
      self._random_dit[layout] = jax.jit(lambda k: dit.init_params(self.config.model, k),
                                         out_shardings=sharding)
    return self._random_dit[layout](key)
