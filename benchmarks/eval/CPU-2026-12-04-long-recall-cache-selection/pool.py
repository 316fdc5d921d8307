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
for name in ("hyb0", "real0", "spread0", "spread8"):
    variants[name] = {r["seed"]: r for r in records(HERE / name / "results.json")}
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


# Part two: the knob itself (`--tca-option cache_spread_observation_queries=0`, folder `c0`) against the shipped
# `tca` and dense of one run (`--methods dense` with `--budgets`, folder `base`) on the same prompts: the eight
# needle tasks at 4K (seeds 0-4) and 2K (seeds 0-2), `multi_turn` at 2K (seeds 0-7), `long_recall` at 4K
# (seeds 26-49) and 2K (seeds 0-15).
def task_records(folder: str, method: str) -> dict[tuple[str, int, int], dict]:
    """``method``'s records in ``folder/results.json`` by (task, length, seed)."""
    records = json.loads((HERE / folder / "results.json").read_text())["records"]
    return {(r["task"], r["length"], r["seed"]): r for r in records if r["kind"] == "task" and r["method"] == method}


runs = {"dense": task_records("base", "dense"), "tca": task_records("base", TCA), "c0": task_records("c0", TCA)}
NEEDLES = lambda t: t not in ("multi_turn", "long_recall")  # noqa: E731
for label, length, pick in (("needle tasks", 4096, NEEDLES), ("needle tasks", 2048, NEEDLES),
                            ("multi_turn", 2048, lambda t: t == "multi_turn"),
                            ("long_recall, seeds 26-49", 4096, lambda t: t == "long_recall"),
                            ("long_recall", 2048, lambda t: t == "long_recall")):
    keys = sorted(k for k in runs["dense"] if k[1] == length and pick(k[0]) and k in runs["tca"] and k in runs["c0"])
    if not keys:
        continue
    print(f"\n{label} at {length}: {len(keys)} prompts")
    print("| task | prompts | dense | tca | c0 |\n|---|---|---|---|---|")
    for task in sorted({k[0] for k in keys}):
        part = [k for k in keys if k[0] == task]
        cells = [f"{100 * sum(runs[m][k]['score'] for k in part) / len(part):.1f}" for m in ("dense", "tca", "c0")]
        print(f"| {task} | {len(part)} | " + " | ".join(cells) + " |")
    for m in ("tca", "c0"):
        per_seed: dict[int, list[float]] = {}
        for k in keys:
            per_seed.setdefault(k[2], []).append(100 * (runs[m][k]["score"] - runs["dense"][k]["score"]))
        d = [sum(v) / len(v) for v in per_seed.values()]
        half = 1.96 * statistics.stdev(d) / len(d) ** 0.5
        kv = sum(runs[m][k]["kv_kept"] for k in keys) / len(keys)
        print(f"{m} - dense: {sum(d) / len(d):+.1f} ± {half:.1f} ({len(d)} seeds), KV {kv:.3f}")
    diff = [100 * (runs["c0"][k]["score"] - runs["tca"][k]["score"]) for k in keys]
    half = 1.96 * statistics.stdev(diff) / len(diff) ** 0.5
    same = sum(runs["c0"][k]["answer"] == runs["tca"][k]["answer"] for k in keys)
    print(f"c0 - tca per prompt: {sum(diff) / len(diff):+.1f} ± {half:.1f}; better on {sum(x > 0 for x in diff)}, "
          f"worse on {sum(x < 0 for x in diff)}, the same answer on {same}")

# Both parts' long_recall prompts pooled: the cache's own selection (hyb0 on seeds 0-25, identical to the knob
# on the three seeds run both ways; c0 on 26-49) minus the shipped tca, each against the same run's tca.
pooled = {s: 100 * (variants["hyb0"][s]["score"] - tca[s]["score"]) for s in seeds}
pooled.update({k[2]: 100 * (runs["c0"][k]["score"] - runs["tca"][k]["score"])
               for k in runs["c0"] if k[:2] == ("long_recall", 4096) and k in runs["tca"]})
for label, part in (("all", sorted(pooled)), ("not picked", [s for s in sorted(pooled) if s not in PICKED])):
    d = [pooled[s] for s in part]
    half = 1.96 * statistics.stdev(d) / len(d) ** 0.5
    print(f"\nlong_recall at 4K, {label} ({len(d)} seeds): cache's own selection - tca "
          f"{sum(d) / len(d):+.1f} ± {half:.1f}")
