"""Benchmark: TCA prefill/decode attention vs the fastest dense kernels.

    python -m tca_flex.bench                 # CUDA: LLaMA-3.1-8B attention shapes, 8K..128K
    python -m tca_flex.bench --smoke         # tiny CPU shapes: the same code paths, for CI
    python -m tca_flex.bench --phases stream # per-request latency over distinct lengths (bench_stream.py)
    python -m tca_flex.bench --phases chunks # chunked prefill and conversations (bench_chunks.py)
    python -m tca_flex.bench --phases batch  # left-padded mixed-length batches (bench_batch.py)
    python -m tca_flex.bench --phases generate  # plain model.generate, eager (bench_generate.py)
    python -m tca_flex.bench --phases generate_stream  # requests through generate (bench_generate_stream.py)

Every TCA variant is checked against SDPA with an explicit mask (on the last
queries) before it is timed. Results go to ``benchmarks/results/<device>-<date>.json``
and a table on stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .attention import tca_prefill_attention
from .bench_models import (
    captured_decode,
    dense_kv_bytes,
    fastest_dense_sdpa,
    llama_8b_shaped,
    one_step_dense,
    static_copy,
)
from .bench_stream import speed_words
from .budgets import HeadBudgets
from .cli_args import float_in, int_at_least
from .compile import flex, kernel_options_for, prefill_backend, prefill_kernel_options
from .config import TCAConfig
from .hfcompat import cache_kwargs
from .masks import KERNEL_BLOCK, causal_block_mask, tca_block_mask, whole_tiles
from .reference import reference_mask
from .selection import (
    block_budgets,
    budget_ladder,
    global_region_length,
    importance,
    keep_top_in_blocks,
    pack_positions,
    redundancy_score,
    select,
    to_blocks,
)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int = 2, reps: int = 7) -> float:
    """Median milliseconds of ``fn`` (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def back_to_back(fn: Callable[[], Any], device: torch.device, warmup: int = 2, reps: int = 10) -> float:
    """Mean milliseconds of ``fn`` called ``reps`` times without waiting in between: as a layer
    runs inside a model's forward, where the host queues the next calls while the GPU works.
    ``timed`` waits for the GPU after every call, so it also counts the host time before the
    first kernel starts (CUDA events; ``timed`` on CPU)."""
    if device.type != "cuda":
        return timed(fn, device, warmup, reps)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def captured_graph(fn: Callable[[], Any]) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph, after three warm-up calls on a side stream (they load its
    kernels, which a capture must not)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_timed(fn: Callable[[], Any], device: torch.device, reps: int = 50) -> float:
    """Median microseconds of one ``fn`` call replayed from a CUDA graph (eager timing on CPU)."""
    if device.type != "cuda":
        return timed(fn, device) * 1e3
    graph = captured_graph(fn)
    inner = 20
    return timed(lambda: [graph.replay() for _ in range(inner)], device, reps=reps // 5 or 1) * 1e3 / inner


def stage_times(q, k, v, cdf, config: TCAConfig, scale: float, device, kernel_options) -> dict[str, float]:
    """Milliseconds of each TCA prefill stage run on its own (same code as ``select``)."""
    length, d = q.shape[2], q.shape[3]
    hq = q.shape[1]
    glen = global_region_length(length, config.window)
    s = importance(q, k, scale)
    s_blocks = to_blocks(s[..., :glen], config.block_size, 0.0)
    scores = redundancy_score(s_blocks, config.alpha)
    ladder = budget_ladder(cdf, s_blocks.shape[-2])
    budgets = block_budgets(scores, ladder, glen, config.block_size)
    ranked = to_blocks(s[..., :glen], config.block_size, float("-inf"))
    capacity = whole_tiles(glen)
    keep = keep_top_in_blocks(ranked, budgets).flatten(-2)[..., :glen]
    positions, _ = pack_positions(keep, capacity)
    idx = positions.clamp(max=length - 1).unsqueeze(-1).expand(-1, -1, -1, d)

    def gather():
        return torch.cat([k.gather(2, idx), k], 2), torch.cat([v.gather(2, idx), v], 2)

    k_all, v_all = gather()
    bm = tca_block_mask(positions, length, config.window, hq)

    def redundancy():
        sb = to_blocks(s[..., :glen], config.block_size, 0.0)
        return block_budgets(redundancy_score(sb, config.alpha), budget_ladder(cdf, sb.shape[-2]), glen,
                             config.block_size)

    return {
        "importance": timed(lambda: importance(q, k, scale), device),
        "redundancy_budgets": timed(redundancy, device),
        "top_t": timed(lambda: keep_top_in_blocks(to_blocks(s[..., :glen], config.block_size, float("-inf")),
                                                  budgets), device),
        "pack": timed(lambda: pack_positions(keep, capacity), device) + timed(gather, device),
        "mask_build": timed(lambda: tca_block_mask(positions, length, config.window, hq), device),
        "attention": timed(lambda: flex(q, k_all, v_all, bm, scale=scale, enable_gqa=True, dynamic=False,
                                        kernel_options=kernel_options), device),
        "computed_blocks": int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()),
    }


def check_against_sdpa(q, k, v, cdf, config: TCAConfig, scale: float, out: torch.Tensor,
                       rows: int = 256) -> float:
    """Relative error of TCA's last ``rows`` queries vs SDPA with the explicit TCA mask."""
    length = q.shape[2]
    sel = select(q, k, cdf, config.selection, scaling=scale)
    queries = torch.arange(length - rows, length, device=q.device)
    mask = reference_mask(sel.keep_mask(length), config.window, q.shape[1], queries)
    g = q.shape[1] // k.shape[1]
    ref = F.scaled_dot_product_attention(q[:, :, length - rows:].float(), k.float().repeat_interleave(g, 1),
                                         v.float().repeat_interleave(g, 1), attn_mask=mask, scale=scale)
    got = out[:, :, length - rows:].float()
    return float((got - ref).norm() / ref.norm())


def prefill_rows(length: int, shape: dict[str, int], budgets: list[tuple[str, float]], window: int,
                 device: torch.device, dtype: torch.dtype, kernel_options, backend: str = "triton",
                 dense_rows: bool = True) -> list[dict[str, Any]]:
    """Prefill attention rows at ``length``: dense SDPA (if ``dense_rows``), causal flex and TCA on
    FlexAttention's ``backend`` (``kernel_options``; methods get a ``[flash]`` suffix on FLASH)."""
    tag = "" if backend == "triton" else f"[{backend}]"
    hq, hkv, d = shape["hq"], shape["hkv"], shape["d"]
    gen = torch.Generator(device=device).manual_seed(length)
    q, k, v = (torch.randn(1, h, length, d, device=device, dtype=dtype, generator=gen) for h in (hq, hkv, hkv))
    scale = d ** -0.5
    causal_flops = 4 * hq * d * length * (length + 1) / 2
    rows: list[dict[str, Any]] = []

    def add(name: str, ms: float, flops: float, **extra: Any) -> None:
        rows.append({"phase": "prefill", "length": length, "method": name, "ms": ms,
                     "tflops": flops / ms / 1e9, "backend": backend, **extra})

    if dense_rows:
        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        add("sdpa_default", timed(sdpa, device), causal_flops, ms_back_to_back=back_to_back(sdpa, device))
    if device.type == "cuda" and dense_rows:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            add("sdpa_flash2", timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                            enable_gqa=True), device),
                causal_flops)
    cbm = causal_block_mask(length, device)
    add("flex_causal" + tag, timed(lambda: flex(q, k, v, cbm, scale=scale, enable_gqa=True, dynamic=False,
                                          kernel_options=kernel_options), device), causal_flops)
    for name, frac in budgets:
        config = TCAConfig(block_size=128, window=window)
        cdf = HeadBudgets.uniform(1, hkv, frac, config).cdf(0).to(device)
        out = tca_prefill_attention(q, k, v, cdf, config, scale, kernel_options=kernel_options)
        err = check_against_sdpa(q, k, v, cdf, config, scale, out)
        if not err < 2e-2:
            raise AssertionError(f"TCA {name} at L={length} differs from masked SDPA: rel err {err:.3g}")
        def tca(c=cdf, cf=config):
            return tca_prefill_attention(q, k, v, c, cf, scale, kernel_options=kernel_options)
        total = timed(tca, device)
        pipelined = back_to_back(tca, device)
        stages = stage_times(q, k, v, cdf, config, scale, device, kernel_options)
        blocks = stages.pop("computed_blocks")
        flops = blocks * KERNEL_BLOCK * KERNEL_BLOCK * d * 4
        overhead = total - stages["attention"]
        add(name + tag, total, causal_flops, rel_err=err, stages_ms=stages,
            attention_tflops=flops / stages["attention"] / 1e9,
            computed_fraction=blocks / (hq * (-(-length // 128)) * (-(-length // 128) + 1) / 2),
            overhead_ms=overhead, ms_back_to_back=pipelined)
    return rows


def build_cache_layer(length: int, hq: int, hkv: int, d: int, fractions: list[float], config: TCAConfig,
                      dtype: torch.dtype, device: torch.device, reserve_tokens: int = 0, backend: str = "auto"):
    """A ``TCACacheLayer`` after a synthetic prefill: random K/V, the real selection, and
    KV head ``i`` keeping ``fractions[i]`` of its global region."""
    from .cache import TCACacheLayer

    probs = torch.cat([HeadBudgets.uniform(1, 1, f, config).probs for f in fractions], dim=1)
    budgets = HeadBudgets(probs=probs, config=config)
    keep = budgets.keep_per_block()[0].tolist()
    q = torch.randn(1, hq, length, d, dtype=dtype, device=device)
    k = torch.randn(1, hkv, length, d, dtype=dtype, device=device)
    sel = select(q, k, budgets.cdf(0).to(device), config.selection, scaling=d**-0.5)
    layer = TCACacheLayer(config, keep, reserve_tokens=reserve_tokens, backend=backend)
    layer.update(k, k)
    layer.finish_prefill(k, k, sel)
    return layer


def kernel_launch(length: int, target: float, device: torch.device,
                  dtype: torch.dtype = torch.bfloat16, token: bool = False) -> Callable[[], Any]:
    """``triton_decode.launch`` over a ``build_cache_layer`` of LLaMA-3.1-8B attention shapes (32 query
    heads, 8 KV heads, head dim 128, block 128, window 4096) keeping ``target`` of ``length`` tokens,
    with the module's settings at call time, as a no-argument callable (what the GPU scripts time).
    ``token``: each call also appends a new token through the merge, as a decode step does (for
    timing only: with no compression between calls, the ring's slots are reused while live)."""
    from . import triton_decode

    layer = build_cache_layer(length, 32, 8, 128, head_fractions(target, length, 4096, 8),
                              TCAConfig(block_size=128, window=4096), dtype, device)
    q = torch.randn(1, 32, 128, device=device, dtype=dtype)
    new = (torch.randn(1, 8, 128, device=device, dtype=dtype), torch.randn(1, 8, 128, device=device, dtype=dtype),
           layer.pos) if token else None
    seg, live = layer.segments, (layer.var_len, layer.next_pos, layer.base, layer.ring)
    return lambda: triton_decode.launch(q, layer.k_buf, layer.v_buf, layer.owner, seg.start, seg.length,
                                        seg.max_length, 128 ** -0.5, total_slots=seg.total_length, live=live,
                                        token=new)


# Per-KV-head keep fractions of the global region, as unequal as calibrated heads are;
# scaled so the whole cache keeps a given fraction.
HEAD_SPREAD = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.98]


def head_fractions(target: float, length: int, window: int, hkv: int) -> list[float]:
    """Per-head global keep fractions whose cache keeps ``target`` of ``length`` tokens overall."""
    spread = HEAD_SPREAD if hkv == len(HEAD_SPREAD) else [1.0] * hkv
    glob = max(0.0, (target * length - window) / max(1, length - window))
    mean = sum(spread) / len(spread)
    return [min(1.0, glob * f / mean) for f in spread]


def compression_rows(layer, q: torch.Tensor, new: torch.Tensor, scale: float, device, length: int,
                     tag: str) -> list[dict]:
    """Per-layer block compression alone, replayed from a CUDA graph (us): the Triton kernel on a step
    where a block leaves and on one where none does (it exits at once), and the tensor form (branch-free:
    the same work on every step). The kernel's result is checked against the tensor form's first.

    Runs eager steps on ``layer`` until a block leaves (host counters stay exact: call it before any
    graph replay of ``layer``)."""
    from .decode import decode_attention, triton_supported

    # Two appends below are not followed by decode_step, which appends a deferred token ("auto").
    layer.append_kernel = "math"
    while not layer.block_leaves_at(layer.get_seq_length()):
        layer.update(new, new)
        layer.decode_step(q, scale)
    layer.append_only(new, new)  # this step's append makes a whole block leave the window
    _, lse = decode_attention(q, layer.k_buf, layer.v_buf, layer.owner, group=q.shape[1] // layer.num_heads,
                              scale=scale, backend=layer.backend, segments=layer.segments)
    saved = {name: getattr(layer, name).clone() for name in ("owner", "var_len", "ncs")}

    def restore():  # back to "a block leaves now": every replay compresses the same block again
        for name, value in saved.items():
            getattr(layer, name).copy_(value)

    def leaving(kernel: str) -> float:
        layer.compression = kernel
        return graph_timed(lambda: (restore(), layer.compress(q, lse, scale)), device) - graph_timed(restore, device)

    def row(method: str, us: float, **extra: Any) -> dict:
        return {"phase": "decode", "length": length, "method": f"{method}@{tag}", "us": us, **extra}

    rows = [row("compress_math", leaving("math"))]
    if triton_supported(q):
        method = "compress_fused_leaving"
        try:  # recorded, not fatal: the other rows still stand
            restore()
            check = compare_compressions(layer, q, lse, scale)
            rows.append(row(method, leaving("triton"), **check))
            method = "compress_fused_idle"
            restore()
            layer.compress(q, lse, scale)
            layer.append_only(new, new)  # a step where no block leaves
            rows.append(row(method, graph_timed(lambda: layer.compress(q, lse, scale), device)))
        except Exception as err:
            rows.append(row(method, float("nan"), error=repr(err)[-1500:]))
    layer.compression = layer.append_kernel = "auto"
    return rows


def compare_compressions(layer, q: torch.Tensor, lse: torch.Tensor, scale: float) -> dict[str, int]:
    """Compress copies of ``layer`` with the Triton kernel and with the tensor form; the number of
    (row, KV head) pairs whose kept set differs (a float tie at a block's cut may flip one; more
    is a bug: raises)."""
    import copy

    fused, ref = copy.deepcopy(layer), copy.deepcopy(layer)
    fused.compression, ref.compression = "triton", "math"
    fused.compress(q, lse, scale)
    ref.compress(q, lse, scale)
    if torch.equal(ref.owner, layer.owner):
        raise AssertionError("compare_compressions needs a step where a block leaves")
    differ = sum(not torch.equal(fused.kept_positions(b, h), ref.kept_positions(b, h))
                 for b in range(layer.batch_size) for h in range(layer.num_heads))
    if differ > 1 or not torch.equal(fused.var_len, ref.var_len) or not torch.equal(fused.ncs, ref.ncs):
        raise AssertionError(f"fused compression differs from the tensor form: {differ} heads' kept sets, "
                             f"var_len {fused.var_len.tolist()} vs {ref.var_len.tolist()}")
    return {"heads_differing_from_math": differ}


def decode_rows(length: int, shape: dict[str, int], targets: list[float], device, dtype,
                window: int, backends: tuple[str, ...] = ("triton", "flex"), compile_step: bool = False) -> list[dict]:
    """Per-layer decode: SDPA over the full cache, SDPA over a compact cache of the same
    kept size (the ideal), and TCA's head-packed cache with each decode kernel; the block
    compression alone (``compression_rows``); and the whole TCA step (append + attention +
    compression) replayed from a CUDA graph with the fused compression kernel (``tca_step``),
    the tensor form (``tca_step_math``) and none (``tca_step_skip``: the graph a two-graph decode
    replays on the steps where no block leaves), eager and (``compile_step``, CUDA only: each
    compile takes tens of seconds) compiled; ``tca_step_append_math``: ``tca_step`` with the append's
    tensor form instead of its fused kernel."""
    from .decode import LiveRanges, decode_attention, triton_supported

    hq, hkv, d = shape["hq"], shape["hkv"], shape["d"]
    gen = torch.Generator(device=device).manual_seed(length + 1)
    q = torch.randn(1, hq, 1, d, device=device, dtype=dtype, generator=gen)
    bytes_per_token = 2 * d * torch.finfo(dtype).bits // 8  # per KV head
    scale = d ** -0.5

    def sdpa_row(name: str, per_head: int) -> dict:
        # Distinct K and V: with one tensor for both, the second read hits cache and SDPA looks 2x faster.
        k, v = (torch.randn(1, hkv, per_head, d, device=device, dtype=dtype, generator=gen) for _ in range(2))
        us = graph_timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), device)
        return {"phase": "decode", "length": length, "method": name, "us": us,
                "kv_bytes": hkv * per_head * bytes_per_token}

    rows = [sdpa_row("sdpa_full", length)]
    config = TCAConfig(block_size=128 if length > 4 * 128 else 32, window=min(window, length // 2))
    backends = list(backends) if device.type == "cuda" and triton_supported(q) else ["auto"]
    for target in targets:
        # Room for every replay below (graph_timed replays ~250 steps per row; replays cannot grow).
        layer = build_cache_layer(length, hq, hkv, d, head_fractions(target, length, config.window, hkv),
                                  config, dtype, device, reserve_tokens=8 * config.block_size + 2048)
        mem = layer.memory()
        tag = f"{round(100 * target)}%"  # by target, so a method's rows line up across lengths
        rows.append({**sdpa_row(f"sdpa_compact@{tag}", mem.kept_tokens // hkv), "kept_fraction": mem.kept_fraction})
        for backend in backends:
            us = graph_timed(lambda b=backend, c=layer: decode_attention(
                q, c.k_buf, c.v_buf, c.owner, group=hq // hkv, scale=scale, backend=b, segments=c.segments,
                live=LiveRanges(c.var_len, c.next_pos, c.base, c.ring)), device)
            rows.append({"phase": "decode", "length": length, "method": f"tca_{backend}@{tag}", "us": us,
                         "kv_bytes": mem.bytes_used, "kept_tokens": mem.kept_tokens,
                         "kept_fraction": mem.kept_fraction, "bytes_over_kept": mem.overhead})
        new = torch.randn(1, hkv, 1, d, device=device, dtype=dtype, generator=gen)
        rows += compression_rows(layer, q, new, scale, device, length, tag)

        def step(layer=layer, new=new):
            layer.update(new, new)
            return layer.decode_step(q, scale)

        def step_with(kernel: str, leaves: bool, append: str, layer=layer, step=step) -> float:
            # Replays do not run the host's per-step decision: leaves=True keeps the compression in the
            # graph (the device decides whether a block leaves), False leaves it out.
            layer.compression, layer.assume_leaves, layer.append_kernel = kernel, leaves, append
            try:
                return graph_timed(step, device)
            finally:
                layer.compression, layer.assume_leaves, layer.append_kernel = "auto", None, "auto"

        for method, kernel, leaves, append in (("tca_step", "auto", True, "auto"),
                                               ("tca_step_append_kernel", "auto", True, "triton"),
                                               ("tca_step_math", "math", True, "auto"),
                                               ("tca_step_append_math", "auto", True, "math"),
                                               ("tca_step_skip", "auto", False, "auto")):
            if append == "triton" and not triton_supported(q):  # the append's own kernel cannot run here
                continue
            rows.append({"phase": "decode", "length": length, "method": f"{method}@{tag}",
                         "us": step_with(kernel, leaves, append), "kv_bytes": mem.bytes_used})
        if compile_step and device.type == "cuda":
            # Compiled, the step's small ops (append, importance, top-t, scatters) fuse into a few kernels.
            try:
                us = graph_timed(torch.compile(step, dynamic=False), device)
                rows.append({"phase": "decode", "length": length, "method": f"tca_step_compiled@{tag}", "us": us,
                             "kv_bytes": mem.bytes_used})
            except Exception as err:  # recorded, not fatal: the other rows still stand
                rows.append({"phase": "decode", "length": length, "method": f"tca_step_compiled@{tag}",
                             "us": float("nan"), "error": repr(err)[-1500:]})
    return rows


def tpot(model, cache, length: int, device: torch.device, steps: int, two_graphs: bool = False,
         step_fn: Callable[..., Any] | None = None, sync_steps: bool = False) -> dict[str, Any]:
    """Milliseconds per decode step over ``steps`` consecutive steps of ``model`` over ``cache``,
    each replayed from a CUDA graph: static inputs (token 0 at position ``length``), no host sync.

    With a ``TCACache``, one graph holds the block compression, which decides on the device whether a
    block leaves (``two_graphs=False``), or two graphs are captured, with and without it, and the host
    replays the one ``TCACache.block_leaves_next()`` names (``two_graphs=True``). Over ``b`` steps
    exactly one block leaves, so ``steps = b`` gives the mean a long generation sees.

    On CPU there are no graphs: each step runs eagerly inside ``graph_capture`` and is then counted
    by ``replayed``, which is what a replay does to the cache (CI covers the bookkeeping).

    ``step_fn`` (default ``model``) is what each step calls, e.g. ``torch.compile(model)``: its
    compiles happen in the warm-up steps before the capture, and count in ``capture_s``.

    ``sync_steps`` (CUDA): then ``steps`` more replays, each started after the previous one has
    finished, as in a loop that reads a result every step (``generate``'s stopping check): the
    GPU waits for the host to launch each graph, which the queued steps hide. A TCA cache needs
    ``steps`` more tokens of ``reserve_tokens`` for them.

    Returns:
        ``ms`` (mean), ``ms_median``, ``ms_leaving`` (mean of the steps where a block left; None if
        none did or the cache is dense), ``steps``, ``capture_s`` (seconds of warm-up and capture
        on CUDA, compiles included; None on CPU) and ``ms_synced`` (mean of the synchronised
        steps; None without ``sync_steps`` or on CPU, where every step is synchronous).
    """
    import contextlib

    from .cache import TCACache

    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.full((1, 1), length, device=device)
    cache_position = torch.full((1,), length, device=device)
    tca = isinstance(cache, TCACache)
    run = model if step_fn is None else step_fn
    capture_s = None

    def step():
        return run(input_ids=ids, position_ids=pos, cache_position=cache_position, use_cache=True,
                     logits_to_keep=1, **cache_kwargs(model, cache)).logits

    def choice() -> bool | None:
        return cache.block_leaves_next() if two_graphs else None

    def captured(compress: bool | None):
        return cache.graph_capture(compress) if tca else contextlib.nullcontext()

    times, leaving, synced = [], [], None
    if device.type != "cuda":
        for _ in range(steps):
            leaving.append(tca and cache.block_leaves_next())
            t0 = time.perf_counter()
            with captured(choice()):
                step()
            if tca:
                cache.replayed()
            times.append((time.perf_counter() - t0) * 1e3)
    else:
        t0 = time.perf_counter()
        graphs = captured_decode(lambda i: step(), cache, variants=(False, True) if two_graphs else (None,))
        torch.cuda.synchronize()
        capture_s = time.perf_counter() - t0

        def timed_steps(sync: bool) -> list[float]:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(steps)]
            for start, end in events:
                if tca and cache.replayable_steps() < 1:
                    raise RuntimeError("tpot: the TCACache would grow during replays; raise reserve_tokens")
                if not sync:
                    leaving.append(tca and cache.block_leaves_next())
                graph = graphs[choice()]
                start.record()
                graph.replay()
                end.record()
                if sync:
                    end.synchronize()
                if tca:
                    cache.replayed()
            torch.cuda.synchronize()
            return [start.elapsed_time(end) for start, end in events]

        times = timed_steps(sync=False)
        synced = timed_steps(sync=True) if sync_steps else None
        del graphs
    at_leaving = [t for t, leaves in zip(times, leaving, strict=True) if leaves]
    return {"ms": statistics.fmean(times), "ms_median": statistics.median(times),
            "ms_leaving": statistics.fmean(at_leaving) if at_leaving else None, "steps": steps,
            "capture_s": capture_s, "ms_synced": statistics.fmean(synced) if synced else None}


# TPOT variants of the TCA cache: (compression kernel, two graphs). "fused-graph": one graph whose Triton
# kernel exits on the device where no block leaves; "two-graph": the host replays a graph without
# compression on those steps and one with the tensor-form compression on the others; "two-graph+fused":
# the same with the kernel; "math-graph": one graph with the branch-free tensor form on every step.
TPOT_VARIANTS = {"fused-graph": ("auto", False), "two-graph": ("math", True), "two-graph+fused": ("auto", True),
                 "math-graph": ("math", False)}


def compiled_tpot(model, cache, length: int, device: torch.device, steps: int, backend: str,
                  two_graphs: bool = False, sync_steps: bool = False) -> dict[str, Any]:
    """``tpot`` of the model compiled as a user would, from a clean dynamo state: the previous
    method's graphs (another cache, another attention) are dropped, so the warm-up's compiles are
    this method's own. A model prepared by ``apply`` goes through ``tca_flex.compile`` (its decode
    step compiles once per captured variant), a dense one through ``torch.compile``; ``backend``
    for both."""
    from .integration import compile as tca_compile
    from .integration import is_applied

    torch._dynamo.reset()
    compile_fn = tca_compile if is_applied(model) else torch.compile
    try:
        return tpot(model, cache, length, device, steps, two_graphs, step_fn=compile_fn(model, backend=backend),
                    sync_steps=sync_steps)
    finally:
        torch._dynamo.reset()


@torch.no_grad()
def e2e_rows(lengths: list[int], num_layers: int, budgets: list[tuple[str, float]], window: int, device, dtype,
             smoke: bool, compile_model: bool = False, static_baseline: bool = True, ttft_reps: int = 3,
             tpot_steps: int | None = None, variants: tuple[str, ...] = tuple(TPOT_VARIANTS),
             compile_tpot: str | None = None,
             compiled_variants: tuple[str, ...] = ("fused-graph",)) -> list[dict[str, Any]]:
    """A LLaMA-3.1-8B-shaped model (random weights, ``num_layers`` layers), dense vs TCA: time to first
    token (dense: cuDNN causal SDPA), and time per output token over ``tpot_steps`` steps (default one
    block: exactly one compression) replayed from CUDA graphs: dense over a preallocated cache with
    maskless SDPA (and transformers' ``StaticCache`` with ``static_baseline``), TCA over ``TCACache`` in
    each of ``variants`` (keys of ``TPOT_VARIANTS``). Rows carry ``layers`` and the KV bytes.

    ``compile_tpot`` (a ``torch.compile`` backend, e.g. ``"inductor"``) adds the path users run:
    ``torch.compile(model)`` for dense, ``tca_flex.compile(model)`` after ``apply`` for each budget
    in each of ``compiled_variants``, each replayed from CUDA graphs; ``capture_s`` holds its
    compile time, and ``ms_synced`` the mean step when each starts after the previous one ended
    (``tpot``'s ``sync_steps``)."""
    from transformers import DynamicCache

    from .cache import TCACache
    from .decode import triton_supported
    from .integration import apply, remove

    model = llama_8b_shaped(num_layers, device, dtype, smoke, max(lengths) + 512)
    cfg = model.config
    model.set_attn_implementation(fastest_dense_sdpa())
    config = TCAConfig(block_size=128 if not smoke else 32, window=window)
    steps = tpot_steps or config.block_size
    hkv, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    fused = device.type == "cuda" and triton_supported(torch.empty(1, 1, 1, d, device=device, dtype=dtype))
    rows = []

    def add(phase: str, length: int, method: str, ms: float, **extra: Any) -> None:
        rows.append({"phase": phase, "length": length, "method": method, "ms": ms, "layers": num_layers,
                     **extra})
        if not smoke:  # a full-depth run takes minutes: a run cut short still shows its rows
            print("e2e row:", json.dumps(rows[-1]), flush=True)

    def free() -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for length in lengths:
        ids = torch.randint(0, cfg.vocab_size, (1, length), device=device)

        def forward(fn=model, x=ids):
            return fn(x, logits_to_keep=1)

        # Each method's first prefill fills the cache its TPOT rows decode over and warms TTFT up
        # (compiles, cuDNN plans), so TTFT takes ``ttft_reps`` more prefills only.
        dynamic = DynamicCache(config=cfg)
        model(ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, dynamic))
        add("ttft", length, "dense_sdpa", timed(forward, device, warmup=0, reps=ttft_reps))
        dense = one_step_dense(dynamic)
        dense_bytes = dense_kv_bytes(cfg, length + 1, dtype)
        add("tpot", length, "dense_tpot", cache="preallocated, maskless SDPA", kv_bytes=dense_bytes,
            **tpot(model, dense, length, device, steps))
        if static_baseline:
            add("tpot", length, "dense_static_tpot", cache="StaticCache", kv_bytes=dense_bytes,
                **tpot(model, static_copy(model, dense, length, device), length, device, steps))
        if compile_tpot:
            add("tpot", length, "dense_tpot compiled", cache="preallocated, maskless SDPA", kv_bytes=dense_bytes,
                backend=compile_tpot,
                **compiled_tpot(model, dense, length, device, steps, compile_tpot, sync_steps=True))
        del dynamic, dense
        free()
        for label, keep in budgets:
            apply(model, budgets=HeadBudgets.uniform(num_layers, hkv, keep, config))
            # Room for every variant's warm-up and replays, the compiled ones' synchronised replays
            # too (a replay cannot grow the cache).
            compiled_runs = len(compiled_variants) if compile_tpot else 0
            reserve = (len(variants) + compiled_runs) * (steps + 8) + compiled_runs * steps
            cache = TCACache(model, reserve_tokens=reserve)
            model(ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
            add("ttft", length, label, timed(forward, device, warmup=0, reps=ttft_reps))
            report = cache.memory_report().total
            runs = [(variant, *TPOT_VARIANTS[variant], None) for variant in variants]
            runs += [(f"{variant} compiled", *TPOT_VARIANTS[variant], compile_tpot)
                     for variant in (compiled_variants if compile_tpot else ())]
            for variant, kernel, two_graphs, backend in runs:
                cache.set_compression(kernel)
                try:
                    timing = (compiled_tpot(model, cache, length, device, steps, backend, two_graphs, sync_steps=True)
                              if backend
                              else tpot(model, cache, length, device, steps, two_graphs))
                except Exception as err:  # recorded, not fatal: the other rows still stand
                    timing = {"ms": float("nan"), "error": repr(err)[-1500:]}
                add("tpot", length, f"{label} TCACache {variant}", kv_bytes=report.bytes_used,
                    kept_fraction=report.kept_fraction, bytes_fraction=report.bytes_fraction,
                    compression="triton" if fused and kernel == "auto" else "math", two_graphs=two_graphs,
                    **({"backend": backend} if backend else {}), **timing)
            del cache
            free()
            if compile_model:
                eager_logits = model(ids, logits_to_keep=1).logits
                compiled = torch.compile(model)
                logits = compiled(ids, logits_to_keep=1).logits
                err = float((logits.float() - eager_logits.float()).abs().max())
                ms = timed(lambda fn=compiled, x=ids: fn(x, logits_to_keep=1), device, warmup=1, reps=ttft_reps)
                add("ttft", length, f"{label} compiled", ms, max_abs_logit_diff_vs_eager=err)
            remove(model)
            free()
    return rows


def triton_decode_settings() -> dict[str, int | str] | None:
    from . import decode

    kernels = decode.triton_decode
    if kernels is None:
        return None
    split = kernels.SCHEDULE == "split"
    return {"schedule": kernels.SCHEDULE, "block": kernels.BLOCK_N,
            "programs": kernels.TARGET_PROGRAMS if split else kernels.BALANCED_PROGRAMS,
            "num_warps": kernels.NUM_WARPS, "num_stages": kernels.NUM_STAGES}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return f"cpu-{platform.machine()}"


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'phase':<8}{'L':>8}  {'method':<36}{'time':>12}{'vs dense':>15}{'TFLOP/s':>9}  notes")
    base: dict[tuple[str, int], float] = {}
    base_b2b: dict[int, float] = {}
    for r in rows:
        t = r.get("ms", r.get("us"))
        unit = "ms" if "ms" in r else "us"
        # compiled rows against compiled dense; each conversation turn against its own dense turn
        group = "compiled" if r["method"].endswith(" compiled") else ""
        key = (r["phase"], r["length"], r["method"].split(" ")[0] if r["method"].startswith("turn") else group)
        if r["method"] in ("sdpa_default", "sdpa_full", "dense_sdpa", "dense_tpot", "dense_tpot compiled",
                           "dense_chunked") or r["method"].endswith(" dense_append"):
            base[key] = t
            if "ms_back_to_back" in r:
                base_b2b[r["length"]] = r["ms_back_to_back"]
        speed = base.get(key, t) / t
        notes = ""
        if "stages_ms" in r:
            notes = (f"attn {r['stages_ms']['attention']:.2f} ms @ {r['attention_tflops']:.0f} TF/s, "
                     f"overhead {r['overhead_ms']:.2f} ms, computed {100 * r['computed_fraction']:.0f}%")
            if r["length"] in base_b2b and "ms_back_to_back" in r:
                notes += (f"; back to back {r['ms_back_to_back']:.2f} ms "
                          f"({base_b2b[r['length']] / r['ms_back_to_back']:.2f}x)")
        if "max_abs_logit_diff_vs_eager" in r:
            notes = f"max |logit - eager TCA| {r['max_abs_logit_diff_vs_eager']:.3g}"
        if "kv_bytes" in r:
            notes = f"KV {r['kv_bytes'] / 2**20:.0f} MiB"
        if "kept_fraction" in r:
            notes += f" kept {100 * r['kept_fraction']:.0f}%"
        if r.get("ms_leaving") is not None:
            notes += f", {r['ms_leaving']:.3f} ms where a block leaves"
        if r.get("ms_synced") is not None:
            notes += f", {r['ms_synced']:.3f} ms a step synchronised"
        if r.get("backend") and r.get("capture_s") is not None:
            notes += f"; compile + capture {r['capture_s']:.1f} s"
        if "heads_differing_from_math" in r:
            notes += f" ({r['heads_differing_from_math']} heads differ from math)"
        if "error" in r:
            notes = f"failed: {r['error'][:60]}"
        tf = f"{r['tflops']:.0f}" if "tflops" in r else ""
        print(f"{r['phase']:<8}{r['length']:>8}  {r['method']:<36}{t:>9.3f} {unit}{speed_words(speed):>15}{tf:>9}  "
              f"{notes}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    # The fixed-shape baselines (flex causal, dynamic=False) compile once per length: a
    # scoped limit, so importing or running tca_flex never changes the process's.
    with torch._dynamo.config.patch(recompile_limit=64):
        return _main(argv)


def _main(argv: list[str] | None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes (CI)")
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--no-tma", action="store_true",
                        help="FlexAttention defaults instead of USE_TMA (the default on Hopper)")
    parser.add_argument("--prefill-backends", nargs="+", choices=["triton", "flash"], default=None,
                        help="FlexAttention backends of the prefill phase (default: triton, and flash where "
                             "FlashAttention-4 is installed on a Hopper GPU)")
    parser.add_argument("--e2e-layers", type=int, default=2,
                        help="layers of the 8B-shaped model (0: skip the e2e phase; generate, chunks and batch "
                             "take at least 1)")
    parser.add_argument("--compile-model", action="store_true", help="also time torch.compile(model) after apply")
    parser.add_argument("--e2e-static", action=argparse.BooleanOptionalAction, default=True,
                        help="also time dense decode over transformers' StaticCache (slow at full depth)")
    parser.add_argument("--ttft-reps", type=int, default=3, help="timed prefills per e2e TTFT row")
    parser.add_argument("--e2e-keep", type=float_in(0.0, 1.0), nargs="+", default=[0.25, 0.10],
                        help="e2e: uniform keep fractions of the global region (each row keeps that + the window)")
    parser.add_argument("--tpot-variants", nargs="+", choices=list(TPOT_VARIANTS), default=list(TPOT_VARIANTS),
                        help="e2e: the TCACache decode variants timed")
    parser.add_argument("--compiled-variants", nargs="+", choices=list(TPOT_VARIANTS), default=["fused-graph"],
                        help="e2e with --compile-tpot: the TCACache decode variants timed compiled")
    parser.add_argument("--compile-tpot", default=None, metavar="BACKEND",
                        help="e2e: also time TPOT of torch.compile(model, backend=BACKEND) (e.g. inductor), "
                             "dense and TCA, compile time recorded")
    parser.add_argument("--tpot-steps", type=int, default=None,
                        help="decode steps per e2e TPOT row (default: one block, i.e. one compression)")
    parser.add_argument("--decode-backends", nargs="+", choices=["triton", "flex"], default=["triton", "flex"],
                        help="decode kernels timed per layer on CUDA (flex compiles for tens of seconds)")
    parser.add_argument("--compile-step", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the torch.compile'd decode step at the last length given")
    parser.add_argument("--phases", nargs="+",
                        choices=["prefill", "decode", "e2e", "generate", "generate_stream", "stream", "chunks",
                                 "batch"],
                        default=["prefill", "decode", "e2e"])
    parser.add_argument("--stream-count", type=int, default=24,
                        help="requests in the stream and generate_stream phases")
    parser.add_argument("--stream-range", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                        help="prompt lengths of the stream phase (default 8192 131072; smoke 900 1500) and the "
                             "generate_stream phase (default 8192 65536; smoke 300 700)")
    parser.add_argument("--chunk-prompt", type=int, default=131072, help="chunks phase: prompt length")
    parser.add_argument("--chunk-size", type=int, default=8192, help="chunks phase: tokens per chunk")
    parser.add_argument("--turns", type=int, nargs="+", default=[32768, 2048, 2048, 2048],
                        help="chunks phase: tokens of each user turn of the conversation")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8], help="batch phase: rows per batch")
    parser.add_argument("--batch-range", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                        help="batch phase: row lengths drawn from this range (default 16384 65536; smoke 300 700)")
    parser.add_argument("--batch-decode-steps", type=int, default=None,
                        help="batch phase: decode steps timed per batch (default 128; smoke 40)")
    parser.add_argument("--generate-steps", type=int_at_least(1), default=None,
                        help="generate phase: new tokens timed after the first (default 128; smoke 40); "
                             "generate_stream: new tokens per request (default 64; smoke 40)")
    parser.add_argument("--generate-compile", action="store_true",
                        help="generate phase: also the rows where generate compiles its decode step and replays "
                             "it from CUDA graphs (dense StaticCache, TCACache with reserve_tokens)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of the JSON results (default benchmarks/results; a --smoke run writes none "
                             "unless given one)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("the full benchmark runs LLaMA-3.1-8B-shaped layers on a CUDA GPU; on a CPU run --smoke "
                     "(tiny shapes, the same code paths)")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        shape, dtype, window = {"hq": 4, "hkv": 2, "d": 32}, torch.float32, 256
        lengths = args.lengths or [1024]
    else:
        shape, dtype, window = {"hq": 32, "hkv": 8, "d": 128}, torch.bfloat16, args.window
        lengths = args.lengths or [8192, 32768, 65536, 131072]
    kernel_options = {} if args.no_tma else kernel_options_for(device)
    backends = args.prefill_backends or ["triton"] + (["flash"] if prefill_backend(device) == "flash" else [])
    budgets = [("tca_25%+w", 0.25), ("tca_10%+w", 0.10)]
    e2e_budgets = [(f"tca_{round(keep * 100)}%+w", keep) for keep in args.e2e_keep]  # e2e and generate
    rows: list[dict[str, Any]] = []
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device), "torch": torch.__version__,
        "shape": shape, "dtype": str(dtype), "window": window, "kernel_options": kernel_options,
        "prefill_backends": backends,
        "triton_decode": triton_decode_settings(),
        # Off unless a run turns it on for the whole process (scripts/with_inductor.py), dense and TCA alike.
        "inductor_combo_kernels": bool(torch._inductor.config.combo_kernels),
        "inductor_freezing": bool(torch._inductor.config.freezing),
        "rows": rows,
    }
    e2e = bool(args.e2e_layers) and "e2e" in args.phases
    suffix = ("-notma" if args.no_tma else "") + ("" if args.phases == ["prefill", "decode", "e2e"]
                                                 else "-" + "-".join(args.phases))
    suffix += f"-{args.e2e_layers}layers" if e2e and args.e2e_layers != 2 else ""
    out = args.out or (None if args.smoke else Path("benchmarks/results"))
    path = out / f"{result['device']}-{result['date'][:10]}{suffix}.json" if out else None

    def measured(new: list[dict[str, Any]]) -> None:  # printed and saved per length: a run cut short keeps them
        rows.extend(new)
        print_table(new)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1))

    for length in lengths:
        if "prefill" in args.phases:
            for i, backend in enumerate(backends):
                options = kernel_options if backend == "triton" else prefill_kernel_options(device, backend)
                measured(prefill_rows(length, shape, budgets, window, device, dtype, options, backend,
                                      dense_rows=i == 0))
        if "decode" in args.phases:
            measured(decode_rows(length, shape, [0.39, 0.15], device, dtype, window, tuple(args.decode_backends),
                                 compile_step=args.compile_step and length == lengths[-1]))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if e2e:
        for length in [n for n in lengths if n >= 32768] or lengths[-1:]:
            # One model per length, freed in between (16 GB of weights at full depth, and the caches).
            measured(e2e_rows([length], args.e2e_layers, e2e_budgets, window, device, dtype, args.smoke,
                              args.compile_model, static_baseline=args.e2e_static, ttft_reps=args.ttft_reps,
                              tpot_steps=args.tpot_steps, variants=tuple(args.tpot_variants),
                              compile_tpot=args.compile_tpot, compiled_variants=tuple(args.compiled_variants)))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if "generate" in args.phases:
        from .bench_generate import generate_rows, print_generate

        new = generate_rows([n for n in lengths if n >= 32768] or lengths[-1:], max(1, args.e2e_layers),
                            e2e_budgets, window, device, dtype, args.smoke,
                            args.generate_steps or (40 if args.smoke else 128), args.generate_compile)
        rows.extend(new)
        print_generate(new)
        measured([])
    if "generate_stream" in args.phases:
        from .bench_generate_stream import generate_stream_rows, print_generate_stream

        lo, hi = args.stream_range or ((300, 700) if args.smoke else (8192, 65536))
        result["generate_stream"] = generate_stream_rows(
            args.stream_count, lo, hi, max(1, args.e2e_layers), args.e2e_keep[0], 128 if args.smoke else window,
            device, dtype, args.smoke, args.generate_steps or (40 if args.smoke else 64))
        rows.extend(result["generate_stream"].pop("rows"))
        print_generate_stream({**result["generate_stream"], "rows": rows})
        measured([])
    if "chunks" in args.phases:
        from .bench_chunks import chunk_bench_rows

        sizes = ((512, 200, [300, 64]) if args.smoke
                 else (args.chunk_prompt, args.chunk_size, args.turns))
        measured(chunk_bench_rows(max(1, args.e2e_layers), 0.25, 128 if args.smoke else window, device, dtype,
                                  args.smoke, *sizes, reply=8))
    if "batch" in args.phases:
        from .bench_batch import batch_bench_rows, print_batch

        lo, hi = args.batch_range or ((300, 700) if args.smoke else (16384, 65536))
        steps = args.batch_decode_steps or (40 if args.smoke else 128)
        new = batch_bench_rows(args.batch_sizes, lo, hi, max(1, args.e2e_layers), 0.25, 128 if args.smoke else window,
                               device, dtype, args.smoke, steps)
        rows.extend(new)
        print_batch(new)
        measured([])
    if "stream" in args.phases:
        from .bench_stream import print_stream, run_stream

        lo, hi = args.stream_range or ((900, 1500) if args.smoke else (8192, 131072))
        result["stream"] = run_stream(args.smoke, args.stream_count, lo, hi, 0.25, window)
        print_stream(result["stream"])
        measured([])
    if path is not None:
        print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
