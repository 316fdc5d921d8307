"""Splits the H200's 50 `long_recall` prompts at 4K by where the copied list stands, and tabulates dense,
`tca`, `tca_emulated` (no compression during decode) and `tca_recon` on each part (EVALUATION.md,
"Where `long_recall`'s loss is made"):

    python benchmarks/eval/H200-2026-12-04-long-recall-emulated-50/split.py

A list "ends in the final window" when it starts within ``window + LIST_TOKENS`` tokens of the prompt's
end (the shipped SmolLM2 budgets' window is 512; a list is ~420 tokens). The prompts are rebuilt with the
suite's own generator and tokenizer, so the positions are the ones the runs saw.
"""

import json
from pathlib import Path

from tca_flex.eval.report import paired_difference
from tca_flex.eval.runner import prompt_budget
from tca_flex.eval.tasks import TASKS
from tca_flex.models import load_smollm2_tokenizer

EVAL = Path(__file__).resolve().parent.parent
RUNS = {  # folder -> the methods taken from it (each run's dense is the same prompts' dense)
    "H200-2026-12-03-long-recall-4k": None,  # dense, tca: seeds 12-49
    "H200-2026-12-03-real-50/long_recall": None,  # dense, tca: seeds 0-11
    "H200-2026-12-03-long-recall-recon-fused-50": {"tca_recon[smollm2_budgets]"},
    "H200-2026-12-04-long-recall-emulated-50": None,  # tca_emulated
}
LENGTH, WINDOW, LIST_TOKENS = 4096, 512, 450
METHODS = ["dense", "tca[smollm2_budgets]", "tca_emulated[smollm2_budgets]", "tca_recon[smollm2_budgets]"]


def load() -> list[dict]:
    records = []
    for run, keep in RUNS.items():
        for path in sorted((EVAL / run).glob("**/results.json")):
            records += [r for r in json.loads(path.read_text())["records"]
                        if r["kind"] == "task" and r["task"] == "long_recall" and r["length"] == LENGTH
                        and (keep is None or r["method"] in keep)]
    return records


def list_start_from_end(tokenizer, seed: int) -> int:
    """Tokens between the list's first token and the prompt's end, for the prompt the suite built."""
    probe = TASKS["long_recall"](tokenizer, 64, seed)
    sample = TASKS["long_recall"](tokenizer, prompt_budget(LENGTH, probe.max_new_tokens), seed)
    enc = tokenizer(sample.prompt, return_offsets_mapping=True)
    start = sample.prompt.index(" Inventory entry 1:")
    first = next(i for i, (a, _) in enumerate(enc["offset_mapping"]) if a >= start)
    return len(enc.input_ids) - first



def main() -> None:
    records = load()
    tokenizer = load_smollm2_tokenizer()
    seeds = sorted({r["seed"] for r in records})
    distance = {s: list_start_from_end(tokenizer, s) for s in seeds}
    window_seeds = {s for s in seeds if distance[s] <= WINDOW + LIST_TOKENS}
    near = [distance[s] for s in window_seeds]
    print(f"lists ending in the final window: seeds {sorted(window_seeds)} "
          f"(start {min(near)}-{max(near)} tokens from the end)")
    for name, part in (("all", set(seeds)), ("list ends in the final window", window_seeds),
                       ("list in the global region", set(seeds) - window_seeds)):
        sub = [r for r in records if r["seed"] in part]
        cells = []
        for m in METHODS:
            scores = [100 * r["score"] for r in sub if r["method"] == m]
            cell = f"{m.split('[')[0]} {sum(scores) / len(scores):.1f}"
            if m != "dense":
                mean, half = paired_difference(sub, LENGTH, m, "dense")
                cell += f" ({mean:+.1f} ± {half:.1f})"
            cells.append(cell)
        mean, half = paired_difference(sub, LENGTH, METHODS[2], METHODS[1])
        print(f"{name} ({len(part)}): " + ", ".join(cells) + f"; emulated - tca {mean:+.1f} ± {half:.1f}")


if __name__ == "__main__":
    main()
