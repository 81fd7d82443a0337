#!/usr/bin/env bash
# Copy this checkout to every worker of a Cloud TPU VM slice and install it with TPU jax.
#
#   launch/tpu/setup.sh TPU_NAME ZONE [REPO_DIR on the workers, default ~/shotstream_jax]
#
# Same two set-up steps as the README, plus jax's TPU plugin (same jax version as pinned).
set -euo pipefail
if [ "$#" -lt 2 ]; then
  echo "usage: $0 TPU_NAME ZONE [REPO_DIR]" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; REPO_DIR=${3:-'~/shotstream_jax'}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
JAX_VERSION=$(sed -n 's/^jax==//p' "$HERE/requirements.txt")
tar -C "$HERE" --exclude=.venv --exclude=.git --exclude=out -czf /tmp/shotstream_jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/shotstream_jax.tgz "$TPU_NAME":/tmp/ --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="\
  mkdir -p $REPO_DIR && tar -C $REPO_DIR -xzf /tmp/shotstream_jax.tgz && cd $REPO_DIR && \
  python3.11 -m venv .venv && .venv/bin/pip install -q -r requirements.txt && \
  .venv/bin/pip install -q 'jax[tpu]==$JAX_VERSION'"
