#!/usr/bin/env bash
# Run one command in the repo on every worker of a Cloud TPU VM slice, all at once.
#
#   launch/tpu/run.sh TPU_NAME ZONE 'launch/train.py --config=configs/train/teacher.py:wan_1_3b \
#       --workdir=gs://BUCKET/teacher --distributed'
#
# The repo must be at the same path on every worker (launch/tpu/setup.sh puts it there). A command
# starting with launch/ or tests/ runs with the repo's .venv python; anything else runs as given.
# --distributed makes train.py call jax.distributed.initialize(), which on Cloud TPU finds the
# coordinator and the process index itself. Use a gs:// --workdir (or a shared filesystem):
# checkpoints are written by all hosts into one directory.
set -euo pipefail
if [ "$#" -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE 'COMMAND ...' [REPO_DIR on the workers, default ~/shotstream_jax]" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; COMMAND=$3; REPO_DIR=${4:-'~/shotstream_jax'}
case "$COMMAND" in
  launch/*|tests/*) COMMAND=".venv/bin/python $COMMAND" ;;
esac
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
  --command="cd $REPO_DIR && $COMMAND"
