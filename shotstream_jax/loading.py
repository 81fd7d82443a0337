"""Every network's weights from any source: the one place that reads a weights path.

    params = load_network_params(path, 'teacher', config.model, sharding=shardings['teacher'])
    vae_params = load_vae(path, config.vae);  text_params = load_text(path, config.text)

A DiT `path` may be
  * a training workdir of ours (has `checkpoints/`): the newest *complete* step's item 'state',
    only its ema[network] (when the run kept an EMA of that network: the weights it is judged
    by) or else params[network] is read (orbax partial restore; the optimizer state is skipped);
  * one checkpoint step directory of ours (`<workdir>/checkpoints/<step>`, has `state/`);
  * an orbax params directory written by shotstream_jax/checkpoints.py (launch/convert.py);
  * a Wan / ShotStream / diffusers `.safetensors` / `.pt` / `.pth` file (convert/dit.py).
The VAE and umT5 load from the same kinds of places (their published files through
convert/vae.py and convert/umt5.py). Generation, precompute, every training stage's
`*.init_from` / `*.teacher_from` / `*.vae_path` field and export all read through here, so they
accept the same things and refuse the same things (missing paths, NaN/Inf, other shapes).
`embedded_prompt_encoder` is the embedded random text encoder the random-weight paths share.
"""

import json
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from shotstream_jax import checkpoints
from shotstream_jax import text as text_lib
from shotstream_jax.convert import dit as convert_dit
from shotstream_jax.convert import umt5 as convert_umt5
from shotstream_jax.convert import vae as convert_vae
from shotstream_jax.models import dit
from shotstream_jax.models import random_init
from shotstream_jax.models import tokenizer as tokenizer_lib
from shotstream_jax.models import umt5
from shotstream_jax.models import vae as vae_lib

CHECKPOINTS = 'checkpoints'   # training/train_loop.py: <workdir>/checkpoints/<step>/{state,data}
STATE_ITEM = 'state'


def _from_newest_step(ckpt_dir: str, load):
  """load(step_dir) of the newest finalized step that loads with finite params; a damaged
  newest step (checkpoints.newest_loadable) is skipped with a warning, not fatal."""
  with ocp.CheckpointManager(ckpt_dir, item_names=(STATE_ITEM, 'data'),
                             options=ocp.CheckpointManagerOptions(create=False)) as manager:
    steps = list(manager.all_steps())
  found = checkpoints.newest_loadable(ckpt_dir, steps,
                                      lambda step: load(os.path.join(ckpt_dir, str(step))))
  if found is None:
    raise FileNotFoundError(f'init: no complete checkpoint in {ckpt_dir}')
  return found[1]


def _saved_tree(ckptr, state_dir: str) -> dict:
  saved = ckptr.metadata(state_dir)
  tree = getattr(saved, 'item_metadata', saved)
  tree = getattr(tree, 'tree', tree)
  return tree if isinstance(tree, dict) else {}


def _collection(tree: dict, network: str) -> str:
  """'ema' when the checkpoint keeps an EMA of `network` (train_loop.with_ema), else 'params'."""
  return 'ema' if network in (tree.get('ema') or {}) else 'params'


def _restore_network(step_dir: str, network: str, model_cfg, field: str, sharding=None):
  """ema[network] (or params[network]) of a TrainState checkpoint, nothing else read."""
  state_dir = os.path.join(step_dir, STATE_ITEM)
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = _saved_tree(ckptr, state_dir)
    nets = list(tree.get('params', {}))
    if network not in nets:
      raise ValueError(f'{field}: checkpoint {step_dir} has no network {network!r}; '
                       f'it holds {nets}')
    if f'{network}_lora' in nets:   # base alone would silently drop the trained adapters
      raise ValueError(f'{field}: {network!r} of {step_dir} was trained with LoRA adapters; '
                       'merge them first: launch/export.py --config=<that run\'s config> '
                       '--workdir=<run> --out=<new path>, then pass that path')
    shapes = dit.param_shapes(model_cfg)
    if sharding is None:
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if not isinstance(sharding, jax.sharding.Sharding):
      sharding = jax.tree.leaves(sharding, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
      sharding = jax.tree.unflatten(jax.tree.structure(shapes), sharding)
    else:
      sharding = jax.tree.map(lambda _: sharding, shapes)
    source = _collection(tree, network)
    target = {source: {network: shapes}}
    restore_args = {source: {network: jax.tree.map(
        lambda x, s: ocp.ArrayRestoreArgs(dtype=x.dtype, sharding=s), shapes, sharding)}}
    out = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
  return out[source][network]


def check_shapes(params, model_cfg, path: str, field: str):
  """Raise unless `params` are DiT params of `model_cfg` (structure and every shape)."""
  _check_tree(params, dit.param_shapes(model_cfg), path, field)


def _check_tree(params, want, path: str, field: str):
  got_s = jax.tree.structure(params)
  if got_s != jax.tree.structure(want):
    raise ValueError(f'{field}: params in {path} do not match the model config\'s structure '
                     '(another model preset?)')
  bad = [jax.tree_util.keystr(p) for (p, a), b in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(want))
         if tuple(a.shape) != tuple(b.shape)]
  if bad:
    raise ValueError(f'{field}: params in {path} have other shapes than the model config at '
                     f'{bad[:3]} (another model preset?)')


def _restore_orbax(path: str, field: str):
  """Params of an orbax params directory (checkpoints.save_params), errors naming `field`."""
  try:
    return checkpoints.restore_params(path)
  except checkpoints.NonFiniteParamsError as e:
    raise ValueError(f'{field}: {e}') from None
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f'{field}: {path} is neither a training workdir (no {CHECKPOINTS}/) nor '
                     f'an orbax params directory ({e})') from e


def load_network_params(path: str, network: str, model_cfg, *, sharding: Optional[Any] = None,
                        field: str = 'init_from'):
  """DiT params of `network` from `path` (see the module docstring), placed by `sharding`.

  `field` names the config field in error messages. Raises FileNotFoundError when nothing is
  at `path` and ValueError when it holds no usable params for `model_cfg`.
  """
  if not path:
    raise ValueError(f'{field}: empty path; give a training workdir, an orbax params dir or a '
                     'Wan/ShotStream .safetensors/.pt/.pth file')
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f'{field}: {path} does not exist')
  if os.path.isdir(os.path.join(path, CHECKPOINTS)):
    params = _from_newest_step(os.path.join(path, CHECKPOINTS), lambda d: _restore_network(
        d, network, model_cfg, field, sharding))
  elif os.path.isdir(os.path.join(path, STATE_ITEM)):
    params = _restore_network(path, network, model_cfg, field, sharding)
    _check_finite(params, path, field)
  elif os.path.isdir(path):
    params = _restore_orbax(path, field)
  else:
    params = convert_dit.load_dit(path, model_cfg)
    _check_finite(params, path, field)
  # (a workdir's steps and orbax params directories are checked for NaN/Inf as they load)
  check_shapes(params, model_cfg, path, field)
  return jax.device_put(params, sharding) if sharding is not None else params


def restore_networks(path: str, networks, field: str = '--workdir') -> dict:
  """{network: params as saved} from a training workdir or step dir, nothing else read (a
  network's EMA where the run kept one, as `load_network_params`).

  Unlike `load_network_params` the shapes come from the checkpoint itself, so LoRA adapter
  networks (`generator_lora`, ...) restore too; arrays land on the first local device.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, CHECKPOINTS)):
    return _from_newest_step(os.path.join(path, CHECKPOINTS),
                             lambda d: _restore_step_networks(d, networks, field))
  out = _restore_step_networks(path, networks, field)
  _check_finite(out, path, field)
  return out


def _check_finite(params, path: str, field: str):
  bad = checkpoints.nonfinite_paths(params)
  if bad:
    raise ValueError(f'{field}: {path} holds non-finite params (NaN/Inf at {bad})')


def _restore_step_networks(path: str, networks, field: str) -> dict:
  state_dir = os.path.join(path, STATE_ITEM)
  if not os.path.isdir(state_dir):
    raise FileNotFoundError(f'{field}: {path} is not a training workdir (no {CHECKPOINTS}/) '
                            f'nor a checkpoint step directory (no {STATE_ITEM}/)')
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = _saved_tree(ckptr, state_dir)
    have = tree.get('params', {})
    missing = [n for n in networks if n not in have]
    if missing:
      raise ValueError(f'{field}: checkpoint {path} has no network(s) {missing}; it holds '
                       f'{list(have)}')
    target = {}
    for n in networks:
      source = _collection(tree, n)
      target.setdefault(source, {})[n] = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree[source][n])
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(dtype=x.dtype, sharding=device),
                                target)
    out = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
  return {n: out[_collection(tree, n)][n] for n in networks}


def check_run_config(path: str, config, field: str = '--ckpt'):
  """Raise if a training workdir was trained at other model or shot sizes than `config`
  (the networks would load, then generate at sizes they never saw), naming the flags to pass.
  Paths that are not workdirs of ours (files, orbax dirs) are not checked."""
  run = os.path.join(os.path.abspath(os.path.expanduser(path)), 'config.json')
  if not os.path.isfile(run):
    return
  with open(run) as f:
    saved = json.load(f)
  fields = [('model', k) for k in ('dim', 'num_layers', 'num_heads', 'ffn_dim', 'text_dim',
                                   'chunk_frames', 'context_frames')]
  fields += [('sampling', k) for k in ('height', 'width', 'shot_latent_frames')]
  bad = [f'--config.{sec}.{k}={saved[sec][k]}' for sec, k in fields
         if sec in saved and k in saved[sec] and saved[sec][k] != config[sec][k]]
  if bad:
    raise ValueError(f'{field}: {path} was trained with other sizes than this --config; pass '
                     + ' '.join(bad))


# ----------------------------------------------------------------------------- encoders


def _is_training_dir(path: str) -> bool:
  return (os.path.isdir(os.path.join(path, CHECKPOINTS))
          or os.path.isdir(os.path.join(path, STATE_ITEM)))


def _load_network(path: str, network: str, want, read_file, field: str):
  """`network`'s params from a published file (`read_file`), an orbax params directory, or a
  training workdir / step directory of ours; refused when absent, non-finite or not `want`'s
  structure and shapes."""
  if not path:
    raise ValueError(f'{field}: a checkpoint path is required')
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f'{field}: {path} does not exist')
  if _is_training_dir(path):
    params = restore_networks(path, [network], field)[network]
  elif os.path.isdir(path):
    params = _restore_orbax(path, field)
  else:
    params = read_file(path)
    _check_finite(params, path, field)
  _check_tree(params, want, path, field)
  return params


def load_dit(path: str, config, field: str = '--ckpt'):
  """The generation DiT (`config`: configs/shotstream.py) from a Wan / ShotStream / diffusers
  file, our orbax params directory, or a training workdir / checkpoint step of ours (its
  'generator' network, refused when trained at other sizes)."""
  if not path:
    raise ValueError(f'{field}: a checkpoint path is required')
  check_run_config(path, config, field)
  return load_network_params(path, 'generator', config.model, field=field)


def load_vae(path: str, vae_cfg, field: str = '--vae'):
  """VAE params: a Wan `.pth` / `.safetensors` file, an orbax params dir, or a stage-0 run."""
  return _load_network(path, 'vae', vae_lib.param_shapes(vae_cfg),
                       lambda p: convert_vae.load_vae(p, vae_cfg), field)


def load_text(path: str, text_cfg, field: str = '--text_encoder'):
  """umT5 params: a `.pth` / `.safetensors` file (either layout) or an orbax params dir."""
  return _load_network(path, 'text', umt5.param_shapes(text_cfg),
                       lambda p: convert_umt5.load_umt5(p, text_cfg), field)


def embedded_prompt_encoder(config, seed: int, tokenizer=None) -> text_lib.PromptEncoder:
  """The embedded random umT5 (`seed`) with the hash tokenizer, or `tokenizer`."""
  tokenizer = tokenizer or tokenizer_lib.HashTokenizer(config.text.text_len,
                                                       config.text.vocab_size)
  return text_lib.PromptEncoder(random_init.embedded_text(config.text, seed), config.text,
                                tokenizer)
