#!/usr/bin/env bash
# What the H200 still has to time, in one device call (no model files needed: random-weight
# 8B-shaped layers). Each phase is bounded in time; results and logs come back as one tar:
#   run(command="bash scripts/gpu_pending.sh", timeout_s=600)
# Phases: batch (padded prefill through unpad.py vs the sum of rows; CUDA-graph decode vs dense on
# a StaticCache) and chunks (reconstruction's first-turn cost beside plain appending).
set -uo pipefail
OUT=${OUT:-/tmp/out}
RES=/tmp/pending
mkdir -p "$RES" "$OUT"
stage() {  # stage SECONDS NAME ARGS...: one bench phase, bounded, its log beside its JSON
  local limit=$1 name=$2
  shift 2
  timeout "$limit" python -m tca_flex.bench --out "$RES" "$@" > "$RES/$name.log" 2>&1
  echo "$name: exit $?" | tee -a "$RES/stages.txt"
}
stage 300 batch --phases batch --batch-sizes 4 8
stage 240 chunks --phases chunks
tar -C "$RES" -cf "$OUT/pending.tar" .
tail -n 5 "$RES"/*.log
