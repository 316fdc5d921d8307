#!/usr/bin/env bash
# long_recall at 4K, the ten seeds whose list ends inside the final window (CPU, float32, one thread):
# dense, tca, tca_emulated (no compression during decode), tca_recon_noprior. Run from the repository root:
#   bash benchmarks/eval/CPU-2026-12-04-long-recall-window/run.sh OUT_DIR
# (~5.5 min a seed on one core; then `python benchmarks/eval/CPU-2026-12-04-long-recall-window/pool.py OUT_DIR`.)
set -euo pipefail
out=${1:?usage: run.sh OUT_DIR}
export OMP_NUM_THREADS=1 PYTHONPATH=.
for s in 43 45 3 34 37 18 0 42 32 4; do
  python3 -m tca_flex.eval --tasks long_recall --methods dense tca tca_emulated tca_recon_noprior --keep \
    --budgets tca_flex/data/smollm2_budgets.json --lengths 4096 --samples 1 --seed "$s" \
    --ppl-samples 0 --no-progress --out "$out/s$s" > "$out/s$s.log" 2>&1
  echo "seed $s done $(date)"
done
