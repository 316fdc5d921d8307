"""Pools the 4K equal-KV runs near a fifth of the KV: seeds 0-4 (2026-12-03, evening) and 5-19 (2026-12-04):
each method's average over the seeds it ran, and TCA's paired difference to each (by seed: the same prompts).
TCA runs the sparse budget file `smollm2_tau0.5_anchored.json`, the presses `--keep 0.086782` (0.210 of the
prompt per KV head for every method).

    python benchmarks/eval/CPU-2026-12-04-kvpress-4k-21pct-s5/pool.py
"""

import json
from pathlib import Path

from tca_flex.eval.report import pooled_against

EVAL = Path(__file__).resolve().parent.parent
RUNS = [
    "CPU-2026-12-03-kvpress-4k-21pct/4k25-presses",  # dense, SnapKV w32k7, PyramidKV w32k7, TOVA: seeds 0-4
    "CPU-2026-12-03-kvpress-4k-21pct/4k25-tca",  # tca[smollm2_tau0.5_anchored]: seeds 0-4
    "CPU-2026-12-04-kvpress-4k-21pct-s5/4k21-presses-s5",  # the same presses: seeds 5-19
    "CPU-2026-12-04-kvpress-4k-21pct-s5/4k21-tca-s5",  # the same TCA: seeds 5-19
]
TCA = "tca[smollm2_tau0.5_anchored]"

records = [r for run in RUNS for r in json.loads((EVAL / run / "results.json").read_text())["records"]]
print(pooled_against(records, 4096, TCA))
