"""Pools the 8K equal-KV runs near a fifth of the KV: seeds 0-4 (2026-12-03, evening) and 5-12 (2026-12-04):
each method's average over the seeds it ran, and TCA's paired difference to each (by seed: the same prompts).
TCA runs the sparse budget file `smollm2_tau0.7.json`, the presses `--keep 0.11964` (0.178-0.179 of the
prompt per KV head for every method).

    python benchmarks/eval/CPU-2026-12-04-kvpress-8k-18pct-s5/pool.py
"""

import json
from pathlib import Path

from tca_flex.eval.report import pooled_against

EVAL = Path(__file__).resolve().parent.parent
RUNS = [
    "CPU-2026-12-03-kvpress-8k-18pct/8k18-presses",  # dense, SnapKV w32k7, PyramidKV w32k7, TOVA: seeds 0-4
    "CPU-2026-12-03-kvpress-8k-18pct/8k18-tca",  # tca[smollm2_tau0.7]: seeds 0-4
    "CPU-2026-12-04-kvpress-8k-18pct-s5/8k18-presses-s5",  # the same presses: seeds 5-12
    "CPU-2026-12-04-kvpress-8k-18pct-s5/8k18-tca-s5",  # the same TCA: seeds 5-12
]
records = [r for run in RUNS for r in json.loads((EVAL / run / "results.json").read_text())["records"]]
print(pooled_against(records, 8192, "tca[smollm2_tau0.7]"))
