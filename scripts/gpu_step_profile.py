"""Where a compiled, graph-replayed decode step's device time goes, kernel by kernel (GPU probe).

    PYTHONPATH=. python scripts/gpu_step_profile.py [LAYERS] [KEEP] [LENGTH ...]

LLaMA-3.1-8B shapes with random bf16 weights (``bench.llama_8b_shaped``): dense over a
preallocated cache with maskless SDPA, compiled by ``torch.compile``, and TCA KEEP (default 0.25) + 4096
(``tca_flex.compile``, two captured graphs as in the ``e2e`` phase's compiled rows); each step
replayed from its CUDA graph under ``torch.profiler``. ``TCA_PROBE_APPEND`` picks the append
(``triton``: its own kernel; ``math``: its tensor form, compiled; default: the merge's). Prints per
kernel the device microseconds a step (summed over layers) and the launches a step, then the
step's wall time (CUDA events, outside the profiler) against the sum of its kernels: the
difference is the time between kernels; the host time of each ``graph.replay()`` (after a sync the
GPU waits for it); and the mean step of replays queued without a sync between them (the host
launches ahead, hiding that wait). Both steps are timed before either is profiled: after a
profiler session in the process a graph's launch took the host far longer (a later length's
lines say so).

Probe switches: ``TCA_PROBE_PROFILE=0`` times without profiling; ``TCA_PROBE_EAGER=1`` captures
both steps uncompiled; ``TCA_PROBE_ONE_GRAPH=1`` captures one TCA graph (the device decides whether a
block leaves); ``TCA_PROBE_DUMP=DIR`` keeps the graphs (``keep_graph=True``: instantiated at their
first replay) and writes them to DIR as DOT files.
"""

import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tca_flex import TCACache, TCAConfig, bench
from tca_flex.bench_models import captured_decode, fastest_dense_sdpa, llama_8b_shaped, one_step_dense
from tca_flex.budgets import HeadBudgets
from tca_flex.hfcompat import cache_kwargs
from tca_flex.integration import apply, remove
from tca_flex.integration import compile as tca_compile

STEPS = 64
# The decode step's append (``TCACache.set_append``): "auto" (the attention's merge kernel, as shipped),
# "triton" (the append's own kernel, before the attention) or "math" (tensor ops, which Inductor
# compiles with the step's own kernels).
APPEND = os.environ.get("TCA_PROBE_APPEND", "auto")
# A folder: the graphs are captured in debug mode and written there as DOT files (node types and
# attributes, to see what a slow graph launch is made of).
DUMP = os.environ.get("TCA_PROBE_DUMP")
EAGER = os.environ.get("TCA_PROBE_EAGER") == "1"  # capture the steps uncompiled
ONE_GRAPH = os.environ.get("TCA_PROBE_ONE_GRAPH") == "1"  # TCA: one graph, the device decides on compression
PROFILE = os.environ.get("TCA_PROBE_PROFILE", "1") != "0"  # 0: timings only, no profiler session
PROFILED = [False]  # whether a profiler session has run in this process
MODE = "eager" if EAGER else "compiled"


def next_graph(graphs: dict, cache, tca: bool):
    """The graph of the next step: for a ``TCACache`` in two graphs, the one ``block_leaves_next`` names."""
    return graphs[cache.block_leaves_next() if tca and not ONE_GRAPH else None]


def replay_once(graphs: dict, cache, tca: bool) -> None:
    """One decode step from its captured graph."""
    next_graph(graphs, cache, tca).replay()
    if tca:
        cache.replayed()


def timed_replays(graphs: dict, cache, tca: bool, steps: int) -> tuple[list[float], list[float]]:
    """Wall microseconds of ``steps`` replayed steps, one at a time (CUDA events), and the host
    microseconds of each ``graph.replay()`` call."""
    times, host = [], []
    for _ in range(steps):
        # The host picks the graph before the first event: its Python is not the step's device time.
        graph = next_graph(graphs, cache, tca)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        graph.replay()
        host.append((time.perf_counter() - t0) * 1e6)
        end.record()
        end.synchronize()
        if tca:
            cache.replayed()
        times.append(start.elapsed_time(end) * 1e3)
    return times, host


def dumped(graphs: dict, name: str) -> None:
    for variant, graph in graphs.items():
        graph.debug_dump(os.path.join(DUMP, f"{name}-{variant}.dot"))


def timings(graphs: dict, cache, tca: bool, steps: int) -> dict:
    """Synchronised steps (CUDA events), the host time of each ``graph.replay()`` and the queued mean."""
    times, host = timed_replays(graphs, cache, tca, steps)
    # Queued: no sync between replays, so the host launches ahead and a graph's launch latency
    # overlaps the previous step's kernels (mean microseconds a step).
    queued = bench.back_to_back(lambda: replay_once(graphs, cache, tca), torch.device("cuda"), warmup=0,
                                reps=steps) * 1e3
    return {"times": times, "host": host, "queued": queued, "after_profiler": PROFILED[0]}


def timing_line(label: str, timing: dict) -> str:
    times, host = timing["times"], timing["host"]
    after = " (timed after a profiler session in this process)" if timing["after_profiler"] else ""
    return (f"== {label}: step median {statistics.median(times):.1f} us (mean {statistics.fmean(times):.1f}, "
            f"min {min(times):.1f}, max {max(times):.1f}); queued back to back {timing['queued']:.1f} us a step; "
            f"host graph.replay() median {statistics.median(host):.1f} us, max {max(host):.1f}{after}")


def replay_stats(graphs: dict, cache, tca: bool, label: str, steps: int, timing: dict) -> None:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            replay_once(graphs, cache, tca)
        torch.cuda.synchronize()
    PROFILED[0] = True
    kernels, gaps = {}, {}
    device_events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                           key=lambda e: e.time_range.start)
    for prev, event in zip([None, *device_events[:-1]], device_events, strict=True):
        total, count = kernels.get(event.name, (0.0, 0))
        kernels[event.name] = (total + event.device_time, count + 1)
        gap = event.time_range.start - prev.time_range.end if prev is not None else None
        if gap is not None and gap < 50:  # longer: the host's next replay, not a gap inside a step
            key = f"{prev.name[:40]} -> {event.name[:40]}"
            total, count = gaps.get(key, (0.0, 0))
            gaps[key] = (total + gap, count + 1)
    busy = sum(t for t, _ in kernels.values()) / steps
    median = statistics.median(timing["times"])
    print(timing_line(label, timing), flush=True)
    print(f"  kernels {busy:.1f} us a step, between kernels {median - busy:.1f} us; "
          f"{sum(c for _, c in kernels.values()) / steps:.0f} launches a step", flush=True)
    for name, (total, count) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:16]:
        print(f"  {total / steps:9.1f} us {count / steps:6.1f}x  {name[:150]}", flush=True)
    copies = {name: count / steps for name, (_, count) in kernels.items() if name.startswith(("Memcpy", "Memset"))}
    print(f"  copies and fills a step: {copies}; {len(kernels)} distinct names", flush=True)
    print(f"  gaps inside a step (profiled): {sum(t for t, _ in gaps.values()) / steps:.1f} us a step in all "
          "(the rest of 'between kernels': the graph's launch, before its first kernel and after its last); "
          "by the kernels either side: us a step, times a step, mean us", flush=True)
    for key, (total, count) in sorted(gaps.items(), key=lambda kv: -kv[1][0])[:14]:
        print(f"  {total / steps:9.1f} us {count / steps:6.1f}x {total / count:6.2f}  {key}", flush=True)


@torch.no_grad()
def main() -> None:
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    keep = float(sys.argv[2]) if len(sys.argv) > 2 else 0.25
    lengths = [int(x) for x in sys.argv[3:]] or [32768, 131072]
    device, dtype = torch.device("cuda"), torch.bfloat16
    if DUMP:
        os.makedirs(DUMP, exist_ok=True)
        plain = torch.cuda.CUDAGraph

        def debug_graph(*args, **kwargs):
            graph = plain(*args, keep_graph=True, **kwargs)
            graph.enable_debug_mode()
            return graph

        torch.cuda.CUDAGraph = debug_graph
    model = llama_8b_shaped(layers, device, dtype, False, max(lengths) + 512)
    model.set_attn_implementation(fastest_dense_sdpa())
    config = TCAConfig(block_size=128, window=4096)
    step_ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    for length in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
        pos = torch.full((1, 1), length, device=device)
        cache_position = torch.full((1,), length, device=device)

        def step(fn, cache, pos=pos, cache_position=cache_position):
            return fn(input_ids=step_ids, position_ids=pos, cache_position=cache_position, use_cache=True,
                      logits_to_keep=1, **cache_kwargs(model, cache)).logits

        from transformers import DynamicCache

        dynamic = DynamicCache(config=model.config)
        model(ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, dynamic))
        dense = one_step_dense(dynamic)
        torch._dynamo.reset()
        compiled = model if EAGER else torch.compile(model)
        dense_graphs = captured_decode(lambda i, c=compiled, d=dense: step(c, d), dense)
        # Both steps are timed before either is profiled: after a profiler session in the process,
        # a graph's launch took the host far longer (BENCHMARKS.md, 2026-12-05 twelfth session).
        dense_timing = timings(dense_graphs, dense, False, STEPS)
        torch._dynamo.reset()
        apply(model, budgets=HeadBudgets.uniform(layers, 8, keep, config))
        cache = TCACache(model, reserve_tokens=4 * STEPS + 64)
        cache.set_append(APPEND)
        model(ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        compiled = model if EAGER else tca_compile(model)
        variants = (None,) if ONE_GRAPH else (False, True)
        graphs = captured_decode(lambda i, c=compiled, k=cache: step(c, k), cache, variants=variants)
        tca_timing = timings(graphs, cache, True, STEPS)
        dense_label = f"{length} dense {MODE}, {layers} layers"
        label = (f"{length} TCA {keep:.0%} + 4096 {MODE}, {'one graph' if ONE_GRAPH else 'two graphs'}, "
                 f"append {APPEND}, {layers} layers")
        if PROFILE:
            replay_stats(dense_graphs, dense, False, dense_label, STEPS, dense_timing)
            replay_stats(graphs, cache, True, label, STEPS, tca_timing)
        else:
            print(timing_line(dense_label, dense_timing), flush=True)
            print(timing_line(label, tca_timing), flush=True)
        if DUMP:
            dumped(dense_graphs, f"dense-{length}")
            dumped(graphs, f"tca-{length}")
        del graphs, cache, dense_graphs, dense, dynamic
        remove(model)
        torch._dynamo.reset()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
