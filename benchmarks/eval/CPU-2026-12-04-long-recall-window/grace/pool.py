"""Pools the grace runs of long_recall at 4K (CPU, float32, one thread, 2026-12-04) with the same seeds'
dense, `tca` and `tca_emulated` records: the ten prompts whose list ends inside the final window (records
beside this folder, `../s<seed>/`) and nine whose list lies in the global region (seeds 1, 2, 5-11;
`../../CPU-2026-12-04-long-recall-emulated/`). `g<G>/s<seed>/` holds `grace.py G`'s run of one seed;
`shipped/s<seed>/` the plain `tca` method at commit 95cb2ab, whose shipped budgets carry `grace_blocks = 2`
(the package's own grace, which should answer as the prototype's `g2`).

    python benchmarks/eval/CPU-2026-12-04-long-recall-window/grace/pool.py
"""

import json
from pathlib import Path

from tca_flex.eval.report import paired_difference

HERE = Path(__file__).resolve().parent
WINDOW = [43, 45, 3, 34, 37, 18, 0, 42, 32, 4]
GLOBAL = [1, 2, 5, 6, 7, 8, 9, 10, 11]
TCA = "tca[smollm2_budgets]"


def task_records(path: Path, relabel: str | None = None) -> list[dict]:
    out = [r for r in json.loads(path.read_text())["records"] if r["kind"] == "task"]
    return [{**r, "method": relabel} for r in out] if relabel else out


base = [r for d in sorted(HERE.parent.glob("s*/results.json")) for r in task_records(d)]
base += task_records(HERE.parent.parent / "CPU-2026-12-04-long-recall-emulated" / "results.json")
grace = [r for d in sorted(HERE.glob("g*/s*/results.json"))
         for r in task_records(d, f"tca_grace{d.parent.parent.name[1:]}")]
shipped = [r for d in sorted(HERE.glob("shipped/s*/results.json")) for r in task_records(d, "tca_shipped_grace2")]
records = base + grace + shipped
for label, seeds in (("list ends in the final window", WINDOW), ("list in the global region", GLOBAL)):
    chosen = [r for r in records if r["seed"] in seeds]
    print(f"== {label}: seeds {seeds}")
    for m in sorted({r["method"] for r in chosen}, key=lambda m: (m != "dense", m != TCA, m)):
        scores = {r["seed"]: 100 * r["score"] for r in chosen if r["method"] == m}
        line = f"{m:<34}{len(scores):3d} seeds {sum(scores.values()) / len(scores):6.1f}"
        for ref in ("dense", TCA):
            if m != ref:
                mean, half = paired_difference(chosen, 4096, m, ref)
                if mean is not None:
                    line += f"   vs {ref.split('[')[0]}: {mean:+.1f}" + (f" ± {half:.1f}" if half is not None else "")
        print(line, " ".join(f"{s}:{scores[s]:.1f}" for s in seeds if s in scores))
