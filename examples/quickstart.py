"""Quickstart: TCA-Attention vs dense on the bundled SmolLM2-135M-Instruct.

Runs passkey retrieval at a few thousand tokens with dense attention and with
TCA (block 64, window 512, scaled to the model's 8K context), and prints
answer, correctness, kept-token fraction per layer and time. TCA uses the
per-head budgets calibrated for SmolLM2 that ship with the package
(``tca_flex.shipped_budgets("smollm2")``); ``--keep F`` replaces them with a
uniform keep fraction ``F`` for every head.
TCA runs twice: decoding over the full cache (TCA prefill only) and over
``tca_flex.TCACache``, the pruned KV cache, whose memory report is printed at
the end.

    python examples/quickstart.py [--tokens 3000] [--samples 2] [--keep 0.2] [--report]

``--report`` also prints TCA's fidelity report for the first prompt: per layer
and KV head, the attention mass dropped and Theorem 1's bound on the change.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import torch

import tca_flex
from tca_flex.bench_stream import speed_words
from tca_flex.eval.tasks import passkey, score
from tca_flex.hfcompat import cache_kwargs
from tca_flex.models import load_smollm2


@torch.no_grad()
def answer(model, tok, prompt: str, cache=None) -> tuple[str, float, int]:
    """Greedy answer, seconds, prompt tokens; ``cache`` is the KV cache generate fills."""
    ids = tok(prompt, return_tensors="pt").input_ids.to(model.device)
    start = time.perf_counter()
    # transformers renamed the cache argument past_key_values= to cache=; this passes the one it takes.
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id,
                         **cache_kwargs(model, cache))
    elapsed = time.perf_counter() - start
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return " ".join(text.split()), elapsed, ids.shape[1]  # one line for the table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=3000, help="prompt length in tokens")
    parser.add_argument("--samples", type=int, default=2, help="passkey prompts (random depths)")
    parser.add_argument("--keep", type=float, default=None,
                        help="uniform keep fraction for every head instead of the shipped calibrated budgets")
    parser.add_argument("--report", action="store_true", help="print the fidelity report for the first prompt")
    parser.add_argument("--span", type=int, default=0,
                        help="neighbours kept beside every kept token (TCAConfig.span; 0 = the paper's selection; "
                             "see EVALUATION.md before relying on it)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_smollm2(device=device)
    samples = [passkey(tok, args.tokens, seed=s) for s in range(args.samples)]

    dense = [answer(model, tok, s.prompt) for s in samples]
    if args.keep is None:
        budgets = tca_flex.shipped_budgets("smollm2")  # block 64, window 512, tau 0.9 (10% quantile)
        label = "shipped calibrated budgets"
    else:
        config = tca_flex.TCAConfig(block_size=64, window=512)
        budgets = tca_flex.HeadBudgets.uniform(model.config.num_hidden_layers,
                                               model.config.num_key_value_heads, args.keep, config)
        label = f"uniform keep {args.keep}"
    budgets = budgets.with_config(span=args.span)  # warns when the budgets were calibrated with another span
    label += f", span {args.span}"
    config = budgets.config
    tca_flex.apply(model, budgets=budgets)
    answer(model, tok, samples[0].prompt, tca_flex.TCACache(model))  # warm-up: compiles FlexAttention once
    # TCA prefill, then decode over the full cache (no cache passed: transformers' own), on purpose:
    # tca_flex's warning that such a cache is not pruned is silenced for this column...
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="tca_flex: new tokens attend over a cache that is not")
        prefill_only = [answer(model, tok, s.prompt) for s in samples]
    # ...and over the pruned cache, which keeps only each head's global subset + window.
    pruned, reports = [], []
    for s in samples:
        cache = tca_flex.TCACache(model)
        pruned.append(answer(model, tok, s.prompt, cache))
        reports.append(cache.memory_report())

    print(f"\nSmolLM2-135M-Instruct on {device}; TCA block {config.block_size}, window {config.window}, "
          f"decode compresses {config.grace_blocks} block(s) past the window, {label}")
    if config.cache_selection is not None:
        print(f"the cache keeps its own selection at the same budgets ({config.cache_spread_observation_queries} "
              "spread observation queries; docs/method.md, section 5)")
    print(f"{'tokens':>6} {'depth':>5} {'key':>6} | {'dense':<12} ok {'s':>5} | {'TCA, full cache':<15} ok {'s':>5} "
          f"| {'TCA, TCACache':<13} ok {'s':>5} | kept KV min/mean/max")
    columns = (dense, prefill_only, pruned)
    correct = [0, 0, 0]
    for i, s in enumerate(samples):
        frac = torch.tensor([m.kept_fraction for m in reports[i].layers])
        cells = []
        for c, (width, col) in enumerate(zip((12, 15, 13), columns, strict=True)):
            ans, secs, n = col[i]
            ok = score(ans, s)
            correct[c] += ok
            cells.append(f"{ans[:width]:<{width}} {'y' if ok else 'n':>2} {secs:>5.1f}")
        print(f"{n:>6} {s.depth:>5.2f} {s.answers[0]:>6} | " + " | ".join(cells)
              + f" | {frac.min():.2f}/{frac.mean():.2f}/{frac.max():.2f}")
    print(f"correct: dense {correct[0]}/{len(samples)}, TCA with full-cache decode {correct[1]}/{len(samples)}, "
          f"TCA with the pruned TCACache {correct[2]}/{len(samples)}")
    print("time (prefill + 8 tokens), against dense: " + "; ".join(
        f"{name} {speed_words(sum(r[1] for r in dense) / sum(r[1] for r in col))}"
        for name, col in (("TCA, full cache", prefill_only), ("TCA, TCACache", pruned))))
    if device == "cpu":
        print("(on a CPU at a few thousand tokens TCA is not expected to be faster: its speedups are measured at "
              "32K-128K tokens on a GPU, README, Results)")
    print("\nTCACache after the last prompt: kept KV entries (tokens x KV heads) vs a dense cache of the same\n"
          "length; bytes include the slot indices and free headroom (overhead)")
    print(reports[-1].format())
    if args.report:
        ids = tok(samples[0].prompt, return_tensors="pt").input_ids.to(model.device)
        print("\n" + str(tca_flex.report(model, ids, queries=256)))


if __name__ == "__main__":
    main()
