"""Does the CPU in bfloat16 reproduce the H200's `long_recall` losses at 4K, and do two changes of the
budgets move them? Per seed, dense and `tca` (shipped budgets, decode grace 2) on the CPU in bf16 beside
the same seeds on the H200, then the variants (EVALUATION.md, "A CPU proxy for the H200's long answers"):

    python benchmarks/eval/CPU-2026-12-04-long-recall-bf16/pool.py

Each CPU run is one `--samples 1 --seed S` run in its own folder here, `RUN-SEED/` (commands in
EVALUATION.md): `dense`, `tca`, and the variants `gqamax` (budgets recalibrated with
`gqa_aggregation=max`), `tau93` / `tau95` (recalibrated with tau 0.93 / 0.95) and `recon` (`tca_recon`,
the shipped budgets, the prompt selected by reconstruction). The H200 side: `tca` from
`H200-2026-12-04-long-recall-grace/lrg4k/`, dense from `H200-2026-12-03-long-recall-recon-fused-50/`.
"""

import json
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVAL = HERE.parent
TCA = "tca[smollm2_budgets]"


def records(path: Path, method: str | None = None) -> dict[int, dict]:
    """The 4K `long_recall` records of one results file, by seed (``method``: only that one)."""
    return {r["seed"]: r for r in json.loads(path.read_text())["records"]
            if r["kind"] == "task" and r["task"] == "long_recall" and r["length"] == 4096
            and (method is None or r["method"] == method)}


gpu = {"dense": records(EVAL / "H200-2026-12-03-long-recall-recon-fused-50/results.json", "dense"),
       "tca": records(EVAL / "H200-2026-12-04-long-recall-grace/lrg4k/results.json", TCA)}
cpu: dict[str, dict[int, dict]] = defaultdict(dict)
for run in sorted(HERE.glob("*-*/results.json")):
    name = run.parent.name.split("-")[0]
    # The dense runs passed --budgets too, so they also ran tca[FILE]: the same prompts a second time.
    method = {"dense": "dense", "tca": TCA, "recon": "tca_recon[smollm2_budgets]"}.get(name, f"tca[{name}]")
    cpu[name].update(records(run, method))
    if name == "dense":
        cpu["tca, again"].update(records(run, TCA))
# Seeds run only as a dense run (which ran tca too) take that tca.
cpu["tca"] = {**cpu["tca, again"], **cpu["tca"]}
variants = [v for v in cpu if v not in ("dense", "tca", "tca, again")]
seeds = sorted(set(cpu["dense"]) & set(cpu["tca"]))


def score(side: dict, run: str, seed: int) -> str:
    return f"{100 * side[run][seed]['score']:.1f}" if seed in side[run] else ""


print("| seed | H200 dense | H200 tca | CPU bf16 dense | CPU bf16 tca | " + " | ".join(variants) + " |")
print("|---|---|---|---|---|" + "---|" * len(variants))
for s in seeds:
    cells = [score(gpu, "dense", s), score(gpu, "tca", s), score(cpu, "dense", s), score(cpu, "tca", s)]
    print(f"| {s} | " + " | ".join(cells + [score(cpu, v, s) for v in variants]) + " |")
for run in ("tca", *variants):
    kv = [r["kv_kept"] for r in cpu[run].values()]
    print(f"{run}: KV kept {sum(kv) / len(kv):.3f} (mean of {len(kv)} prompts)")


def loses(side: dict, s: int) -> bool:
    return side["tca"][s]["score"] < side["dense"][s]["score"]


lost_gpu = [s for s in seeds if loses(gpu, s)]
again = [s for s in seeds if s in cpu["tca, again"] and (HERE / f"tca-{s}").is_dir()]
same = sum(cpu["tca"][s]["answer"] == cpu["tca, again"][s]["answer"] for s in again)
print(f"tca run twice on the CPU: the same answer on {same} of {len(again)} seeds")
print(f"seeds where the H200's tca loses: {len(lost_gpu)}; the CPU's bf16 tca loses too on "
      f"{sum(loses(cpu, s) for s in lost_gpu)}; tca scores equal on both devices: "
      f"{sum(cpu['tca'][s]['score'] == gpu['tca'][s]['score'] for s in seeds)} of {len(seeds)}")
PICKED = {2, 6, 7, 15, 16, 17, 19, 20, 25}  # chosen from the H200's results; the rest were not
for name, part in (("picked", [s for s in seeds if s in PICKED]),
                   ("not picked", [s for s in seeds if s not in PICKED])):
    if part:
        diff = {side: sum(100 * (d["tca"][s]["score"] - d["dense"][s]["score"]) for s in part) / len(part)
                for side, d in (("H200", gpu), ("CPU", cpu))}
        agree = sum(loses(gpu, s) == loses(cpu, s) for s in part)
        print(f"{name} ({len(part)} seeds): tca - dense H200 {diff['H200']:+.1f}, CPU bf16 {diff['CPU']:+.1f}; "
              f"loss or not alike on {agree}")
