"""Pools the reconstruction runs of long_recall at 4K (seeds 0-11 and 12-49) with the same seeds'
dense and `tca` records, and prints the paired differences over all 50 samples.

    python benchmarks/eval/H200-2026-12-03-long-recall-recon-50/pool.py
"""

import json
import statistics
from pathlib import Path

from tca_flex.eval.report import paired_difference

EVAL = Path(__file__).resolve().parent.parent
RUNS = [
    "H200-2026-12-03-long-recall-recon-50",  # tca_recon, seeds 12-49
    "H200-2026-12-03-long-recall-recon",  # tca_recon, seeds 0-11
    "H200-2026-12-03-long-recall-4k",  # dense and tca, seeds 12-49
    "H200-2026-12-03-real-50/long_recall",  # dense and tca, seeds 0-11
]
DENSE, TCA, RECON = "dense", "tca[smollm2_budgets]", "tca_recon[smollm2_budgets]"

records = [r for run in RUNS for r in json.loads((EVAL / run / "results.json").read_text())["records"]
           if r["length"] == 4096 and r["kind"] == "task"]
for method in (DENSE, TCA, RECON):
    scores = [r["score"] for r in records if r["method"] == method]
    print(f"{method:<28} {len(scores)} samples, score {100 * statistics.fmean(scores):.1f}")
for method, reference in ((RECON, DENSE), (TCA, DENSE), (RECON, TCA)):
    mean, half = paired_difference(records, 4096, method, reference)
    print(f"{method} vs {reference}: {mean:+.1f} ± {half:.1f}")
