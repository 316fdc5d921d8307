"""The cache's own selection (`cache_spread_observation_queries=0`) through the shipped path on the
H200, against dense and the default (the cache keeps the prefill's selection) on the same prompts
(EVALUATION.md, "The cache's own selection"):

    python benchmarks/eval/H200-2026-12-05-cache-selection/pool.py

This folder ran `tca` alone with the option; dense and the default come from the earlier calls on
the same seeds: the eight needle tasks from `H200-2026-12-03-real-50/`, `long_recall` from
`H200-2026-12-04-long-recall-grace/` (4K's dense from `H200-2026-12-03-long-recall-recon-fused-50/`),
`multi_turn` from `H200-2026-12-04-multi-turn-grace/` (`tca`, each turn appended to one `TCACache`,
and `tca_recon`, the first turn selected by reconstruction).
"""

import json
from pathlib import Path

from tca_flex.eval.report import paired_difference

HERE = Path(__file__).resolve().parent
EVAL = HERE.parent
TCA = "tca[smollm2_budgets]"
C0 = "cache_selection"
GRACE = EVAL / "H200-2026-12-04-long-recall-grace"
# (tasks, length): (this folder's run, earlier runs holding dense and the default)
ROWS = {
    ("8 needle tasks", 2048): ("t2k", [EVAL / "H200-2026-12-03-real-50"]),
    ("8 needle tasks", 4096): ("t4k", [EVAL / "H200-2026-12-03-real-50"]),
    ("8 needle tasks", 8192): ("t8k", [EVAL / "H200-2026-12-03-real-50"]),
    ("long_recall", 2048): ("c2k", [GRACE / "lrg2k0", GRACE / "lrg2k"]),
    ("long_recall", 4096): ("c4k", [GRACE / "lrg4k", EVAL / "H200-2026-12-03-long-recall-recon-fused-50"]),
    ("long_recall", 8192): ("c8k", [GRACE / "lrg8k"]),
    ("multi_turn", 2048): ("cmt", [EVAL / "H200-2026-12-04-multi-turn-grace"]),
    ("multi_turn, tca_recon", 2048): ("cmtr", [EVAL / "H200-2026-12-04-multi-turn-grace"]),
}
RECON = "tca_recon[smollm2_budgets]"


def load(folder: Path) -> list[dict]:
    return [r for r in json.loads((folder / "results.json").read_text())["records"] if r["kind"] == "task"]


def records(name: str, length: int) -> list[dict]:
    run, earlier = ROWS[(name, length)]
    # The default is the same method without the option: `tca`, or `tca_recon` where the row names it.
    default = RECON if "tca_recon" in name else TCA
    ours = [dict(r, method=C0) for r in load(HERE / run) if r["length"] == length]
    tasks = {r["task"] for r in ours}
    seeds = {r["seed"] for r in ours}
    theirs = [r for folder in earlier for r in load(folder)
              if r["length"] == length and r["task"] in tasks and r["seed"] in seeds
              and r["method"] in ("dense", default)]
    return ours + [dict(r, method=TCA) if r["method"] == default else r for r in theirs]


def mean(recs: list[dict], method: str) -> float:
    values = [100 * r["score"] for r in recs if r["method"] == method]
    return sum(values) / len(values)


def diff(recs: list[dict], length: int, method: str, reference: str) -> str:
    d, half = paired_difference(recs, length, method, reference)
    return f"{d:+.1f} ± {half:.1f}"


print("| tasks | length (seeds) | dense | default | cache's own | own vs dense (95% CI) "
      "| own vs default | KV kept |")
print("|---|---|---|---|---|---|---|---|")
pooled: dict[str, list[dict]] = {}
for (name, length) in ROWS:
    recs = records(name, length)
    seeds = len({r["seed"] for r in recs if r["method"] == C0})
    kv = [r["kv_kept"] for r in recs if r["method"] == C0]
    print(f"| {name} | {length // 1024}K ({seeds}) | {mean(recs, 'dense'):.1f} | {mean(recs, TCA):.1f} "
          f"| {mean(recs, C0):.1f} | {diff(recs, length, C0, 'dense')} | {diff(recs, length, C0, TCA)} "
          f"| {sum(kv) / len(kv):.3f} |")
    # Pooled over lengths: each (length, seed) is one paired prompt.
    pooled.setdefault(name, []).extend(dict(r, length=0, seed=(length, r["seed"])) for r in recs)
for name, recs in pooled.items():
    if len({r["seed"][0] for r in recs}) < 2:
        continue
    print(f"| {name} | pooled | {mean(recs, 'dense'):.1f} | {mean(recs, TCA):.1f} | {mean(recs, C0):.1f} "
          f"| {diff(recs, 0, C0, 'dense')} | {diff(recs, 0, C0, TCA)} | |")

# The needle tasks one by one, and against the 2026-12-02 baselines at equal KV (seeds 0-19; dense's
# answers on those seeds were identical across the two runs, so the prompts pair).
TASKS = ["common_words", "frequent_words", "niah_multikey", "niah_multiquery", "niah_multivalue", "niah_single",
         "passkey", "variable_tracking"]
BASELINES = load(EVAL / "H200-2026-12-02-n20" / "main")
print()
print("| length | " + " | ".join(TASKS) + " | avg | vs SnapKV (seeds 0-19) | vs StreamingLLM (seeds 0-19) |")
print("|---" * (len(TASKS) + 4) + "|")
for length, run in ((2048, "t2k"), (4096, "t4k"), (8192, "t8k")):
    ours = [dict(r, method=C0) for r in load(HERE / run)]
    per_task = [mean([r for r in ours if r["task"] == t], C0) for t in TASKS]
    first20 = [r for r in ours if r["seed"] < 20]
    versus = []
    for prefix in ("snapkv", "streaming"):
        theirs = [r for r in BASELINES if r["length"] == length and r["method"].startswith(prefix)]
        versus.append(diff(first20 + [dict(r, method=prefix) for r in theirs], length, C0, prefix))
    print(f"| {length // 1024}K | " + " | ".join(f"{v:.1f}" for v in per_task)
          + f" | {mean(ours, C0):.1f} | {versus[0]} | {versus[1]} |")
