"""Pools the 2K equal-KV runs of seeds 0-4 (2026-12-02), 5-9, 10-19 and 20-39 (2026-12-04): each
method's average over the seeds it ran, and TCA's paired difference to each (by seed: the same prompts).

    python benchmarks/eval/CPU-2026-12-04-kvpress-2k-s20/pool.py

(It replaces the seeds 0-19 pool that sat beside the 10-19 run, and the seeds 0-9 one before that,
git commit b90df06.)
"""

import json
from pathlib import Path

from tca_flex.eval.report import pooled_against

EVAL = Path(__file__).resolve().parent.parent
RUNS = [
    "CPU-2026-12-02-kvpress-equal-kv/2k-a",  # dense, SnapKV w32k7, TOVA, StreamingLLM: seeds 0-4
    "CPU-2026-12-02-kvpress-equal-kv/2k-b",  # PyramidKV w32k7, Knorm: seeds 0-4
    "CPU-2026-12-02-kvpress-equal-kv/2k-tca",  # tca[smollm2_budgets]: seeds 0-4
    "CPU-2026-12-04-kvpress-2k-s5/2k-presses-s5",  # dense, TOVA: seeds 5-9
    "CPU-2026-12-04-kvpress-2k-s5/2k-tca-s5",  # tca[smollm2_budgets]: seeds 5-9
    "CPU-2026-12-04-kvpress-2k-s10/2k-presses-s10",  # dense, TOVA: seeds 10-19
    "CPU-2026-12-04-kvpress-2k-s10/2k-tca-s10",  # tca[smollm2_budgets]: seeds 10-19
    "CPU-2026-12-04-kvpress-2k-s20/2k-presses-s20",  # dense, TOVA: seeds 20-39
    "CPU-2026-12-04-kvpress-2k-s20/2k-tca-s20",  # tca[smollm2_budgets]: seeds 20-39
]
TCA = "tca[smollm2_budgets]"

records = [r for run in RUNS for r in json.loads((EVAL / run / "results.json").read_text())["records"]]
print(pooled_against(records, 2048, TCA))
