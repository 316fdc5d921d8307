"""`long_recall` on the H200 through the shipped path with the decode grace the shipped budgets set,
50 prompts at each of 2K, 4K and 8K, and pooled (EVALUATION.md, "Long answers"):

    python benchmarks/eval/H200-2026-12-04-long-recall-grace/pool.py

2K: `lrg2k0/` (seeds 0-15) and `lrg2k/` (16-49), dense and `tca` in each call. 8K: `lrg8k/` (0-49),
dense and `tca` in one call. 4K: `lrg4k/` ran `tca` alone; its dense is the 2026-12-03 call that ran
dense on all 50 seeds (`H200-2026-12-03-long-recall-recon-fused-50/`).
"""

import json
from pathlib import Path

from tca_flex.eval.report import paired_difference

HERE = Path(__file__).resolve().parent
RUNS = {2048: ["lrg2k0", "lrg2k"], 4096: ["lrg4k", "../H200-2026-12-03-long-recall-recon-fused-50"],
        8192: ["lrg8k"]}
TCA = "tca[smollm2_budgets]"


def records(length: int) -> list[dict]:
    out = []
    for run in RUNS[length]:
        for r in json.loads((HERE / run / "results.json").read_text())["records"]:
            if r["kind"] == "task" and r["task"] == "long_recall" and r["method"] in ("dense", TCA):
                out.append(r)
    return out


def row(name: str, recs: list[dict], length: int) -> str:
    mean = {m: sum(100 * r["score"] for r in recs if r["method"] == m) / sum(r["method"] == m for r in recs)
            for m in ("dense", TCA)}
    seeds = len({r["seed"] for r in recs})
    kv = [r["kv_kept"] for r in recs if r["method"] == TCA]
    diff, half = paired_difference(recs, length, TCA, "dense")
    return (f"| {name} ({seeds}) | {mean['dense']:.1f} | {mean[TCA]:.1f} | {diff:+.1f} ± {half:.1f} "
            f"| {sum(kv) / len(kv):.3f} |")


print("| long_recall | dense | tca (grace 2) | vs dense (95% CI) | KV kept |")
print("|---|---|---|---|---|")
pooled = []
for length in RUNS:
    recs = records(length)
    print(row(f"{length // 1024}K", recs, length))
    # Pooled: each (length, seed) is one paired prompt.
    pooled += [dict(r, length=0, seed=(length, r["seed"])) for r in recs]
print(row("pooled", pooled, 0))
