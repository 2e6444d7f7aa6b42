#!/usr/bin/env bash
# GPU benchmark of the train step: DiT-XL/2 at the paper layout (configs/imagenet512.py:
# 64x64x16 latents, scales 32 -> 64, patches 1 and 2, a 32x32 grid = 1024 tokens),
# bfloat16, FM vs DFM in each run, cuDNN vs XLA attention, remat off vs the best policy,
# per-device batch 32 and 64. Writes $OUT/*.json (one per run) and $OUT/bench_gpu.md.
#
#   bash launch/bench_gpu.sh              # on a CUDA machine: installs, checks, measures
#   bash launch/bench_gpu.sh --dry_run    # on CPU: the same runs with a tiny model
#
# Installs only the project's own requirements-gpu.txt into $VENV (default .venv-gpu),
# checks that cuDNN attention matches XLA attention in bfloat16 (forward and gradients),
# then runs `python -m dfm_jax.bench` for each setting. Budget: under 8 minutes on one
# H100 (8 compilations of DiT-XL/2 dominate).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
[[ "${1:-}" == "--dry_run" ]] && DRY_RUN=1
OUT=${OUT:-bench_gpu_out}
mkdir -p "$OUT"

if [[ $DRY_RUN == 1 ]]; then
  PY=${PY:-.venv/bin/python}
  MODEL=(--config.model.size=S --config.model.depth=1 --config.model.width=64
         --config.model.num_heads=2 --config.data.resolution=16 --config.model.dtype=float32)
  BATCHES=(8 16)
  STEPS=(--steps=2 --rounds=1 --warmup=0)
else
  VENV=${VENV:-.venv-gpu}
  [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r requirements-gpu.txt
  "$VENV/bin/pip" install -q --no-deps -e .
  PY="$VENV/bin/python"
  MODEL=(--config.model.size=XL --config.model.dtype=bfloat16)
  BATCHES=(32 64)
  STEPS=(--steps=20 --rounds=2 --warmup=3)
  # The JAX GPU performance guide's flags; 90 % of the GPU memory for XLA.
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_triton_gemm_any=true"
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
fi
BENCH=("$PY" -m dfm_jax.bench --config=configs/imagenet512.py --config.data.source=synthetic)
"$PY" -c "import jax; print('devices:', jax.devices())"

if [[ $DRY_RUN == 0 ]]; then
  echo "== cuDNN vs XLA attention (bfloat16)"
  "${BENCH[@]}" --check_attention | tee "$OUT/attention_check.txt"
fi

run() {  # name, extra flags...
  local name=$1; shift
  echo "== $name"
  if ! "${BENCH[@]}" "${MODEL[@]}" "${STEPS[@]}" --json="$OUT/$name.json" "$@" 2>&1 \
      | tee "$OUT/$name.txt"; then
    echo "   $name failed (out of memory?): see $OUT/$name.txt"
  fi
}
per_device() { echo $(( $1 * $("$PY" -c "import jax; print(jax.device_count())") )); }

ATTENTION=(cudnn xla)
[[ $DRY_RUN == 1 ]] && ATTENTION=(xla)  # cuDNN attention needs a GPU
B1=$(per_device "${BATCHES[0]}")
B2=$(per_device "${BATCHES[1]}")
for impl in "${ATTENTION[@]}"; do
  run "b${BATCHES[0]}_${impl}_noremat" --config.batch_size="$B1" --config.model.attention_impl="$impl"
done
best=${ATTENTION[0]}
run "b${BATCHES[1]}_${best}_noremat" --config.batch_size="$B2" --config.model.attention_impl="$best"
run "b${BATCHES[1]}_${best}_remat_dots" --config.batch_size="$B2" --config.model.attention_impl="$best" \
  --config.model.remat=true --config.model.remat_policy=dots_with_no_batch_dims_saveable

{
  echo "# GPU benchmark ($(date -u +%F), $("$PY" -c "import jax; d = jax.devices()[0]; print(d.device_kind, 'x', jax.device_count())"))"
  echo
  for f in "$OUT"/b*.txt; do
    echo "## $(basename "$f" .txt)"
    echo
    grep -E '^Device' "$f"
    echo
    grep -E '^\|' "$f"
    echo
  done
} > "$OUT/bench_gpu.md"
echo "Wrote $OUT/bench_gpu.md and $OUT/*.json"
