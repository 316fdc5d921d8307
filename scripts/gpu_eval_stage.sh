#!/usr/bin/env bash
# One stage of the accuracy suite inside a device call, bounded in time so that a call (10 minutes at
# most) always returns what finished: run after `scripts/gpu_eval.sh run`, e.g.
#   bash scripts/gpu_eval.sh run bash scripts/gpu_eval_stage.sh 240 s2k --lengths 2048 --samples 50 ...
# Writes $OUT/NAME.tar (results, or the finished workers' parts/<k>/ to merge later) and $OUT/NAME.log.
# A stage past its time is stopped with its workers, so the next stage has the GPU to itself.
set -uo pipefail
limit=$1
name=$2
shift 2
common=(--device cuda --dtype bfloat16 --budgets tca_flex/data/smollm2_budgets.json --keep --no-progress)
start=$(date +%s)
timeout "$limit" python -m tca_flex.eval "${common[@]}" "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
rc=$?
pkill -f "tca_flex.eval.*$OUT/$name" 2>/dev/null
# One file per stage: what a call brings back is limited in file count and folder depth.
[ -d "$OUT/$name" ] && tar -C "$OUT" -cf "$OUT/$name.tar" "$name" && rm -rf "${OUT:?}/$name"
echo "stage $name: rc=$rc, $(( $(date +%s) - start )) s" | tee -a "$OUT/$name.log"
tail -n 4 "$OUT/$name.log"
