#!/usr/bin/env bash
# Submit a training workload to a GKE TPU cluster with xpk.
#
#   CLUSTER=my-cluster TPU_TYPE=v5p-128 NUM_SLICES=1 IMAGE=gcr.io/me/dfm_jax:latest \
#     WORKDIR=gs://my-bucket/dfm/in512 DATA_DIR=gs://my-bucket/latents/in512 \
#     bash launch/gke_xpk.sh [extra --config.* flags]
#
# IMAGE must contain this repository at /app with requirements.txt installed
# (plus jax[tpu]). xpk runs the command on every host; JAX finds the others itself.
set -euo pipefail
: "${CLUSTER:?set CLUSTER}" "${TPU_TYPE:?set TPU_TYPE}" "${IMAGE:?set IMAGE}"
: "${WORKDIR:?set WORKDIR}" "${DATA_DIR:?set DATA_DIR}"
CONFIG=${CONFIG:-configs/imagenet512.py}
NUM_SLICES=${NUM_SLICES:-1}
NAME=${NAME:-dfm-$(date +%Y%m%d-%H%M%S)}

xpk workload create \
  --cluster "$CLUSTER" \
  --workload "$NAME" \
  --tpu-type "$TPU_TYPE" \
  --num-slices "$NUM_SLICES" \
  --docker-image "$IMAGE" \
  --command "cd /app && python -m dfm_jax.main --config=$CONFIG --workdir=$WORKDIR/$NAME \
    --config.data.dir=$DATA_DIR $*"
