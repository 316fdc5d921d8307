"""A decode loop of one's own over ``torch.compile(model, mode="reduce-overhead")``: the time of a step,
synchronised as a loop reading each next token is, with the padded prefill's note and let-go as a
pre-hook and a hook on the model (before the sixteenth session: under ``torch.compile(model)`` each
ran as a Dynamo frame of its own at every call) against the forward wrapper ``apply`` installs since.
CUDA; on a CPU, tiny shapes and no CUDA graphs, to check the script.

    PYTHONPATH=.:scripts python scripts/gpu_forward_wrapper_ab.py [LAYERS] [LENGTH]   # defaults 32 8192

Two models in one process (TCA 25% + window, a reserved ``TCACache`` each), their steps run in
alternating blocks of 40 (the first pair of blocks compiles and records, untimed); prints each
variant's median step and the median of the paired differences.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from compiled_step_host_time import as_model_hooks

from tca_flex import TCACache, apply
from tca_flex.bench_models import llama_8b_shaped
from tca_flex.budgets import HeadBudgets
from tca_flex.config import TCAConfig
from tca_flex.hfcompat import cache_kwargs

BLOCKS, STEPS = 7, 40


@torch.no_grad()
def main() -> None:
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    length = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    if not cuda:
        length = min(length, 300)
    config = TCAConfig() if cuda else TCAConfig(block_size=32, window=64)
    torch._dynamo.config.recompile_limit = 64  # two models' frames in one process
    runs = {}
    for hooks in (True, False):
        torch.manual_seed(0)
        model = llama_8b_shaped(layers, device, dtype, not cuda, length + 1024)
        apply(model, budgets=HeadBudgets.uniform(layers, model.config.num_key_value_heads, 0.25, config))
        if hooks:
            as_model_hooks(model)
        cache = TCACache(model, reserve_tokens=BLOCKS * STEPS + 64)
        step = torch.compile(model, mode="reduce-overhead") if cuda else torch.compile(model)
        prompt = torch.randint(1, 1000 if cuda else 256, (1, length), device=device)
        first = model(prompt, **cache_kwargs(model, cache)).logits[:, -1].argmax(-1, keepdim=True)  # eager prefill
        runs[hooks] = {"model": model, "cache": cache, "step": step, "next": first, "pos": length, "times": []}
    for block in range(BLOCKS):
        for hooks in ((True, False) if block % 2 else (False, True)):
            run = runs[hooks]
            started = time.perf_counter()
            for _ in range(STEPS):
                if cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                run["cache"].prepare_decode_step()
                t0 = time.perf_counter()
                out = run["step"](run["next"], position_ids=torch.full((1, 1), run["pos"], device=device),
                                  **cache_kwargs(run["model"], run["cache"]))
                run["next"] = out.logits[:, -1].argmax(-1, keepdim=True)
                int(run["next"])  # a loop that reads its next token waits for the step
                if block > 0:
                    run["times"].append(time.perf_counter() - t0)
                run["pos"] += 1
            if block == 0:
                print(f"{'hooks' if hooks else 'wrapper'}: first block (compile, record) "
                      f"{time.perf_counter() - started:.1f} s", flush=True)
    for hooks in (True, False):
        times = runs[hooks]["times"]
        quartiles = statistics.quantiles(times, n=4)
        print(f"TCA, {layers} layers, {length} tokens, {'model pre-hook and hook' if hooks else 'forward wrapper'}: "
              f"step median {statistics.median(times) * 1e3:.3f} ms (quartiles {quartiles[0] * 1e3:.3f}-"
              f"{quartiles[2] * 1e3:.3f}), {len(times)} steps", flush=True)
    paired = [a - b for a, b in zip(runs[True]["times"], runs[False]["times"], strict=True)]
    print(f"paired difference (hooks - wrapper): median {statistics.median(paired) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
