"""Pools the ten one-seed runs of long_recall at 4K whose list ends inside the final window (CPU,
2026-12-04): each method's average and its paired difference to dense and to `tca`.

    python benchmarks/eval/CPU-2026-12-04-long-recall-window/pool.py [DIR]

DIR: where ``run.sh`` wrote its ``s<seed>/`` folders (default: the recorded ones beside this file).
"""

import json
import sys
from pathlib import Path

from tca_flex.eval.report import paired_difference

HERE = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
records = [r for d in sorted(HERE.glob("s*/results.json")) for r in json.loads(d.read_text())["records"]
           if r["kind"] == "task"]
methods = sorted({r["method"] for r in records}, key=lambda m: (m != "dense", m))
seeds = sorted({r["seed"] for r in records})
print(f"seeds {seeds}")
for m in methods:
    scores = {r["seed"]: 100 * r["score"] for r in records if r["method"] == m}
    avg = sum(scores.values()) / len(scores)
    line = f"{m:<40}{avg:6.1f}"
    for ref in ("dense", "tca[smollm2_budgets]"):
        if m != ref:
            mean, half = paired_difference(records, 4096, m, ref)
            line += f"   vs {ref.split('[')[0]}: {mean:+.1f} ± {half:.1f}"
    print(line, " ".join(f"{s}:{scores[s]:.0f}" for s in seeds))
