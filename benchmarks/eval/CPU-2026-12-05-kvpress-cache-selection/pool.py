"""TCA with the cache's own selection (the default since 2026-12-05) against the kvpress presses at
equal KV, on the prompts of the earlier CPU comparisons: only TCA ran again (this folder); the presses,
dense and TCA as it was before (the cache kept the prefill's selection, relabelled "tca (previous)")
come from the earlier runs, paired by seed (EVALUATION.md, "kvpress presses at equal KV, again").

    python benchmarks/eval/CPU-2026-12-05-kvpress-cache-selection/pool.py
"""

import json
from pathlib import Path

from tca_flex.eval.report import pooled_against

HERE = Path(__file__).resolve().parent
EVAL = HERE.parent
# (length, budget file's label, which names TCA's method): (this folder's runs, the earlier runs)
COMPARISONS = {
    (2048, "smollm2_budgets"): (["k2"], [
        "CPU-2026-12-02-kvpress-equal-kv/2k-a", "CPU-2026-12-02-kvpress-equal-kv/2k-b",
        "CPU-2026-12-02-kvpress-equal-kv/2k-tca", "CPU-2026-12-04-kvpress-2k-s5/2k-presses-s5",
        "CPU-2026-12-04-kvpress-2k-s5/2k-tca-s5", "CPU-2026-12-04-kvpress-2k-s10/2k-presses-s10",
        "CPU-2026-12-04-kvpress-2k-s10/2k-tca-s10", "CPU-2026-12-04-kvpress-2k-s20/2k-presses-s20",
        "CPU-2026-12-04-kvpress-2k-s20/2k-tca-s20"]),
    (8192, "smollm2_budgets"): (["k8a", "k8b"], [
        "CPU-2026-12-03-kvpress-8k/8k-presses", "CPU-2026-12-03-kvpress-8k/8k-tca",
        "CPU-2026-12-03-kvpress-8k/8k-presses-s5", "CPU-2026-12-03-kvpress-8k/8k-tca-s5",
        "CPU-2026-12-03-kvpress-8k/8k-presses-s10", "CPU-2026-12-03-kvpress-8k/8k-tca-s10"]),
    (4096, "smollm2_tau0.5_anchored"): (["k4a", "k4b"], [
        "CPU-2026-12-03-kvpress-4k-21pct/4k25-presses", "CPU-2026-12-03-kvpress-4k-21pct/4k25-tca",
        "CPU-2026-12-04-kvpress-4k-21pct-s5/4k21-presses-s5", "CPU-2026-12-04-kvpress-4k-21pct-s5/4k21-tca-s5"]),
    (8192, "smollm2_tau0.7"): (["k8s18"], [
        "CPU-2026-12-03-kvpress-8k-18pct/8k18-presses", "CPU-2026-12-03-kvpress-8k-18pct/8k18-tca",
        "CPU-2026-12-04-kvpress-8k-18pct-s5/8k18-presses-s5", "CPU-2026-12-04-kvpress-8k-18pct-s5/8k18-tca-s5"]),
}


def load(folder: Path) -> list[dict]:
    path = folder / "results.json"
    return json.loads(path.read_text())["records"] if path.exists() else []


for (length, label), (ours, earlier) in COMPARISONS.items():
    tca = f"tca[{label}]"
    new = [r for run in ours for r in load(HERE / run)]
    if not new:
        continue
    old = [dict(r, method="tca (previous)") if r["method"] == tca else r
           for run in earlier for r in load(EVAL / run)]
    # Only the seeds this folder ran: the methods' averages then describe the same prompts.
    seeds = {r["seed"] for r in new if r["kind"] == "task"}
    records = new + [r for r in old if r["kind"] == "task" and r.get("seed") in seeds]
    kv = [r["kv_kept"] for r in new if r["kind"] == "task"]
    print(f"{length // 1024}K, {label}, TCA KV kept {sum(kv) / len(kv):.3f}")
    print(pooled_against(records, length, tca))
    print()
