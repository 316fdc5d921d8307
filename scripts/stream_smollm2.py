"""Per-request latency on the bundled SmolLM2 over prompts of distinct lengths (GPU).

    python scripts/stream_smollm2.py --out results.json [--count 20 --lo 2048 --hi 8000 --new 32]

Prompts come from the accuracy suite's generators (passkey and needle tasks),
each at its own length drawn from ``[lo, hi]``. Dense: transformers' SDPA with
its ``DynamicCache``. TCA: the shipped budgets, ``tca_flex.warmup`` first (its
time reported), then every prompt with a ``TCACache``. Each request is timed
as a whole (prefill + ``--new`` greedy tokens), compiles included. On the GPU
machine the GGUF arrives in two parts (``scripts/gpu_eval.sh``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

import tca_flex
from tca_flex.bench_stream import stream_lengths
from tca_flex.eval import tasks
from tca_flex.eval.runner import greedy
from tca_flex.models import load_smollm2

GENERATORS = [tasks.passkey, tasks.niah_single, tasks.niah_multikey, tasks.niah_multivalue]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--lo", type=int, default=2048)
    parser.add_argument("--hi", type=int, default=8000)
    parser.add_argument("--new", type=int, default=32, help="greedy tokens per request")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_smollm2(dtype=getattr(torch, args.dtype), device=device)
    lengths = stream_lengths(args.count, args.lo, args.hi, seed=7)
    samples = [GENERATORS[i % len(GENERATORS)](tokenizer, n, seed=100 + i) for i, n in enumerate(lengths)]
    prompts = [torch.tensor([tokenizer(s.prompt).input_ids], device=device) for s in samples]

    def request(ids, cache=None):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        new, *_ = greedy(model, ids, args.new, eos_id=None, cache=cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, tokenizer.decode(new)

    rows = []
    for sample, ids in zip(samples, prompts, strict=True):
        seconds, answer = request(ids)
        rows.append({"method": "dense", "length": ids.shape[1], "s": seconds, "correct": tasks.score(answer, sample)})
    tca_flex.apply(model, budgets=tca_flex.shipped_budgets("smollm2"))
    report = tca_flex.warmup(model, max_length=args.hi + 64, progress=False)
    before = counters["stats"]["unique_graphs"]
    for sample, ids in zip(samples, prompts, strict=True):
        seconds, answer = request(ids, tca_flex.TCACache(model))
        rows.append({"method": "tca+TCACache", "length": ids.shape[1], "s": seconds,
                     "correct": tasks.score(answer, sample)})
    summary = {}
    for method in ("dense", "tca+TCACache"):
        s = [r["s"] for r in rows if r["method"] == method]
        summary[method] = {"p50_s": statistics.median(s), "max_s": max(s), "total_s": sum(s),
                           "correct": sum(r["correct"] for r in rows if r["method"] == method)}
    pairs = zip([r for r in rows if r["method"] == "dense"], [r for r in rows if r["method"] != "dense"], strict=True)
    ratios = [t["s"] / d["s"] for d, t in pairs]
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "dtype": args.dtype, "new_tokens": args.new, "warmup_s": report.seconds, "warmup_graphs": report.graphs,
              "stream_graphs": counters["stats"]["unique_graphs"] - before,
              "tca_over_dense_per_request": {"median": statistics.median(ratios), "max": max(ratios)},
              "summary": summary, "rows": rows,
              "date": time.strftime("%Y-%m-%d", time.gmtime())}
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
