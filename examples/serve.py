"""Serve a stream of requests with TCA: the recipe, on the bundled SmolLM2-135M-Instruct.

A server sees prompts of lengths it cannot predict. The recipe:

1. ``tca_flex.apply`` with calibrated budgets (here the shipped SmolLM2 ones);
2. ``tca_flex.warmup`` once, before the first request: it compiles the sparse
   prefill for every prompt length up to ``max_length`` and, on a GPU with
   ``generate=True``, the decode step that ``generate`` compiles by itself;
3. one ``TCACache(model, reserve_tokens=N)``, ``reset()`` before each request
   and passed to ``generate``. On a GPU the reserved room makes ``generate``
   compile the step and replay it from CUDA graphs (a request of the sizes of
   the one before refills its buffers and replays the graphs already recorded);
   on the CPU it decodes eagerly.

The script runs passkey prompts of distinct lengths through dense attention and
through this recipe and prints, per request, the latency (compiles included),
whether the answer is right and the KV bytes held.

    python examples/serve.py [--lengths 4600 5900 7100 5300] [--new 16]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

import tca_flex
from tca_flex.eval.tasks import passkey, score
from tca_flex.hfcompat import cache_kwargs
from tca_flex.memory import cache_bytes
from tca_flex.models import load_smollm2
from tca_flex.warmup import min_warmup_length


@torch.no_grad()
def request(model, tok, prompt: str, new: int, cache) -> tuple[str, float]:
    """One request: greedy ``new`` tokens; the answer and the seconds it took (device synchronised)."""
    ids = tok(prompt, return_tensors="pt").input_ids.to(model.device)
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         pad_token_id=tok.eos_token_id, **cache_kwargs(model, cache))
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    return " ".join(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split()), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4600, 5900, 7100, 5300],
                        help="prompt lengths in tokens, one request each (SmolLM2's context is 8K)")
    parser.add_argument("--new", type=int, default=16, help="greedy tokens per request")
    args = parser.parse_args()
    config = tca_flex.shipped_budgets("smollm2").config
    shortest = min_warmup_length(config.window, config.block_size)
    if max(args.lengths) + args.new < shortest:  # checked before the dense requests run
        parser.error(f"argument --lengths: the warm-up needs room for a {shortest}-token prompt; ask for at least "
                     f"one length >= {shortest - args.new}")
    logging.basicConfig(level=logging.WARNING)
    on_gpu = torch.cuda.is_available()
    model, tok = load_smollm2(dtype=torch.bfloat16 if on_gpu else torch.float32, device="cuda" if on_gpu else "cpu")
    from transformers import DynamicCache

    samples = [passkey(tok, n, seed=50 + i) for i, n in enumerate(args.lengths)]
    rows = []
    for sample in samples:
        cache = DynamicCache(config=model.config)
        text, seconds = request(model, tok, sample.prompt, args.new, cache)
        rows.append(("dense", sample, text, seconds, cache_bytes(cache)))

    tca_flex.apply(model, budgets=tca_flex.shipped_budgets("smollm2"))
    # generate compiles its decode step on accelerators only: warm it there.
    print(tca_flex.warmup(model, max_length=max(args.lengths) + args.new, generate=on_gpu, progress=False))
    cache = tca_flex.TCACache(model, reserve_tokens=args.new + 16)
    for sample in samples:
        cache.reset()  # empty for the new request; keeps the buffers for one of the same sizes
        text, seconds = request(model, tok, sample.prompt, args.new, cache)
        rows.append(("TCA", sample, text, seconds, cache_bytes(cache)))

    print(f"\n{'method':<7}{'tokens':>8}{'seconds':>9}{'KV MiB':>8}  right  answer")
    for method, sample, text, seconds, kv in rows:
        tokens = len(tok(sample.prompt).input_ids)
        print(f"{method:<7}{tokens:>8}{seconds:>9.2f}{kv / 2**20:>8.1f}  {'yes' if score(text, sample) else 'no':<5}  "
              f"{text[:40]}")
    for method in ("dense", "TCA"):
        mine = [r for r in rows if r[0] == method]
        print(f"{method}: {sum(r[3] for r in mine):.2f} s for {len(mine)} requests, "
              f"{sum(score(r[2], r[1]) for r in mine)}/{len(mine)} right")


if __name__ == "__main__":
    main()
