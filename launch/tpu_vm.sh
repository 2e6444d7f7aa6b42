#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: the same command on every worker.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a WORKDIR=gs://my-bucket/dfm/in512 \
#     DATA_DIR=gs://my-bucket/latents/in512 bash launch/tpu_vm.sh [extra --config.* flags]
#
# Needs: gcloud with access to the TPU, the repository at $REPO_URL (or a copy on
# every worker), and the prepared latent dataset (python -m dfm_jax.prepare).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}" "${DATA_DIR:?set DATA_DIR}"
CONFIG=${CONFIG:-configs/imagenet512.py}
REPO_URL=${REPO_URL:-}
BRANCH=${BRANCH:-main}
EXTRA_FLAGS="$*"

setup='set -e
if [ -n "'"$REPO_URL"'" ] && [ ! -d dfm_jax ]; then git clone -b '"$BRANCH"' '"$REPO_URL"' dfm_jax; fi
cd dfm_jax
python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt "jax[tpu]==0.10.2"'

train='cd dfm_jax && .venv/bin/python -m dfm_jax.main --config='"$CONFIG"' \
  --workdir='"$WORKDIR"' --config.data.dir='"$DATA_DIR"' '"$EXTRA_FLAGS"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$setup"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$train"
