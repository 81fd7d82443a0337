r"""Train a ShotStream stage; resumes automatically from the last complete checkpoint in --workdir.

  python launch/train.py --config=configs/train/teacher.py:tiny --workdir=out/teacher_tiny
  python launch/train.py --config=configs/train/teacher.py:wan_1_3b --workdir=gs://bucket/teacher \
      --config.teacher.init_from=Wan2.1-T2V-1.3B/diffusion_pytorch_model.safetensors \
      --config.data.train_dir=out/ref_train --config.data.heldout_dir=out/ref_heldout \
      --config.mesh.fsdp=-1 --distributed

Rerun the same command after a crash or preemption: it continues from the newest finalized
checkpoint with the same data order and PRNG stream. Multi-host (TPU slice, multi-node GPU):
run the same command on every host with --distributed (launch/tpu/README.md).
Outputs in --workdir: checkpoints/, metrics.jsonl, tb/ (TensorBoard events), data/ (tiny).
Logs are quiet (warnings and the progress bar); --verbosity=0 shows every INFO line.
"""

import os
import sys

from absl import flags
import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

from shotstream_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from shotstream_jax.training import train_loop  # pylint: disable=wrong-import-position

_CONFIG = cli.define_config_file('config', 'configs/train/teacher.py:tiny',
                                 'Training config: configs/train/<stage>.py:<preset>.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and logs (resumed).')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False,
                                 'Call jax.distributed.initialize() (multi-host). On Cloud TPU, '
                                 'SLURM and Open MPI it finds its peers itself; elsewhere give '
                                 'the three flags below.')
_COORDINATOR = flags.DEFINE_string('coordinator', None,
                                   'With --distributed: host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'With --distributed: number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'With --distributed: this process, 0..num_processes-1.')
flags.mark_flag_as_required('workdir')


def main(argv):
  del argv
  cli.quiet_logs()
  if _DISTRIBUTED.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif any(f.value is not None for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)):
    print('error: --coordinator/--num_processes/--process_id: only with --distributed',
          file=sys.stderr)
    sys.exit(2)
  if jax.process_index() == 0:
    print(f'train: {jax.process_count()} process(es), {jax.device_count()} '
          f'{jax.devices()[0].platform} device(s); workdir {_WORKDIR.value}', flush=True)
  try:
    state = cli.exit_on_user_error(train_loop.train, _CONFIG.value, _WORKDIR.value)
  except train_loop.NonFiniteError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(3)
  print(f'train: finished at step {int(state.step)}; workdir {_WORKDIR.value}')


if __name__ == '__main__':
  cli.run(main)
