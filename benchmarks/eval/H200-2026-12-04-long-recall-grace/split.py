"""`long_recall` at 4K on the H200 with the decode grace the shipped budgets now set (grace_blocks 2),
paired with the 50 prompts' earlier runs, split by where the copied list stands (EVALUATION.md,
"Long answers"):

    python benchmarks/eval/H200-2026-12-04-long-recall-grace/split.py

The grace run (`lrg4k/`) names its method `tca[smollm2_budgets]`, as the earlier run without the
grace did; here it is read as `tca_grace`. Dense comes from the run of 2026-12-03 that ran dense and
`tca_recon` on all 50 seeds in one call; its answers are checked equal to the two earlier dense runs'.
The split into "final window" and "global region" prompts is the one of
`H200-2026-12-04-long-recall-emulated-50/split.py`, imported from there.
"""

import importlib.util
import json
from pathlib import Path

from tca_flex.eval.report import paired_difference
from tca_flex.models import load_smollm2_tokenizer

HERE = Path(__file__).resolve().parent
EVAL = HERE.parent
LENGTH = 4096


def records_of(run: str, rename: dict[str, str] | None = None) -> list[dict]:
    out = []
    for path in sorted((EVAL / run).glob("**/results.json")):
        for r in json.loads(path.read_text())["records"]:
            if r["kind"] == "task" and r["task"] == "long_recall" and r["length"] == LENGTH:
                out.append(dict(r, method=(rename or {}).get(r["method"], r["method"])))
    return out


fused = records_of("H200-2026-12-03-long-recall-recon-fused-50")
old = records_of("H200-2026-12-03-long-recall-4k") + records_of("H200-2026-12-03-real-50/long_recall")
emulated = records_of("H200-2026-12-04-long-recall-emulated-50")
grace = records_of("H200-2026-12-04-long-recall-grace/lrg4k", {"tca[smollm2_budgets]": "tca_grace"})

dense = {r["seed"]: r["answer"] for r in fused if r["method"] == "dense"}
dense_old = {r["seed"]: r["answer"] for r in old if r["method"] == "dense"}
same = sum(dense[s] == dense_old[s] for s in dense)
print(f"dense answers equal across runs: {same} of {len(dense)} seeds")

records = ([r for r in fused if r["method"] == "dense"] + [r for r in old if r["method"] != "dense"]
           + [r for r in emulated if r["method"].startswith("tca_emulated")]
           + [r for r in fused if r["method"].startswith("tca_recon")] + grace)
methods = ["tca[smollm2_budgets]", "tca_grace", "tca_emulated[smollm2_budgets]", "tca_recon[smollm2_budgets]"]

# The list positions of the prompts the suite built: the emulated run's script, imported.
spec = importlib.util.spec_from_file_location("split50", EVAL / "H200-2026-12-04-long-recall-emulated-50/split.py")
split50 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(split50)
tokenizer = load_smollm2_tokenizer()
seeds = sorted(dense)
distance = {s: split50.list_start_from_end(tokenizer, s) for s in seeds}
window_seeds = {s for s in seeds if distance[s] <= split50.WINDOW + split50.LIST_TOKENS}
print(f"lists ending in the final window: seeds {sorted(window_seeds)}")
for name, part in (("all", set(seeds)), ("list ends in the final window", window_seeds),
                   ("list in the global region", set(seeds) - window_seeds)):
    sub = [r for r in records if r["seed"] in part]
    score = {m: sum(100 * r["score"] for r in sub if r["method"] == m) / len(part) for m in ["dense", *methods]}
    cells = [f"dense {score['dense']:.1f}"]
    for m in methods:
        mean, half = paired_difference(sub, LENGTH, m, "dense")
        cells.append(f"{m.split('[')[0]} {score[m]:.1f} ({mean:+.1f} ± {half:.1f})")
    mean, half = paired_difference(sub, LENGTH, "tca_grace", "tca[smollm2_budgets]")
    print(f"{name} ({len(part)}): " + ", ".join(cells) + f"; grace - tca {mean:+.1f} ± {half:.1f}")
    changed = sorted(s for s in part if {r["method"]: r["answer"] for r in sub if r["seed"] == s}["tca_grace"]
                     != {r["method"]: r["answer"] for r in sub if r["seed"] == s}["tca[smollm2_budgets]"])
    print(f"  answers changed by the grace: seeds {changed}")
