#!/usr/bin/env bash
# Issue 15 on one GPU, in one command from the repository root (torch, triton, transformers
# installed; no network needed):
#
#   OUT=/some/folder bash scripts/gpu_decode_e2e.sh
#
# 1. Full depth end to end: LLaMA-3.1-8B shapes, 32 layers, random bf16 weights, at 32K, 64K and
#    128K: TTFT (dense cuDNN vs TCA 25% + 4096 and 10% + 4096) and TPOT over one block of CUDA-graph
#    replays (dense maskless SDPA over a preallocated cache vs TCACache fused-graph, two-graph,
#    two-graph+fused and math-graph), with KV bytes.
# 2. Per-layer decode at 32K, 64K and 128K: the Triton decode kernel, the fused compression where a
#    block leaves and where none does, and whole steps with, without and with tensor-form compression.
# 3. The Triton kernel tests, compiled on the GPU (decode attention with live lengths, block
#    compression against the tensor form), if pytest and hypothesis are installed.
#
# Writes $OUT/*.json (the bench's rows; saved after every length) and $OUT/*.log. At most 8 minutes:
# each stage has its own time limit (320 + 90 + 70 s), so a slow stage cannot take the others down;
# SKIP_TESTS=1 skips stage 3.
set -uo pipefail
: "${OUT:?set OUT to the folder that receives the results}"
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > "$OUT/env.txt" 2>&1
status=0

# Longest first: if the stage runs out of time, the 128K rows are already saved.
timeout 320 python -u -m tca_flex.bench --phases e2e --e2e-layers 32 --lengths 131072 65536 32768 \
  --no-e2e-static --ttft-reps 2 --out "$OUT" > "$OUT/e2e_32layers.log" 2>&1 || status=1
tail -n 5 "$OUT/e2e_32layers.log"

timeout 90 python -u -m tca_flex.bench --phases decode --lengths 131072 65536 32768 --decode-backends triton \
  --no-compile-step --out "$OUT" > "$OUT/decode.log" 2>&1 || status=1
tail -n 5 "$OUT/decode.log"

if [ -n "${SKIP_TESTS:-}" ]; then
  echo "SKIP_TESTS set: kernel tests skipped" | tee "$OUT/kernel_tests.log"
elif python -c "import pytest, hypothesis" 2>/dev/null; then
  timeout 70 python -u -m pytest -q -p no:cacheprovider tests/test_triton_decode.py tests/test_triton_compress.py \
    > "$OUT/kernel_tests.log" 2>&1 || status=1
  tail -n 3 "$OUT/kernel_tests.log"
else
  echo "pytest/hypothesis missing: kernel tests skipped" | tee "$OUT/kernel_tests.log"
fi

python scripts/decode_e2e_summary.py "$OUT"/*.json | tee "$OUT/summary.txt"
ls -la "$OUT"
exit $status
