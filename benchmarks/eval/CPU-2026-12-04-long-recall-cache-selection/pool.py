"""`long_recall` at 4K on the CPU in bf16 (the proxy for the H200's long answers): the shipped `tca` against
three changes of which tokens the prompt's selection keeps, at the same budgets, seed by seed, each paired
with the CPU's dense on the same prompt (EVALUATION.md, "The cache's own selection"):

    python benchmarks/eval/CPU-2026-12-04-long-recall-cache-selection/pool.py

Folders here (each merged from one `--samples 1 --seed S` run per seed; commands in EVALUATION.md):
`spread0` / `spread8`: the prefill and the cache select with 0 / 8 spread observation queries instead of
the budgets' 32 (`--tca-option spread_observation_queries=N`: budgets used with knobs they were not
calibrated with); `hyb0`: the prefill unchanged, the cache keeps a second selection made by the last 32
queries alone (the prototype `hybrid.py`, which `TCAConfig.cache_spread_observation_queries=0` now
implements); `real0` (where present): the same through that knob. Dense and `tca` come from
`../CPU-2026-12-04-long-recall-bf16/`.
"""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASE = HERE.parent / "CPU-2026-12-04-long-recall-bf16"
TCA = "tca[smollm2_budgets]"
PICKED = {2, 6, 7, 15, 16, 17, 19, 20, 25}  # chosen there from the H200's losses; the rest were not


def records(path: Path) -> list[dict]:
    return [r for r in json.loads(path.read_text())["records"]
            if r["kind"] == "task" and r["task"] == "long_recall" and r["length"] == 4096]


dense: dict[int, dict] = {}
tca: dict[int, dict] = {}
for run in BASE.glob("*-*/results.json"):
    name = run.parent.name.split("-")[0]
    for r in records(run):
        if r["method"] == "dense":
            dense[r["seed"]] = r
        elif r["method"] == TCA and name in ("dense", "tca"):
            tca[r["seed"]] = r
variants = {"tca": tca}
for folder in sorted(p for p in HERE.iterdir() if (p / "results.json").is_file()):
    variants[folder.name] = {r["seed"]: r for r in records(folder / "results.json")}
seeds = sorted(set(dense) & set(tca))
print("| seed | dense | " + " | ".join(variants) + " |")
print("|---|---|" + "---|" * len(variants))
for s in seeds:
    cells = [f"{100 * v[s]['score']:.1f}" if s in v else "" for v in variants.values()]
    print(f"| {s} | {100 * dense[s]['score']:.1f} | " + " | ".join(cells) + " |")


def summary(part: list[int]) -> str:
    out = []
    for name, v in variants.items():
        both = [s for s in part if s in v]
        if not both:
            continue
        diff = [100 * (v[s]["score"] - dense[s]["score"]) for s in both]
        mean = sum(diff) / len(diff)
        half = 1.96 * statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else float("nan")
        kv = sum(v[s]["kv_kept"] for s in both) / len(both)
        out.append(f"{name} {mean:+.1f} ± {half:.1f} ({sum(d < 0 for d in diff)} of {len(both)} below dense, "
                   f"KV {kv:.3f})")
    return "; ".join(out)


for label, part in (("all", seeds), ("picked", [s for s in seeds if s in PICKED]),
                    ("not picked", [s for s in seeds if s not in PICKED])):
    print(f"{label} ({len(part)} seeds), mean score - dense: {summary(part)}")
