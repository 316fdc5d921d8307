#!/usr/bin/env bash
# What the H200 still has to time (issue: decode faster end to end), one part per device call
# (no model files needed: random-weight 8B-shaped layers); each stage bounded in time, its log
# and JSON under $OUT:
#   run(command="bash scripts/gpu_pending.sh kernels", timeout_s=600)
#   run(command="bash scripts/gpu_pending.sh e2e-32k", timeout_s=600)
#   run(command="bash scripts/gpu_pending.sh e2e-128k", timeout_s=600)
# kernels: the Triton kernel tests compiled on the GPU; per-layer decode rows (the step with the
#   merge appending against the append's own kernel); the 4-layer compiled step kernel by kernel,
#   both ways; the cache's own selection's prefill cost.
# e2e-32k / e2e-128k: 32 layers, compiled and graph-replayed TPOT, dense against TCA at the
#   issue's settings (25% + 4096 at 32K, 37% + 4096 at 128K).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
stage() {  # stage SECONDS NAME COMMAND...: bounded, its output in NAME.log
  local limit=$1 name=$2
  shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $?" | tee -a "$OUT/stages.txt"
  tail -n 4 "$OUT/$name.log"
}
E2E=(python -u -m tca_flex.bench --out "$OUT" --phases e2e --e2e-layers 32 --no-e2e-static --ttft-reps 1
     --tpot-variants two-graph+fused --compile-tpot inductor --compiled-variants two-graph+fused)
case "${1:?part: kernels, e2e-32k or e2e-128k}" in
  kernels)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/env.txt"
    stage 170 tests python -m pytest -q -x -p no:cacheprovider tests/test_triton_decode.py tests/test_triton_append.py
    stage 100 decode python -u -m tca_flex.bench --out "$OUT" --phases decode --lengths 32768 131072 \
      --decode-backends triton --no-compile-step
    stage 110 profile-merged python -u scripts/gpu_step_profile.py 4 0.25 32768 131072
    TCA_PROBE_APPEND=triton stage 110 profile-append-kernel python -u scripts/gpu_step_profile.py 4 0.25 32768 131072
    stage 80 selection-cost python -u scripts/gpu_cache_selection_cost.py --out "$OUT/selection-cost.json" ;;
  e2e-32k) stage 560 e2e-32k "${E2E[@]}" --lengths 32768 --e2e-keep 0.25 ;;
  e2e-128k) stage 560 e2e-128k "${E2E[@]}" --lengths 131072 --e2e-keep 0.37 ;;
  *) echo "unknown part $1" >&2; exit 2 ;;
esac
