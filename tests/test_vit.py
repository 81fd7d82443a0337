"""DINO / CLIP ViTs (eval/vit.py) and their importers (convert/vit.py) vs the torch references.

Each reference model is tiny and randomly initialised here (nothing is downloaded). Its weights
are written in a published layout and file format, read back with our loader, and both sides
embed the same random images / token ids. References: transformers ViTModel / CLIPModel (test
extras), timm's VisionTransformer and open_clip's CLIP (skipped where they, or the torchvision they
import, cannot be imported), torch's own interpolate for the resizing.
"""

import importlib
import json

import jax.numpy as jnp
import numpy as np
import pytest

from shotstream_jax.convert import common
from shotstream_jax.convert import vit as convert
from shotstream_jax.eval import vit

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
safetensors_torch = pytest.importorskip('safetensors.torch')

TOL = 1e-4
WIDTH, LAYERS, HEADS, PATCH, IMAGE, CONTEXT, VOCAB, EMBED = 64, 2, 4, 8, 32, 16, 100, 32
EOT = VOCAB - 1     # the largest id, as in OpenAI's tokenizer


def _import_or_skip(name):
  """Like pytest.importorskip, but also skips on the RuntimeError a torchvision built for another
  torch raises at import (timm and open_clip import torchvision)."""
  try:
    return importlib.import_module(name)
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f'{name} cannot be imported here: {type(e).__name__}: {str(e)[:120]}')


def _perturb(model, seed=0):
  """Random offsets on every weight, LayerNorm scales and biases too, so that a swapped or
  transposed tensor cannot hide behind an init of ones / zeros."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _images(b=2, h=IMAGE, w=IMAGE, seed=0):
  return np.random.default_rng(seed).standard_normal((b, h, w, 3)).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _tokens(lengths=(5, CONTEXT), seed=0):
  """[B, CONTEXT] ids: random words, EOT at position length - 1, zero padding after."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((len(lengths), CONTEXT), np.int64)
  for row, n in enumerate(lengths):
    ids[row, :n - 1] = rng.integers(1, EOT - 1, n - 1)
    ids[row, n - 1] = EOT
  return ids


def _out(x):
  """A torch output as numpy (transformers' get_*_features return an output object in v5)."""
  x = getattr(x, 'pooler_output', x)
  return x.detach().numpy()


def _max_diff(ours, ref):
  ours = np.asarray(ours)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)))


def _hf_vit_config(image_size=IMAGE):
  return transformers.ViTConfig(hidden_size=WIDTH, num_hidden_layers=LAYERS,
                                num_attention_heads=HEADS, intermediate_size=4 * WIDTH,
                                image_size=image_size, patch_size=PATCH, layer_norm_eps=1e-6,
                                hidden_act='gelu')


def _hf_clip_config(width=WIDTH, heads=HEADS):
  text = dict(vocab_size=VOCAB, hidden_size=width, intermediate_size=4 * width,
              num_hidden_layers=LAYERS, num_attention_heads=heads,
              max_position_embeddings=CONTEXT, bos_token_id=EOT - 1, eos_token_id=EOT,
              pad_token_id=0)
  vision = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=LAYERS,
                num_attention_heads=heads, image_size=IMAGE, patch_size=PATCH)
  return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=EMBED)


@pytest.fixture(scope='module')
def hf_vit(tmp_path_factory):
  """(ViTModel, its save_pretrained folder: config.json + model.safetensors)."""
  torch.manual_seed(0)
  model = _perturb(transformers.ViTModel(_hf_vit_config()), seed=1)
  folder = tmp_path_factory.mktemp('dino_hf')
  model.save_pretrained(folder)
  return model, folder


@pytest.fixture(scope='module')
def hf_clip(tmp_path_factory):
  """(CLIPModel, its save_pretrained folder)."""
  torch.manual_seed(0)
  model = _perturb(transformers.CLIPModel(_hf_clip_config()), seed=2)
  folder = tmp_path_factory.mktemp('clip_hf')
  model.save_pretrained(folder)
  return model, folder


# ---------------------------------------------------------------------------------------- DINO


def test_dino_original_layout_matches_timm(tmp_path):
  timm = _import_or_skip('timm')
  torch.manual_seed(0)
  model = _perturb(timm.models.vision_transformer.VisionTransformer(
      img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=LAYERS, num_heads=HEADS,
      num_classes=0))
  path = tmp_path / 'dino_vitbase16_pretrain.pth'
  torch.save(model.state_dict(), path)
  params, cfg = convert.load_dino(str(path), heads=HEADS)
  assert (cfg.width, cfg.layers, cfg.patch, cfg.image_size, cfg.act, cfg.eps) == (
      WIDTH, LAYERS, PATCH, IMAGE, 'gelu', 1e-6)
  x = _images()
  with torch.no_grad():
    ref = model(_nchw(x)).numpy()
  assert _max_diff(vit.image_features(params, cfg, x), ref) <= TOL


@pytest.mark.parametrize('file_name', ['model.safetensors', 'pytorch_model.bin'])
def test_dino_transformers_layout_matches_vit_model(hf_vit, tmp_path, file_name):
  model, folder = hf_vit
  path = folder / 'model.safetensors'
  if file_name.endswith('.bin'):   # the same tensors as an older torch.save'd checkpoint
    (tmp_path / 'config.json').write_text((folder / 'config.json').read_text())
    path = tmp_path / file_name
    torch.save(safetensors_torch.load_file(str(folder / 'model.safetensors')), path)
  params, cfg = convert.load_dino(str(path))
  assert (cfg.width, cfg.layers, cfg.heads, cfg.eps) == (WIDTH, LAYERS, HEADS, 1e-6)
  x = _images()
  with torch.no_grad():
    ref = model(pixel_values=_nchw(x)).last_hidden_state[:, 0].numpy()
  assert _max_diff(vit.image_features(params, cfg, x), ref) <= TOL


def _dino_resampled_positions(pos, grid, out_grid):
  """The [1, 1 + gh * gw, W] table DINO's hub model derives, with torch's interpolate."""
  gh, gw = out_grid
  patches = pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
  patches = torch.nn.functional.interpolate(
      patches, scale_factor=((gh + 0.1) / grid, (gw + 0.1) / grid), mode='bicubic',
      align_corners=False)
  assert tuple(patches.shape[-2:]) == (gh, gw)
  return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)


@pytest.mark.parametrize('hw', [(32, 56), (36, 32)])   # 4x7 patches; 4x4 patches, not square
def test_dino_non_square_input_resamples_positions_like_the_hub_model(hf_vit, hw):
  """VBench feeds DINO short-side-224 frames uncropped. The reference: a ViTModel built for that
  exact size, holding the table torch's bicubic interpolate makes of the square one."""
  model, folder = hf_vit
  h, w = hw
  out_grid = (h // PATCH, w // PATCH)
  sd = dict(model.state_dict())
  with torch.no_grad():
    sd['embeddings.position_embeddings'] = _dino_resampled_positions(
        sd['embeddings.position_embeddings'], IMAGE // PATCH, out_grid)
  sized = transformers.ViTModel(_hf_vit_config(image_size=(out_grid[0] * PATCH,
                                                           out_grid[1] * PATCH))).eval()
  sized.load_state_dict(sd)
  x = _images(h=h, w=w, seed=3)
  crop = x[:, :out_grid[0] * PATCH, :out_grid[1] * PATCH]  # the strided conv ignores the rest
  with torch.no_grad():
    ref = sized(pixel_values=_nchw(crop)).last_hidden_state[:, 0].numpy()
  params, cfg = convert.load_dino(str(folder / 'model.safetensors'))
  assert _max_diff(vit.image_features(params, cfg, x), ref) <= TOL


# ---------------------------------------------------------------------------------------- CLIP


def _check_clip(params, cfg, image_fn, text_fn, seed=0):
  x, ids = _images(seed=seed), _tokens(seed=seed)
  with torch.no_grad():
    ref_img, ref_txt = _out(image_fn(_nchw(x))), _out(text_fn(torch.from_numpy(ids)))
  assert _max_diff(vit.image_features(params, cfg, x), ref_img) <= TOL
  assert _max_diff(vit.text_features(params, cfg, ids), ref_txt) <= TOL


@pytest.mark.parametrize('quick_gelu', [True, False])
def test_clip_openai_layout_matches_open_clip(tmp_path, quick_gelu):
  """QuickGELU: an open_clip_model.safetensors with its open_clip_config.json (heads, activation
  from there). GELU (LAION-style): a bare .bin, so heads and act are passed."""
  open_clip = _import_or_skip('open_clip')
  model_cfg = dict(
      embed_dim=EMBED, quick_gelu=quick_gelu,
      vision_cfg=dict(image_size=IMAGE, layers=LAYERS, width=WIDTH, patch_size=PATCH,
                      head_width=WIDTH // HEADS),
      text_cfg=dict(context_length=CONTEXT, vocab_size=VOCAB, width=WIDTH, heads=HEADS,
                    layers=LAYERS))
  torch.manual_seed(0)
  model = _perturb(open_clip.CLIP(**model_cfg), seed=3)
  if quick_gelu:
    path = tmp_path / 'open_clip_model.safetensors'
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                str(path))
    (tmp_path / 'open_clip_config.json').write_text(json.dumps({'model_cfg': model_cfg}))
    params, cfg = convert.load_clip(str(path))
  else:
    path = tmp_path / 'open_clip_pytorch_model.bin'
    torch.save(model.state_dict(), path)
    params, cfg = convert.load_clip(str(path), act='gelu', heads=HEADS, text_heads=HEADS)
  assert cfg.vision.act == cfg.text.act == ('quick_gelu' if quick_gelu else 'gelu')
  assert (cfg.text.vocab_size, cfg.text.context, cfg.vision.proj_dim) == (VOCAB, CONTEXT, EMBED)
  _check_clip(params, cfg, model.encode_image, model.encode_text)


def test_clip_transformers_layout_matches_clip_model(hf_clip):
  model, folder = hf_clip
  params, cfg = convert.load_clip(str(folder / 'model.safetensors'))
  assert (cfg.vision.heads, cfg.text.heads, cfg.vision.act) == (HEADS, HEADS, 'quick_gelu')
  _check_clip(params, cfg, lambda x: model.get_image_features(pixel_values=x),
              lambda t: model.get_text_features(input_ids=t))
  scale = model.logit_scale.detach().numpy()
  np.testing.assert_allclose(np.asarray(params['logit_scale']), scale, rtol=1e-6)


def _openai_names(hf_sd):
  """The same weights under OpenAI's CLIP names (written out here, not by the importer)."""
  out = {}
  towers = (('vision_model.encoder.layers.', 'visual.transformer.resblocks.'),
            ('text_model.encoder.layers.', 'transformer.resblocks.'))
  block = {'layer_norm1': 'ln_1', 'layer_norm2': 'ln_2', 'self_attn.out_proj': 'attn.out_proj',
           'mlp.fc1': 'mlp.c_fc', 'mlp.fc2': 'mlp.c_proj'}
  for hf_prefix, prefix in towers:
    layers = {int(k[len(hf_prefix):].split('.')[0]) for k in hf_sd if k.startswith(hf_prefix)}
    for i in layers:
      src, dst = f'{hf_prefix}{i}.', f'{prefix}{i}.'
      for leaf in ('weight', 'bias'):
        out[f'{dst}attn.in_proj_{leaf}'] = torch.cat(
            [hf_sd[f'{src}self_attn.{n}_proj.{leaf}'] for n in 'qkv'])
        for hf_name, name in block.items():
          out[f'{dst}{name}.{leaf}'] = hf_sd[f'{src}{hf_name}.{leaf}']
  top = {'vision_model.embeddings.patch_embedding.weight': 'visual.conv1.weight',
         'vision_model.embeddings.class_embedding': 'visual.class_embedding',
         'vision_model.embeddings.position_embedding.weight': 'visual.positional_embedding',
         'text_model.embeddings.token_embedding.weight': 'token_embedding.weight',
         'text_model.embeddings.position_embedding.weight': 'positional_embedding',
         'logit_scale': 'logit_scale'}
  for hf_name, name in top.items():
    out[name] = hf_sd[hf_name]
  for hf_name, name in (('vision_model.pre_layrnorm', 'visual.ln_pre'),
                        ('vision_model.post_layernorm', 'visual.ln_post'),
                        ('text_model.final_layer_norm', 'ln_final')):
    for leaf in ('weight', 'bias'):
      out[f'{name}.{leaf}'] = hf_sd[f'{hf_name}.{leaf}']
  out['visual.proj'] = hf_sd['visual_projection.weight'].T
  out['text_projection'] = hf_sd['text_projection.weight'].T
  return out


class _Holder(torch.nn.Module):
  """A container of buffers, to rebuild a nested state dict inside a TorchScript archive."""


class _Archive(torch.nn.Module):

  def forward(self, x):
    return x


def _torchscript(state_dict):
  root = _Archive()
  for key, value in state_dict.items():
    *path, leaf = key.split('.')
    node = root
    for name in path:
      if not hasattr(node, name):
        node.add_module(name, _Holder())
      node = getattr(node, name)
    node.register_buffer(leaf, value.clone())
  return torch.jit.script(root)


@pytest.mark.filterwarnings('ignore:.*torch.jit.* is deprecated:DeprecationWarning')
def test_clip_openai_torchscript_archive(tmp_path):
  """OpenAI's ViT-B-32.pt is a TorchScript archive with half-precision weights and its build
  arguments as extra tensors. Heads follow from width / 64 here (nothing passed)."""
  torch.manual_seed(0)
  model = _perturb(transformers.CLIPModel(_hf_clip_config(width=128, heads=2)), seed=4)
  with torch.no_grad():   # weights exact in fp16, so the fp16 file loses nothing
    for p in model.parameters():
      p.copy_(p.half().float())
  sd = {k: v.half() for k, v in _openai_names(model.state_dict()).items()}
  sd.update(input_resolution=torch.tensor(IMAGE), context_length=torch.tensor(CONTEXT),
            vocab_size=torch.tensor(VOCAB))
  path = tmp_path / 'ViT-B-32.pt'
  _torchscript(sd).save(str(path))
  params, cfg = convert.load_clip(str(path))
  assert (cfg.vision.heads, cfg.text.heads, cfg.vision.act) == (2, 2, 'quick_gelu')
  _check_clip(params, cfg, lambda x: model.get_image_features(pixel_values=x),
              lambda t: model.get_text_features(input_ids=t), seed=1)


def test_text_padding_and_shorter_rows_do_not_change_features(hf_clip):
  _, folder = hf_clip
  params, cfg = convert.load_clip(str(folder / 'model.safetensors'))
  ids = _tokens(lengths=(6, 9))
  full = np.asarray(vit.text_features(params, cfg, ids))
  short = np.asarray(vit.text_features(params, cfg, ids[:, :9]))
  assert _max_diff(short, full) <= 1e-5


# ---------------------------------------------------------------------------------------- errors


def test_unknown_layout_and_wrong_model_are_named(tmp_path):
  path = tmp_path / 'other.pth'
  torch.save({'encoder.conv.weight': torch.zeros(2, 2)}, path)
  with pytest.raises(common.CheckpointError, match='DINO checkpoint: unknown layout'):
    convert.load_dino(str(path))
  with pytest.raises(common.CheckpointError, match='CLIP checkpoint: unknown layout'):
    convert.load_clip(str(path))
  torch.save({'visual.conv1.weight': torch.zeros(4, 3, 2, 2)}, path)
  with pytest.raises(common.CheckpointError, match='load it with load_clip'):
    convert.load_dino(str(path))
  torch.save({'cls_token': torch.zeros(1, 1, 4), 'blocks.0.norm1.weight': torch.zeros(4)}, path)
  with pytest.raises(common.CheckpointError, match='load it with load_dino'):
    convert.load_clip(str(path))


def test_missing_unexpected_and_misshaped_keys_are_listed(hf_vit, hf_clip, tmp_path):
  _, vit_folder = hf_vit
  sd = safetensors_torch.load_file(str(vit_folder / 'model.safetensors'))
  del sd['encoder.layer.1.output.dense.bias']
  sd['encoder.layer.0.extra.weight'] = torch.zeros(3)
  sd['layernorm.weight'] = torch.zeros(WIDTH + 1)
  path = tmp_path / 'model.safetensors'
  safetensors_torch.save_file(sd, str(path))
  with pytest.raises(common.CheckpointError) as err:
    convert.load_dino(str(path), heads=HEADS)
  msg = str(err.value)
  assert 'DINO checkpoint (transformers layout)' in msg
  assert '1 missing keys: encoder.layer.1.output.dense.bias' in msg
  assert '1 unexpected keys: encoder.layer.0.extra.weight' in msg
  assert f'layernorm.weight: expected ({WIDTH},), got ({WIDTH + 1},)' in msg

  _, clip_folder = hf_clip
  sd = safetensors_torch.load_file(str(clip_folder / 'model.safetensors'))
  del sd['text_projection.weight']
  safetensors_torch.save_file(sd, str(path))
  with pytest.raises(common.CheckpointError, match="missing key 'text_projection.weight'"):
    convert.load_clip(str(path), heads=HEADS, text_heads=HEADS)


def test_clip_rejects_other_input_sizes(hf_clip):
  _, folder = hf_clip
  params, cfg = convert.load_clip(str(folder / 'model.safetensors'))
  with pytest.raises(ValueError, match='takes 32x32 inputs'):
    vit.image_features(params, cfg, _images(h=IMAGE, w=IMAGE + PATCH))


# ------------------------------------------------------------------------------- preprocessing


def _torch_resize(frames, size, mode):
  """torch's interpolate as torchvision's tensor Resize(antialias=False) calls it: float32
  [T, C, H, W] -> float32 at the short-side-`size` shape."""
  x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
  out = torch.nn.functional.interpolate(x, size=vit.resized_short_side(*frames.shape[1:3], size),
                                        mode=mode, align_corners=False, antialias=False)
  return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize('kind', ['clip', 'dino'])
def test_preprocess_matches_torch_resize(kind):
  """Resampling vs torch's interpolate (unquantised), then the whole input: rounding back to uint8
  may flip a value sitting on .5 by one level, nothing more. The unquantised bound is ~1e-5 of
  the 0..255 range: torch's own float32 sums are ~1e-3 off a float64 evaluation of its weights
  on this noise (ours ~6e-5)."""
  frames = np.random.default_rng(5).integers(0, 256, (2, 120, 200, 3), dtype=np.uint8)
  method = 'bicubic' if kind == 'clip' else 'bilinear'
  ref = _torch_resize(frames, 224, method)
  ours = vit.resize_short_side(frames, 224, method, quantize=False)
  assert ref.shape == (2, 224, 373, 3)
  assert _max_diff(ours, ref) <= 3e-3
  mean, std = ((vit.CLIP_MEAN, vit.CLIP_STD) if kind == 'clip'
               else (vit.IMAGENET_MEAN, vit.IMAGENET_STD))
  ref = np.round(np.clip(ref, 0, 255))
  if kind == 'clip':
    ref = ref[:, :, 74:298]   # CenterCrop(224) of 224x373: left = round(149 / 2) = 74
  ref = ((ref / 255.0 - np.float32(mean)) / np.float32(std)).astype(np.float32)
  got = np.asarray(vit.preprocess(frames, kind))
  diff = np.abs(got - ref)
  assert got.shape == ref.shape
  assert np.mean(diff > 1e-5) < 1e-3
  assert diff.max() <= 1.0 / 255 / min(std) + 1e-5


def test_preprocess_matches_torchvision_transforms():
  """The same against torchvision itself, composed as VBench's clip_transform / dino_transform
  (skipped where torchvision cannot be imported)."""
  transforms = _import_or_skip('torchvision.transforms')
  frames = np.random.default_rng(6).integers(0, 256, (2, 90, 160, 3), dtype=np.uint8)
  x = torch.from_numpy(frames).permute(0, 3, 1, 2)
  steps = {
      'clip': [transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC,
                                 antialias=False), transforms.CenterCrop(224)],
      'dino': [transforms.Resize(224, antialias=False)]}
  stats = {'clip': (vit.CLIP_MEAN, vit.CLIP_STD), 'dino': (vit.IMAGENET_MEAN, vit.IMAGENET_STD)}
  for kind, resize in steps.items():
    ref = transforms.Compose(resize + [transforms.Lambda(lambda t: t.float().div(255.0)),
                                       transforms.Normalize(*stats[kind])])(x)
    ref = ref.permute(0, 2, 3, 1).numpy()
    got = np.asarray(vit.preprocess(frames, kind))
    diff = np.abs(got - ref)
    assert got.shape == ref.shape
    assert np.mean(diff > 1e-5) < 1e-3
    assert diff.max() <= 1.0 / 255 / min(stats[kind][1]) + 1e-5


def test_preprocess_rejects_float_frames():
  with pytest.raises(ValueError, match='uint8'):
    vit.preprocess(jnp.zeros((1, 8, 8, 3)), 'clip')
