#!/usr/bin/env bash
# What the H200 still has to time (issue: decode faster end to end), one part per device call
# (no model files needed: random-weight 8B-shaped layers); each stage bounded in time, its log
# and JSON under $OUT:
#   run(command="bash scripts/gpu_pending.sh tests decode e2e-32k", timeout_s=600)
# Parts, run in the order given (each stage's limit below; keep a call under 600 s):
# tests: the Triton kernel tests compiled on the GPU. decode: per-layer decode rows (the step with
#   the merge appending against the append's own kernel). parts: the decode launch, its main kernel
#   and its merge alone, without and with a token to append. profile: the 4-layer compiled step
#   kernel by kernel, both ways.
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
[ $# -gt 0 ] || { echo "parts: tests decode parts profile e2e-32k e2e-128k" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/env.txt"
for part in "$@"; do
  case "$part" in
    tests) stage 170 tests python -m pytest -q -p no:cacheprovider tests/test_triton_decode.py \
             tests/test_triton_append.py ;;
    decode) stage 100 decode python -u -m tca_flex.bench --out "$OUT" --phases decode --lengths 32768 131072 \
              --decode-backends triton --no-compile-step ;;
    parts) stage 150 parts python -u scripts/gpu_decode_parts.py ;;
    profile)
      stage 110 profile-merged python -u scripts/gpu_step_profile.py 4 0.25 32768 131072
      TCA_PROBE_APPEND=triton stage 110 profile-append-kernel python -u scripts/gpu_step_profile.py 4 0.25 32768 \
        131072 ;;
    e2e-32k) stage 560 e2e-32k "${E2E[@]}" --lengths 32768 --e2e-keep 0.25 ;;
    e2e-128k) stage 560 e2e-128k "${E2E[@]}" --lengths 131072 --e2e-keep 0.37 ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
