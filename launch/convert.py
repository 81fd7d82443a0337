r"""Convert a published PyTorch checkpoint into an orbax params checkpoint.

  python launch/convert.py --config=configs/shotstream.py:wan_1_3b --kind=dit \
      --src=shotstream_merged.pt --dst=ckpt/shotstream_dit

`--kind`: dit (Wan `diffusion_pytorch_model.safetensors`, ShotStream `.pt`, diffusers layout),
vae (`Wan2.1_VAE.pth` or diffusers `AutoencoderKLWan`), umt5 (`models_t5_umt5-xxl-enc-bf16.pth`
or transformers `UMT5EncoderModel`).
"""

from absl import app
from absl import flags

from shotstream_jax import cli

KINDS = ('dit', 'vae', 'umt5')

_CONFIG = cli.define_config_file('config', 'configs/shotstream.py:wan_1_3b',
                                 'Model config: configs/shotstream.py:<preset>.')
_KIND = flags.DEFINE_enum('kind', 'dit', KINDS, 'Which network the file holds.')
_SRC = flags.DEFINE_string('src', None, 'Published checkpoint file (.safetensors/.pt/.pth).')
_DST = flags.DEFINE_string('dst', None, 'New orbax checkpoint directory to write.')


def convert(config, kind: str, src: str, dst: str) -> str:
  """Library entry point (tests call this): import `src`, save params to `dst`."""
  from shotstream_jax import checkpoints  # pylint: disable=g-import-not-at-top
  dst = cli.check_new_path(dst, '--dst')     # before the (slow) import, not after it
  if kind == 'dit':
    from shotstream_jax.convert import dit  # pylint: disable=g-import-not-at-top
    params = dit.load_dit(src, config.model)
  elif kind == 'vae':
    from shotstream_jax.convert import vae  # pylint: disable=g-import-not-at-top
    params = vae.load_vae(src, config.vae)
  elif kind == 'umt5':
    from shotstream_jax.convert import umt5  # pylint: disable=g-import-not-at-top
    params = umt5.load_umt5(src, config.text)
  else:
    raise ValueError(f'--kind: unknown kind {kind!r}; accepted: {", ".join(KINDS)}')
  return checkpoints.save_params(dst, params, field='--dst')


def main(argv):
  del argv
  cli.quiet_logs()
  if not _SRC.value or not _DST.value:
    raise app.UsageError('--src and --dst are required')
  out = cli.exit_on_user_error(convert, _CONFIG.value, _KIND.value, _SRC.value, _DST.value)
  print(f'wrote {_KIND.value} params to {out}')


if __name__ == '__main__':
  cli.run(main)
