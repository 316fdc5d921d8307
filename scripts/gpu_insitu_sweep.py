"""The decode kernel's tile and grid swept inside a compiled decode step, on the GPU (H200 probe).

    PYTHONPATH=. python scripts/gpu_insitu_sweep.py [LAYERS]

The earlier sweeps (``scripts/gpu_decode_sweep.py``) replay one launch 20 times back to back, so
at 32K a kept cache of ~45 MB may be re-read from the 50 MB L2. Here each setting runs where it
runs for users: the compiled decode step of a LLaMA-3.1-8B-shaped model of LAYERS layers
(default 4; ``tca_flex.compile``, two captured graphs), whose weight GEMVs sweep the L2 between
layers. ``triton_decode.launch`` reads ``BALANCED_PROGRAMS``, ``BLOCK_N``, ``NUM_WARPS`` and
``NUM_STAGES`` at launch, so each setting is captured anew (not compiled), over a fresh cache
prefilled from the same prompt, and replayed under ``torch.profiler``; printed: the device time a
layer of the attention kernel and of the merge (us, mean over 32 replays), and the step's median
wall time over 64 replays (CUDA events; the version run on 2026-12-04 timed the host's choice of
graph inside the step, so its wall times, never cited, read high). The replay loops are the step
probe's (``gpu_step_profile.py``, beside this file: a script's folder is on its import path).
"""

import itertools
import statistics
import sys

import torch
from gpu_step_profile import replay_once, timed_replays
from torch.profiler import ProfilerActivity, profile

from tca_flex import TCACache, TCAConfig
from tca_flex import triton_decode as td
from tca_flex.bench_models import captured_decode, fastest_dense_sdpa, llama_8b_shaped
from tca_flex.budgets import HeadBudgets
from tca_flex.hfcompat import cache_kwargs
from tca_flex.integration import apply, remove
from tca_flex.integration import compile as tca_compile

SHIPPED = (td.BALANCED_PROGRAMS, td.BLOCK_N, td.NUM_STAGES, td.NUM_WARPS)
GRID = [SHIPPED] + [s for s in itertools.product((264, 396, 528, 792), (32, 64, 128), (2, 3), (4,)) if s != SHIPPED]
GRID += [SHIPPED, SHIPPED]  # the shipped setting again at the end: the run's noise


def use(setting: tuple[int, int, int, int]) -> None:
    td.BALANCED_PROGRAMS, td.BLOCK_N, td.NUM_STAGES, td.NUM_WARPS = setting


def measure(graphs: dict, cache, layers: int) -> tuple[float, float, float]:
    times = timed_replays(graphs, cache, True, 64)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(32):
            replay_once(graphs, cache, True)
        torch.cuda.synchronize()
    attend = merge = 0.0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            if event.name == "_balanced_kernel":
                attend += event.device_time
            elif event.name == "_combine_kernel":
                merge += event.device_time
    return attend / (32 * layers), merge / (32 * layers), statistics.median(times)


@torch.no_grad()
def main() -> None:
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    device, dtype = torch.device("cuda"), torch.bfloat16
    model = llama_8b_shaped(layers, device, dtype, False, 131072 + 512)
    model.set_attn_implementation(fastest_dense_sdpa())
    config = TCAConfig(block_size=128, window=4096)
    step_ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    for length, keep in ((32768, 0.25), (131072, 0.37)):
        ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
        pos = torch.full((1, 1), length, device=device)
        cache_position = torch.full((1,), length, device=device)
        apply(model, budgets=HeadBudgets.uniform(layers, 8, keep, config))
        compiled = tca_compile(model)
        for setting in GRID:
            # A fresh cache per setting, prefilled from the same prompt: every setting decodes the same
            # kept set (replays would otherwise grow it from one setting to the next).
            cache = TCACache(model, reserve_tokens=160)
            model(ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))

            def step(i, fn=compiled, cache=cache, pos=pos, cache_position=cache_position):
                return fn(input_ids=step_ids, position_ids=pos, cache_position=cache_position, use_cache=True,
                          logits_to_keep=1, **cache_kwargs(model, cache)).logits

            use(setting)
            graphs = captured_decode(step, cache, variants=(False, True))
            attend, merge, step_us = measure(graphs, cache, layers)
            del graphs, cache
            print(f"{length} keep {keep}: programs {setting[0]} block {setting[1]} stages {setting[2]} warps "
                  f"{setting[3]}: attention {attend:.2f} us, merge {merge:.2f}, sum {attend + merge:.2f}; "
                  f"step {step_us:.1f} us ({layers} layers)", flush=True)
        use(SHIPPED)
        del compiled
        remove(model)
        torch._dynamo.reset()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
