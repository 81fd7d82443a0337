"""DINO ViT-B/16 and CLIP ViT-B/32 weight files, as published -> our params (eval/vit.py).

    params, cfg = load_dino('dino_vitbase16_pretrain.pth')   # or HF dino-vitb16 model.safetensors
    params, cfg = load_clip('ViT-B-32.pt')                     # or open_clip / HF CLIP files

Layouts, told apart by their keys (a DDP 'module.' prefix, a {'state_dict': ...} wrapper and
transformers' 'vit.' prefix are removed first):
  DINO original      facebookresearch/dino `dino_vitbase16_pretrain.pth`, also timm's
                     `vit_base_patch16_224.dino`: cls_token, pos_embed, patch_embed.proj,
                     blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm
  DINO transformers  `ViTModel` (facebook/dino-vitb16), as save_pretrained writes it:
                     embeddings.{cls_token, position_embeddings, patch_embeddings.projection},
                     encoder.layer.N.{layernorm_before, attention.attention.{query,key,value},
                     attention.output.dense, layernorm_after, intermediate.dense, output.dense},
                     layernorm; the pooler / classifier (unused by the feature) is dropped
  CLIP openai        OpenAI's `ViT-B-32.pt` (a TorchScript archive: its state dict is read with
                     torch.jit.load) and open_clip's `open_clip_model.safetensors` /
                     `open_clip_pytorch_model.bin`: visual.{conv1, class_embedding,
                     positional_embedding, ln_pre, transformer.resblocks.N.{ln_1, attn.in_proj_*,
                     attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_post, proj}, token_embedding,
                     positional_embedding, transformer.resblocks.N..., ln_final, text_projection,
                     logit_scale
  CLIP transformers  `CLIPModel` (openai/clip-vit-base-patch32): vision_model.{embeddings.
                     {class_embedding, patch_embedding, position_embedding}, pre_layrnorm,
                     encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2,
                     mlp.fc1, mlp.fc2}, post_layernorm}, visual_projection, text_model.{embeddings.
                     {token_embedding, position_embedding}, encoder.layers.N..., final_layer_norm},
                     text_projection, logit_scale

Sizes come from the tensors: width, layers, patch, image size (from the position table), MLP width,
vocabulary, context length, projection width. Heads, activation and LayerNorm eps are not in
them. They come from the arguments, else from the config file published next to the weights
(transformers' config.json, open_clip's open_clip_config.json), else from the published models:
heads = width / 64 (true of all four); DINO original exact GELU, eps 1e-6; DINO transformers
ViTConfig's defaults (GELU, eps 1e-12); CLIP QuickGELU, eps 1e-5. OpenAI's weights need QuickGELU;
LAION-trained open_clip `ViT-B-32` files use exact GELU: pass act='gelu' when no
open_clip_config.json comes with them.
"""

import dataclasses
import json
import os
import re
import types
import zipfile
from typing import Any, Mapping, NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from shotstream_jax.convert import common
from shotstream_jax.eval import vit as vit_lib

HEAD_DIM = 64
LAYOUTS = ('original', 'transformers')            # DINO
CLIP_LAYOUTS = ('openai', 'transformers')


class _Src(NamedTuple):
  """Where one of our leaves comes from: checkpoint names (several are concatenated along the
  output axis, e.g. HF's separate q, k, v) and how the tensor is laid out there:
    copy     as ours (only concatenation / the reshape to ours)
    linear   torch Linear weight [out, in]: transposed to our [in, out]
    conv     torch Conv2d weight [W, 3, p, p]: to our [p, p, 3, W]
    batched  with leading singleton axes, [1, 1, W] / [1, tokens, W]
  """
  names: tuple
  op: str = 'copy'


def _per_layout(table, layout_index):
  return {path: srcs[layout_index] for path, srcs in table.items()}


def _linear(*names):
  return _Src(names, 'linear')


def _qkv(fmt, leaf):
  return tuple(fmt.format(n, leaf) for n in ('q', 'k', 'v'))


# our block leaf -> (_Src of layout 0, _Src of layout 1), names relative to the block prefix
_DINO_BLOCK = {
    ('norm1', 'scale'): (_Src(('norm1.weight',)), _Src(('layernorm_before.weight',))),
    ('norm1', 'bias'): (_Src(('norm1.bias',)), _Src(('layernorm_before.bias',))),
    ('attn', 'qkv', 'kernel'): (
        _linear('attn.qkv.weight'),
        _linear(*(f'attention.attention.{n}.weight' for n in ('query', 'key', 'value')))),
    ('attn', 'qkv', 'bias'): (
        _Src(('attn.qkv.bias',)),
        _Src(tuple(f'attention.attention.{n}.bias' for n in ('query', 'key', 'value')))),
    ('attn', 'out', 'kernel'): (_linear('attn.proj.weight'),
                                _linear('attention.output.dense.weight')),
    ('attn', 'out', 'bias'): (_Src(('attn.proj.bias',)), _Src(('attention.output.dense.bias',))),
    ('norm2', 'scale'): (_Src(('norm2.weight',)), _Src(('layernorm_after.weight',))),
    ('norm2', 'bias'): (_Src(('norm2.bias',)), _Src(('layernorm_after.bias',))),
    ('mlp', 'fc1', 'kernel'): (_linear('mlp.fc1.weight'), _linear('intermediate.dense.weight')),
    ('mlp', 'fc1', 'bias'): (_Src(('mlp.fc1.bias',)), _Src(('intermediate.dense.bias',))),
    ('mlp', 'fc2', 'kernel'): (_linear('mlp.fc2.weight'), _linear('output.dense.weight')),
    ('mlp', 'fc2', 'bias'): (_Src(('mlp.fc2.bias',)), _Src(('output.dense.bias',))),
}
_DINO_TOP = {
    ('patch_embed', 'kernel'): (_Src(('patch_embed.proj.weight',), 'conv'),
                                _Src(('embeddings.patch_embeddings.projection.weight',), 'conv')),
    ('patch_embed', 'bias'): (_Src(('patch_embed.proj.bias',)),
                              _Src(('embeddings.patch_embeddings.projection.bias',))),
    ('cls',): (_Src(('cls_token',), 'batched'), _Src(('embeddings.cls_token',), 'batched')),
    ('pos',): (_Src(('pos_embed',), 'batched'),
               _Src(('embeddings.position_embeddings',), 'batched')),
    ('norm', 'scale'): (_Src(('norm.weight',)), _Src(('layernorm.weight',))),
    ('norm', 'bias'): (_Src(('norm.bias',)), _Src(('layernorm.bias',))),
}
_DINO_BLOCK_PREFIX = ('blocks.{}.', 'encoder.layer.{}.')
# Present in some published files, not part of the feature: dropped before the key check.
_DINO_DROPPED = (('head.',), ('pooler.', 'classifier.', 'embeddings.mask_token'))

_CLIP_BLOCK = {
    ('norm1', 'scale'): (_Src(('ln_1.weight',)), _Src(('layer_norm1.weight',))),
    ('norm1', 'bias'): (_Src(('ln_1.bias',)), _Src(('layer_norm1.bias',))),
    ('attn', 'qkv', 'kernel'): (_linear('attn.in_proj_weight'),
                                _linear(*_qkv('self_attn.{}_proj.{}', 'weight'))),
    ('attn', 'qkv', 'bias'): (_Src(('attn.in_proj_bias',)),
                              _Src(_qkv('self_attn.{}_proj.{}', 'bias'))),
    ('attn', 'out', 'kernel'): (_linear('attn.out_proj.weight'),
                                _linear('self_attn.out_proj.weight')),
    ('attn', 'out', 'bias'): (_Src(('attn.out_proj.bias',)), _Src(('self_attn.out_proj.bias',))),
    ('norm2', 'scale'): (_Src(('ln_2.weight',)), _Src(('layer_norm2.weight',))),
    ('norm2', 'bias'): (_Src(('ln_2.bias',)), _Src(('layer_norm2.bias',))),
    ('mlp', 'fc1', 'kernel'): (_linear('mlp.c_fc.weight'), _linear('mlp.fc1.weight')),
    ('mlp', 'fc1', 'bias'): (_Src(('mlp.c_fc.bias',)), _Src(('mlp.fc1.bias',))),
    ('mlp', 'fc2', 'kernel'): (_linear('mlp.c_proj.weight'), _linear('mlp.fc2.weight')),
    ('mlp', 'fc2', 'bias'): (_Src(('mlp.c_proj.bias',)), _Src(('mlp.fc2.bias',))),
}
_CLIP_VISION_TOP = {
    ('patch_embed', 'kernel'): (_Src(('visual.conv1.weight',), 'conv'),
                                _Src(('vision_model.embeddings.patch_embedding.weight',), 'conv')),
    ('cls',): (_Src(('visual.class_embedding',)),
               _Src(('vision_model.embeddings.class_embedding',))),
    ('pos',): (_Src(('visual.positional_embedding',)),
               _Src(('vision_model.embeddings.position_embedding.weight',))),
    ('ln_pre', 'scale'): (_Src(('visual.ln_pre.weight',)),
                          _Src(('vision_model.pre_layrnorm.weight',))),
    ('ln_pre', 'bias'): (_Src(('visual.ln_pre.bias',)), _Src(('vision_model.pre_layrnorm.bias',))),
    ('norm', 'scale'): (_Src(('visual.ln_post.weight',)),
                        _Src(('vision_model.post_layernorm.weight',))),
    ('norm', 'bias'): (_Src(('visual.ln_post.bias',)),
                       _Src(('vision_model.post_layernorm.bias',))),
    ('proj',): (_Src(('visual.proj',)), _linear('visual_projection.weight')),
}
_CLIP_TEXT_TOP = {
    ('token_embedding',): (_Src(('token_embedding.weight',)),
                           _Src(('text_model.embeddings.token_embedding.weight',))),
    ('pos',): (_Src(('positional_embedding',)),
               _Src(('text_model.embeddings.position_embedding.weight',))),
    ('norm', 'scale'): (_Src(('ln_final.weight',)),
                        _Src(('text_model.final_layer_norm.weight',))),
    ('norm', 'bias'): (_Src(('ln_final.bias',)), _Src(('text_model.final_layer_norm.bias',))),
    ('proj',): (_Src(('text_projection',)), _linear('text_projection.weight')),
}
_CLIP_BLOCK_PREFIX = {'visual': ('visual.transformer.resblocks.{}.',
                                 'vision_model.encoder.layers.{}.'),
                      'text': ('transformer.resblocks.{}.', 'text_model.encoder.layers.{}.')}
_CLIP_DROPPED = (
    # OpenAI's TorchScript archive also stores its build arguments as tensors.
    ('input_resolution', 'context_length', 'vocab_size'),
    # position_ids: a buffer that older transformers versions saved.
    ('text_model.embeddings.position_ids', 'vision_model.embeddings.position_ids'))


# ---------------------------------------------------------------------------- file reading


def _is_torchscript(path: str) -> bool:
  """A TorchScript archive (OpenAI's CLIP .pt files) rather than a pickled state dict."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any(n.endswith('/constants.pkl') or '/code/' in n for n in z.namelist())


def read_state_dict(path: str) -> Mapping[str, Any]:
  """name -> tensor of a .safetensors / .pt / .pth / .bin file, TorchScript archives included.

  TorchScript (`torch.jit.load`) runs the archive's TorchScript deserializer, not arbitrary
  Python: only ever pass files from a source you trust, as with any .pt.
  """
  if os.path.isfile(path) and os.path.splitext(path)[1].lower() in ('.pt', '.pth', '.bin'):
    if _is_torchscript(path):
      try:
        import torch  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise common.CheckpointError(f'checkpoint: reading the TorchScript archive {path} needs '
                                     'torch (pip install -r requirements-test.txt)') from e
      try:
        return dict(torch.jit.load(path, map_location='cpu').state_dict())
      except Exception as e:
        first = (str(e).strip().splitlines() or [''])[0]
        raise common.CheckpointError(f'checkpoint: cannot read {path} as a TorchScript archive '
                                     f'({type(e).__name__}: {first})') from e
  return common.load_state_dict(path)


def _unwrap(state_dict: Mapping[str, Any]) -> dict:
  """Drop a {'state_dict': ...} training wrapper (open_clip) and a DDP 'module.' prefix."""
  inner = state_dict.get('state_dict')
  if isinstance(inner, Mapping):
    state_dict = inner
  return common.strip_prefix(state_dict, ('module.',))


def _sidecar(path: str, name: str) -> Optional[dict]:
  """The JSON config published next to a weights file, if there is one."""
  side = os.path.join(os.path.dirname(os.path.abspath(path)), name)
  if not os.path.isfile(side):
    return None
  try:
    with open(side) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise common.CheckpointError(f'checkpoint: cannot read the config {side} next to {path}: '
                                 f'{e}') from e


# ---------------------------------------------------------------------------- layouts


def _some_keys(keys):
  keys = sorted(keys)
  return ', '.join(keys[:4]) + (' ...' if len(keys) > 4 else '') if keys else 'no keys'


def _looks_like_clip(keys):
  return any(k.startswith(('visual.', 'vision_model.', 'text_model.')) for k in keys)


def detect_dino_layout(keys) -> str:
  """'original' (DINO / timm) or 'transformers' (ViTModel) from a state dict's key names."""
  keys = list(keys)
  if any(k == 'cls_token' or k.startswith(('blocks.', 'patch_embed.')) for k in keys):
    return 'original'
  if any(k.startswith(('embeddings.patch_embeddings.', 'encoder.layer.')) for k in keys):
    return 'transformers'
  if _looks_like_clip(keys):
    raise common.CheckpointError('DINO checkpoint: this is a CLIP state dict (visual.* / '
                                 'vision_model.* keys); load it with load_clip')
  raise common.CheckpointError(
      'DINO checkpoint: unknown layout (expected DINO / timm keys like cls_token, blocks.0.attn.qkv'
      '.weight, or transformers ViTModel keys like embeddings.cls_token, encoder.layer.0...; got '
      f'{_some_keys(keys)})')


def detect_clip_layout(keys) -> str:
  """'openai' (OpenAI / open_clip) or 'transformers' (CLIPModel) from a state dict's keys."""
  keys = list(keys)
  if any(k.startswith('visual.') for k in keys):
    return 'openai'
  if any(k.startswith(('vision_model.', 'text_model.')) for k in keys):
    return 'transformers'
  if any(k == 'cls_token' or k.startswith(('blocks.', 'embeddings.', 'encoder.layer.'))
         for k in keys):
    raise common.CheckpointError('CLIP checkpoint: this is a ViT / DINO state dict (no text '
                                 'tower); load it with load_dino')
  raise common.CheckpointError(
      'CLIP checkpoint: unknown layout (expected OpenAI / open_clip keys like visual.conv1.weight, '
      'token_embedding.weight, or transformers CLIPModel keys like vision_model.embeddings...; '
      f'got {_some_keys(keys)})')


def _shape(sd, key, what):
  if key not in sd:
    raise common.CheckpointError(f'{what}: missing key {key!r} (needed to infer the model size)')
  return common.shape_of(sd[key])


def _num_layers(keys, prefix_fmt, what):
  pattern = re.compile('^' + re.escape(prefix_fmt.format('@')).replace('@', r'(\d+)'))
  found = {int(m.group(1)) for m in map(pattern.match, keys) if m}
  if not found:
    raise common.CheckpointError(f'{what}: no transformer blocks (no {prefix_fmt.format("N")}* '
                                 'keys)')
  return max(found) + 1


def _grid(tokens, what):
  grid = int(round(np.sqrt(tokens - 1)))
  if grid * grid != tokens - 1:
    raise common.CheckpointError(f'{what}: the position table has {tokens} rows, not 1 + a '
                                 'square patch grid')
  return grid


def _heads(width, given, hint, arg):
  heads = given or hint or width // HEAD_DIM
  if heads < 1 or width % heads:
    raise common.CheckpointError(f'{arg}: {heads} heads do not divide the width {width}; pass '
                                 f'{arg}= explicitly')
  return int(heads)


# ---------------------------------------------------------------------------- conversion


def _torch_shape(ours: tuple, src: _Src) -> tuple:
  """The checkpoint shape of each of `src.names` for our leaf shape `ours`."""
  n = len(src.names)
  if src.op == 'conv':
    p, q, c, w = ours
    return (w, c, p, q)
  if src.op == 'linear':
    return (ours[1] // n, ours[0])
  if src.op == 'batched':
    return (1,) * (3 - len(ours)) + tuple(ours)
  return (ours[0] // n,) + tuple(ours[1:]) if ours else ()


def _to_ours(arrs, src: _Src, ours: tuple) -> np.ndarray:
  if src.op == 'conv':
    return arrs[0].transpose(2, 3, 1, 0)
  arr = np.concatenate(arrs, axis=0) if len(arrs) > 1 else arrs[0]
  return arr.T if src.op == 'linear' else arr.reshape(ours)


def _plan(shapes, top, block, block_prefix, layers):
  """{our leaf path: [(_Src with full names, per-layer shape)] one entry per layer (blocks) or
  a single one (top level)}."""
  plan = {}
  for path, s in common.flatten(shapes).items():
    if path[0] == 'blocks':
      src = block[path[1:]]
      plan[path] = [(_Src(tuple(block_prefix.format(i) + n for n in src.names), src.op),
                     tuple(s.shape[1:])) for i in range(layers)]
    else:
      plan[path] = [(top[path], tuple(s.shape))]
  return plan


def _expected(plans) -> dict:
  return {name: _torch_shape(shape, src)
          for plan in plans for entries in plan.values() for src, shape in entries
          for name in src.names}


def _convert(sd, plan) -> dict:
  params = {}
  for path, entries in plan.items():
    leaves = [_to_ours([common.to_numpy(sd[n], np.float32) for n in src.names], src, shape)
              for src, shape in entries]
    leaf = np.stack(leaves) if path[0] == 'blocks' else leaves[0]
    common.set_in(params, path, jnp.asarray(leaf))
  return params


def _check(sd, plans, dropped, what):
  got = {k: types.SimpleNamespace(shape=common.shape_of(v)) for k, v in sd.items()
         if not k.startswith(dropped)}
  common.check_keys(_expected(plans), got, what)


def _hf_act(config, field):
  act = (config or {}).get('hidden_act')
  if act is not None and act not in vit_lib.ACTIVATIONS:
    raise common.CheckpointError(f'{field}: unsupported hidden_act {act!r}; accepted: '
                                 f'{", ".join(vit_lib.ACTIVATIONS)}')
  return act


def dino_from_state_dict(state_dict: Mapping[str, Any], heads: Optional[int] = None,
                         eps: Optional[float] = None, hf_config: Optional[dict] = None):
  """(params, ViTConfig) from a DINO state dict in either layout (see the module docstring).

  Args:
    state_dict: name -> tensor (numpy or torch).
    heads, eps: override what the file and `hf_config` say (see the module docstring).
    hf_config: the transformers config.json published with a ViTModel file, if any.

  Raises:
    CheckpointError: unknown layout, or keys / shapes that do not fit one ViT (listed).
  """
  sd = common.strip_prefix(_unwrap(state_dict), ('vit.',))
  layout = detect_dino_layout(sd.keys())
  col = LAYOUTS.index(layout)
  what = f'DINO checkpoint ({layout} layout)'
  top, block = _per_layout(_DINO_TOP, col), _per_layout(_DINO_BLOCK, col)
  prefix = _DINO_BLOCK_PREFIX[col]
  width = _shape(sd, top[('cls',)].names[0], what)[-1]
  patch = _shape(sd, top[('patch_embed', 'kernel')].names[0], what)[-1]
  grid = _grid(_shape(sd, top[('pos',)].names[0], what)[-2], what)
  layers = _num_layers(sd.keys(), prefix, what)
  mlp = _shape(sd, prefix.format(0) + block[('mlp', 'fc1', 'kernel')].names[0], what)[0]
  hf = (hf_config or {}) if layout == 'transformers' else {}
  if layout == 'original':
    act, default_eps = 'gelu', 1e-6
  else:   # what ViTModel runs this file with: its config.json, else ViTConfig's defaults
    act, default_eps = _hf_act(hf, 'DINO config.json') or 'gelu', 1e-12
  cfg = dataclasses.replace(
      vit_lib.dino_vitb16(), image_size=grid * patch, patch=patch, width=width, layers=layers,
      heads=_heads(width, heads, hf.get('num_attention_heads'), 'heads'),
      mlp_ratio=mlp / width, act=act,
      eps=float(eps if eps is not None else hf.get('layer_norm_eps', default_eps)))
  plan = _plan(vit_lib.param_shapes(cfg), top, block, prefix, layers)
  _check(sd, [plan], _DINO_DROPPED[col], what)
  return _convert(sd, plan), cfg


def load_dino(path: str, heads: Optional[int] = None, eps: Optional[float] = None):
  """(params, ViTConfig) of a DINO ViT weights file (.pth / .bin / .safetensors, either layout).

  A transformers config.json next to the file supplies heads, activation and eps.
  """
  return dino_from_state_dict(read_state_dict(path), heads=heads, eps=eps,
                              hf_config=_sidecar(path, 'config.json'))


def _clip_hints(layout, hf_config, open_clip_config):
  """{'visual' / 'text': {'heads', 'act', 'eps'}} from the config file of the file's layout.

  open_clip's hub folders hold both layouts side by side (open_clip_model.safetensors with
  open_clip_config.json, model.safetensors with config.json): each file takes its own config.
  """
  hints = {'visual': {}, 'text': {}}
  if layout == 'transformers' and hf_config:
    for tower, key in (('visual', 'vision_config'), ('text', 'text_config')):
      sub = hf_config.get(key) or {}
      hints[tower] = {'heads': sub.get('num_attention_heads'), 'eps': sub.get('layer_norm_eps'),
                      'act': _hf_act(sub, f'CLIP config.json {key}')}
  elif layout == 'openai' and open_clip_config:
    model_cfg = open_clip_config.get('model_cfg', open_clip_config)
    act = 'quick_gelu' if model_cfg.get('quick_gelu', False) else 'gelu'
    vision, text = model_cfg.get('vision_cfg') or {}, model_cfg.get('text_cfg') or {}
    head_width = vision.get('head_width', HEAD_DIM)
    hints['visual'] = {'act': act,
                       'heads': vision['width'] // head_width if 'width' in vision else None}
    hints['text'] = {'act': act, 'heads': text.get('heads', 8)}   # open_clip's default: 8
  return hints


def clip_from_state_dict(state_dict: Mapping[str, Any], act: Optional[str] = None,
                         heads: Optional[int] = None, text_heads: Optional[int] = None,
                         hf_config: Optional[dict] = None,
                         open_clip_config: Optional[dict] = None):
  """(params, CLIPConfig) from a CLIP state dict in either layout (see the module docstring).

  Args:
    state_dict: name -> tensor (numpy or torch).
    act: 'quick_gelu' or 'gelu' for both towers (default: the config files', else QuickGELU).
    heads, text_heads: heads of the image / text tower (default: config files, else width / 64).
    hf_config, open_clip_config: the config.json / open_clip_config.json published with the file.

  Raises:
    CheckpointError: unknown layout, or keys / shapes that do not fit one CLIP (listed).
  """
  sd = _unwrap(state_dict)
  layout = detect_clip_layout(sd.keys())
  col = CLIP_LAYOUTS.index(layout)
  what = f'CLIP checkpoint ({layout} layout)'
  if act is not None and act not in vit_lib.ACTIVATIONS:
    raise ValueError(f'act: unknown activation {act!r}; accepted: {", ".join(vit_lib.ACTIVATIONS)}')
  hints = _clip_hints(layout, hf_config, open_clip_config)
  vtop, ttop = _per_layout(_CLIP_VISION_TOP, col), _per_layout(_CLIP_TEXT_TOP, col)
  block = _per_layout(_CLIP_BLOCK, col)
  vprefix, tprefix = (_CLIP_BLOCK_PREFIX[t][col] for t in ('visual', 'text'))

  width = _shape(sd, vtop[('cls',)].names[0], what)[-1]
  patch = _shape(sd, vtop[('patch_embed', 'kernel')].names[0], what)[-1]
  grid = _grid(_shape(sd, vtop[('pos',)].names[0], what)[0], what)
  proj = _shape(sd, vtop[('proj',)].names[0], what)
  vlayers = _num_layers(sd.keys(), vprefix, what)
  vmlp = _shape(sd, vprefix.format(0) + block[('mlp', 'fc1', 'kernel')].names[0], what)[0]
  vocab, twidth = _shape(sd, ttop[('token_embedding',)].names[0], what)
  context = _shape(sd, ttop[('pos',)].names[0], what)[0]
  tproj = _shape(sd, ttop[('proj',)].names[0], what)
  tlayers = _num_layers(sd.keys(), tprefix, what)
  tmlp = _shape(sd, tprefix.format(0) + block[('mlp', 'fc1', 'kernel')].names[0], what)[0]
  out_dim, text_out = (proj[1], tproj[1]) if layout == 'openai' else (proj[0], tproj[0])

  base = vit_lib.clip_vitb32()
  vh, th = hints['visual'], hints['text']
  vision = dataclasses.replace(
      base.vision, image_size=grid * patch, patch=patch, width=width, layers=vlayers,
      heads=_heads(width, heads, vh.get('heads'), 'heads'), mlp_ratio=vmlp / width,
      act=act or vh.get('act') or 'quick_gelu', proj_dim=out_dim,
      eps=float(vh.get('eps') or base.vision.eps))
  text = dataclasses.replace(
      base.text, vocab_size=vocab, context=context, width=twidth, layers=tlayers,
      heads=_heads(twidth, text_heads, th.get('heads'), 'text_heads'),
      mlp_ratio=tmlp / twidth, act=act or th.get('act') or 'quick_gelu', proj_dim=text_out,
      eps=float(th.get('eps') or base.text.eps))
  try:
    cfg = vit_lib.CLIPConfig(vision, text)
  except ValueError as e:
    raise common.CheckpointError(f'{what}: {e}') from None

  shapes = vit_lib.param_shapes(cfg)
  vplan = _plan(shapes['visual'], vtop, block, vprefix, vlayers)
  tplan = _plan(shapes['text'], ttop, block, tprefix, tlayers)
  scale_plan = {('logit_scale',): [(_Src(('logit_scale',)), ())]}
  _check(sd, [vplan, tplan, scale_plan], _CLIP_DROPPED[col], what)
  params = {'visual': _convert(sd, vplan), 'text': _convert(sd, tplan),
            'logit_scale': jnp.asarray(common.to_numpy(sd['logit_scale'], np.float32).reshape(()))}
  return params, cfg


def load_clip(path: str, act: Optional[str] = None, heads: Optional[int] = None,
              text_heads: Optional[int] = None):
  """(params, CLIPConfig) of a CLIP weights file (.pt TorchScript / .pth / .bin / .safetensors).

  A transformers config.json or an open_clip_config.json next to the file supplies heads and
  activation (and eps, transformers); `act` / `heads` / `text_heads` override them.
  """
  return clip_from_state_dict(read_state_dict(path), act=act, heads=heads, text_heads=text_heads,
                              hf_config=_sidecar(path, 'config.json'),
                              open_clip_config=_sidecar(path, 'open_clip_config.json'))

