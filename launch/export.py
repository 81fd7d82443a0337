r"""Export one network of a training run as plain DiT weights (LoRA merged into its base).

  python launch/export.py --config=configs/train/dmd_inter.py:wan_1_3b --workdir=out/dmd_inter \
      --out=out/shotstream_merged.safetensors
  python launch/generate.py --config=configs/shotstream.py:wan_1_3b \
      --ckpt=out/shotstream_merged.safetensors ...

--out ending in .safetensors writes the ShotStream/Wan layout (`model.<original name>`, float32;
readable by PyTorch tools and by our importer); any other path becomes an orbax params
directory (what launch/convert.py writes). The newest complete checkpoint of --workdir is read,
only the networks needed. --config must be the run's config (model size, LoRA rank / alpha).
"""

import os
import sys

from absl import flags
from safetensors import numpy as st_numpy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

# pylint: disable=g-import-not-at-top,wrong-import-position
from shotstream_jax import checkpoints
from shotstream_jax import cli
from shotstream_jax import loading
from shotstream_jax.convert import dit as dit_convert
from shotstream_jax.models import lora as lora_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = cli.define_config_file('config', 'configs/train/dmd_intra.py:tiny',
                                 'The training run\'s config.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The training run\'s --workdir.')
_NETWORK = flags.DEFINE_string('network', 'generator',
                               'Network to export: generator, critic or teacher.')
_OUT = flags.DEFINE_string('out', None, '.safetensors file, or a new orbax directory.')
flags.mark_flags_as_required(['workdir', 'out'])


def export(config, workdir: str, network: str, out: str) -> str:
  if not os.path.exists(workdir):
    raise FileNotFoundError(f'--workdir: {workdir} does not exist')
  out = cli.check_new_path(out, '--out')
  lora_cfg = config.get('lora')
  use_lora = bool(lora_cfg and lora_cfg.enabled and network in ('generator', 'critic'))
  nets = [network] + ([f'{network}_lora'] if use_lora else [])
  restored = loading.restore_networks(workdir, nets)
  params = restored[network]
  if use_lora:
    params = lora_lib.merge(params, restored[f'{network}_lora'], lora_lib.as_config(lora_cfg))
  loading.check_shapes(params, config.model, workdir, '--config')
  if out.endswith('.safetensors'):
    state = dit_convert.shotstream_state_dict(params, config.model)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + '.tmp'
    st_numpy.save_file(state, tmp)
    os.replace(tmp, out)     # atomic: a killed export leaves no half-written file
    return out
  return checkpoints.save_params(out, params, field='--out')


def main(argv):
  del argv
  cli.quiet_logs()
  path = cli.exit_on_user_error(export, _CONFIG.value, _WORKDIR.value, _NETWORK.value, _OUT.value)
  print(f'export: {_NETWORK.value} of {_WORKDIR.value} -> {path}')


if __name__ == '__main__':
  cli.run(main)
