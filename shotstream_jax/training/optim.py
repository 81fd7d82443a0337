"""Optimizers of the training stages: AdamW per trained network, everything else frozen.

A stage names the networks it trains and the `config.optim` section each one reads
(`Stage.trained()`: {network: section}; DMD's LoRA adapter 'generator_lora' reads
`optim.generator`). Every other network of the train state is frozen: its params get the
`FROZEN` label, whose transform is `optax.set_to_zero()` (no moments, no decay). Inside a trained
network, `optim.<section>.trainable` (a regex searched in the param path, '' = all) picks the
params that train; the rest of that network is frozen the same way.
"""

import re
from typing import Dict, Mapping, Sequence, Union

import jax
import optax

FROZEN = 'frozen'   # the optimizer label of every param that does not train

Trained = Union[Mapping[str, str], Sequence[str]]


def as_sections(trained: Trained) -> Dict[str, str]:
  """{network: optim section}; a plain sequence of networks reads a section of its own name."""
  if isinstance(trained, Mapping):
    return dict(trained)
  return {n: n for n in trained}


def param_path(path) -> str:
  """'blocks/self_attn/q/kernel': a param's path inside its network, as `trainable` sees it."""
  return '/'.join(str(getattr(p, 'key', p)) for p in path)


def param_labels(params, optim_cfg, trained: Trained):
  """Per-leaf optimizer label of {network: params}: the network's name where it trains and its
  section's `trainable` regex matches, else FROZEN."""
  sections = as_sections(trained)

  def label(path, _):
    net = str(getattr(path[0], 'key', path[0]))
    if net not in sections:
      return FROZEN
    pattern = optim_cfg[sections[net]].trainable
    return net if not pattern or re.search(pattern, param_path(path[1:])) else FROZEN
  return jax.tree_util.tree_map_with_path(label, params)


def learning_rate(cfg) -> optax.Schedule:
  """Linear warm-up over `warmup_steps`, then constant, or with `decay_steps` > 0 a cosine
  decay to `lr * final_lr_fraction` at step `decay_steps`."""
  if cfg.warmup_steps < 0:
    raise ValueError(f'optim.warmup_steps: must be >= 0, got {cfg.warmup_steps}')
  decay = cfg.get('decay_steps', 0)
  if decay:
    if decay <= cfg.warmup_steps:
      raise ValueError(f'optim.decay_steps: must exceed warmup_steps ({cfg.warmup_steps}), '
                       f'got {decay}')
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, decay,
                                              cfg.lr * cfg.get('final_lr_fraction', 0.0))
  if cfg.warmup_steps == 0:
    return optax.constant_schedule(cfg.lr)
  return optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)


def network_optimizer(cfg) -> optax.GradientTransformation:
  """Clip by this network's global norm, then AdamW (decoupled decay, as torch.optim.AdamW)."""
  parts = []
  if cfg.clip and cfg.clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip))
  parts.append(optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay))
  return optax.chain(*parts)


def make_optimizer(optim_cfg, trained: Trained) -> optax.GradientTransformation:
  """One optimizer per trained network (own clipping and lr); every other param is frozen."""
  sections = as_sections(trained)
  missing = sorted({s for s in sections.values() if s not in optim_cfg})
  if missing:
    raise ValueError(f'optim: no section for network(s) {missing}; have {list(optim_cfg)}')
  transforms = {n: network_optimizer(optim_cfg[s]) for n, s in sorted(sections.items())}
  transforms[FROZEN] = optax.set_to_zero()
  return optax.multi_transform(transforms, lambda p: param_labels(p, optim_cfg, sections))


def ema_decays(optim_cfg, networks) -> Dict[str, float]:
  """{network: decay} of the networks that keep an EMA (`optim.<net>.ema_decay` > 0)."""
  out = {}
  for net in networks:
    decay = optim_cfg[net].get('ema_decay', 0.0) if net in optim_cfg else 0.0
    if not 0.0 <= decay < 1.0:
      raise ValueError(f'optim.{net}.ema_decay: must be in [0, 1), got {decay}')
    if decay:
      out[net] = float(decay)
  return out
