"""Pools the 4K equal-KV runs near a fifth of the KV: seeds 0-4 (2026-12-03, evening) and 5-19 (2026-12-04):
each method's average over the seeds it ran, and TCA's paired difference to each (by seed: the same prompts).
TCA runs the sparse budget file `smollm2_tau0.5_anchored.json`, the presses `--keep 0.086782` (0.210 of the
prompt per KV head for every method).

    python benchmarks/eval/CPU-2026-12-04-kvpress-4k-21pct-s5/pool.py
"""

import json
import statistics
from collections import defaultdict
from pathlib import Path

from tca_flex.eval.report import paired_difference

EVAL = Path(__file__).resolve().parent.parent
RUNS = [
    "CPU-2026-12-03-kvpress-4k-21pct/4k25-presses",  # dense, SnapKV w32k7, PyramidKV w32k7, TOVA: seeds 0-4
    "CPU-2026-12-03-kvpress-4k-21pct/4k25-tca",  # tca[smollm2_tau0.5_anchored]: seeds 0-4
    "CPU-2026-12-04-kvpress-4k-21pct-s5/4k21-presses-s5",  # the same presses: seeds 5-19
    "CPU-2026-12-04-kvpress-4k-21pct-s5/4k21-tca-s5",  # the same TCA: seeds 5-19
]
TCA = "tca[smollm2_tau0.5_anchored]"

records = [r for run in RUNS for r in json.loads((EVAL / run / "results.json").read_text())["records"]
           if r["length"] == 4096 and r["kind"] == "task"]
by_method: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
for r in records:
    by_method[r["method"]][r["seed"]].append(100.0 * r["score"])
print(f"{'method':<42}{'seeds':>7}{'avg':>7}   TCA - method (95% CI)")
for method, seeds in sorted(by_method.items(), key=lambda kv: -statistics.fmean(
        statistics.fmean(v) for v in kv[1].values())):
    avg = statistics.fmean(statistics.fmean(v) for v in seeds.values())
    mean, half = paired_difference(records, 4096, TCA, method)
    gap = "-" if mean is None else f"{mean:+.1f} ± {half:.1f}" if half is not None else f"{mean:+.1f}"
    print(f"{method:<42}{min(seeds)}-{max(seeds):<5}{avg:>7.1f}   {gap}")
