"""Probe: how many of a needle's digit tokens does each KV head keep in TCA's pruned cache?

Runs the pruned-cache TCA (explicit-mask backend) on a task's prompts and, per
prompt, counts over all (layer, KV head) pairs how many keep every token of the
expected answer where it sits in the prompt, with the answer given. Used to
find why low-tau budgets lose needles at short prompts (EVALUATION.md,
2026-12-02, "the budget ladder at short prompts").

    PYTHONPATH=. python scripts/ladder_probe.py --budgets benchmarks/eval/budgets/smollm2_tau0.5.json \
        --length 2048 --seeds 0 1 2 [--anchor 112]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from tca_flex.budgets import HeadBudgets
from tca_flex.eval.install import _RECORD_ATTR
from tca_flex.eval.methods import tca_budgets
from tca_flex.eval.runner import greedy, prompt_budget
from tca_flex.eval.tasks import TASKS, score
from tca_flex.integration import attention_modules
from tca_flex.models import load_smollm2


def answer_positions(tok, ids: list[int], answer: str) -> list[int]:
    """Token positions whose text overlaps the first occurrence of ``answer`` in the prompt."""
    pieces = [tok.decode([t]) for t in ids]
    start = "".join(pieces).find(answer)
    if start < 0:
        raise ValueError(f"{answer!r} not found in the prompt")
    out, at = [], 0
    for i, piece in enumerate(pieces):
        if at < start + len(answer) and at + len(piece) > start:
            out.append(i)
        at += len(piece)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", required=True)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--task", default="niah_single", choices=list(TASKS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--anchor", type=int, default=None, help="override config.anchor_blocks")
    args = p.parse_args()
    torch.set_num_threads(1)
    budgets = HeadBudgets.load(args.budgets)
    if args.anchor is not None:
        budgets = dataclasses.replace(budgets, config=budgets.config.replace(anchor_blocks=args.anchor))
    model, tok = load_smollm2()
    prepared = tca_budgets(budgets, "probe", backend="mask").prepare(model, args.length)
    correct = 0
    try:
        for seed in args.seeds:
            sample = TASKS[args.task](tok, prompt_budget(args.length, 16), seed)
            ids = tok(sample.prompt).input_ids
            new, *_ = greedy(model, torch.tensor([ids]), sample.max_new_tokens, tok.eos_token_id)
            answer = tok.decode(new, skip_special_tokens=True)
            pos = answer_positions(tok, ids, sample.answers[0])
            kept = torch.stack([getattr(m, _RECORD_ATTR).keep[0][:, pos] for m in attention_modules(model)])
            correct += score(answer, sample)
            print(f"seed {seed} depth {sample.depth:.2f}: answer {answer.strip()!r} (expected {sample.answers[0]}); "
                  f"heads keeping the whole answer {kept.all(-1).float().mean():.2f}, answer tokens kept "
                  f"{kept.float().mean():.2f}, KV kept {prepared.kept_fraction():.3f}", flush=True)
    finally:
        prepared.cleanup()
    print(f"{args.budgets} anchor_blocks={budgets.config.anchor_blocks} L={args.length}: "
          f"{correct}/{len(args.seeds)} correct")


if __name__ == "__main__":
    main()
