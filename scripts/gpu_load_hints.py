"""Load hints on the decode kernel's K/V stream, on the GPU (H200 probe).

    PYTHONPATH=. python scripts/gpu_load_hints.py [LAYERS]

``triton_decode.KV_EVICTION`` / ``KV_CACHE_MODIFIER`` (Triton's ``eviction_policy`` and
``cache_modifier`` on the K, V and owner loads), each setting against the shipped one ("", ""):

1. the launch alone, CUDA-graph replay (``bench.kernel_launch``; 20 replays back to back, so a
   cache that fits in L2 may be re-read from it), settings alternated over five rounds;
2. the compiled decode step of a LLaMA-3.1-8B-shaped model of LAYERS layers (default 4), TCA 25% +
   4096 (``tca_flex.compile``, two captured graphs), where the weights' GEMVs run between the
   layers' attention as in a real step: median of 64 replays, settings alternated over three
   rounds (the compiled graph is the same: the op reads the settings at launch, so each setting
   is captured anew, not compiled).
"""

import statistics
import sys

import torch

from tca_flex import TCACache, TCAConfig, bench
from tca_flex import triton_decode as td
from tca_flex.bench_models import captured_decode, fastest_dense_sdpa, llama_8b_shaped
from tca_flex.budgets import HeadBudgets
from tca_flex.hfcompat import cache_kwargs
from tca_flex.integration import apply, remove
from tca_flex.integration import compile as tca_compile

SETTINGS = [("", ""), ("evict_first", ""), ("", ".cg"), ("evict_first", ".cg")]


def use(setting: tuple[str, str]) -> None:
    td.KV_EVICTION, td.KV_CACHE_MODIFIER = setting


def kernel_rounds(device: torch.device) -> None:
    for length, target in ((131072, 0.39), (131072, 0.15), (32768, 0.39)):
        launch = bench.kernel_launch(length, target, device)
        results = {s: [] for s in SETTINGS}
        for _ in range(5):
            for setting in SETTINGS:
                use(setting)
                results[setting].append(bench.graph_timed(launch, device))
        use(SETTINGS[0])
        print(f"kernel {length} {target:.0%}: " + "; ".join(
            f"{s[0] or '-'}/{s[1] or '-'} {statistics.median(v):.1f} us" for s, v in results.items()), flush=True)


@torch.no_grad()
def step_rounds(layers: int, device: torch.device) -> None:
    dtype = torch.bfloat16
    model = llama_8b_shaped(layers, device, dtype, False, 131072 + 512)
    model.set_attn_implementation(fastest_dense_sdpa())
    config = TCAConfig(block_size=128, window=4096)
    step_ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    for length in (32768, 131072):
        ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
        pos = torch.full((1, 1), length, device=device)
        cache_position = torch.full((1,), length, device=device)
        apply(model, budgets=HeadBudgets.uniform(layers, 8, 0.25, config))
        cache = TCACache(model, reserve_tokens=3 * len(SETTINGS) * 80 + 64)
        model(ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        compiled = tca_compile(model)

        def step(i, fn=compiled, cache=cache, pos=pos, cache_position=cache_position):
            return fn(input_ids=step_ids, position_ids=pos, cache_position=cache_position, use_cache=True,
                      logits_to_keep=1, **cache_kwargs(model, cache)).logits

        results = {s: [] for s in SETTINGS}
        for _ in range(3):
            for setting in SETTINGS:
                use(setting)
                graphs = captured_decode(step, cache, variants=(False, True))
                times = []
                for _ in range(64):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    graphs[cache.block_leaves_next()].replay()
                    end.record()
                    cache.replayed()
                    end.synchronize()
                    times.append(start.elapsed_time(end) * 1e3)
                results[setting].append(statistics.median(times))
                del graphs
        use(SETTINGS[0])
        print(f"step {length}, {layers} layers, TCA 25% + 4096 compiled: " + "; ".join(
            f"{s[0] or '-'}/{s[1] or '-'} {statistics.median(v):.1f} us ({', '.join(f'{x:.0f}' for x in v)})"
            for s, v in results.items()), flush=True)
        del cache, compiled
        remove(model)
        torch._dynamo.reset()
        torch.cuda.empty_cache()


def main() -> None:
    device = torch.device("cuda")
    kernel_rounds(device)
    step_rounds(int(sys.argv[1]) if len(sys.argv) > 1 else 4, device)


if __name__ == "__main__":
    main()
