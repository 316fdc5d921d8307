"""Benchmark: TCA prefill/decode attention vs the fastest dense kernels.

    python -m tca_flex.bench                 # CUDA: LLaMA-3.1-8B attention shapes, 8K..128K
    python -m tca_flex.bench --smoke         # tiny CPU shapes: the same code paths, for CI
    python -m tca_flex.bench --phases chunks # chunked prefill and conversations (bench_chunks.py)

Every TCA variant is checked against SDPA with an explicit mask (on the last
queries) before it is timed. Results go to ``benchmarks/results/<device>-<date>.json``
and a table on stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
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
from .budgets import HeadBudgets
from .compile import flex
from .config import TCAConfig
from .hfcompat import cache_kwargs
from .masks import KERNEL_BLOCK, causal_block_mask, tca_block_mask
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


def graph_timed(fn: Callable[[], Any], device: torch.device, reps: int = 50) -> float:
    """Median microseconds of one ``fn`` call replayed from a CUDA graph (eager timing on CPU)."""
    if device.type != "cuda":
        return timed(fn, device) * 1e3
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
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
    capacity = -(-glen // KERNEL_BLOCK) * KERNEL_BLOCK
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
        "attention": timed(lambda: flex(q, k_all, v_all, bm, scale=scale, enable_gqa=True,
                                        kernel_options=kernel_options), device),
        "computed_blocks": int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()),
    }


def check_against_sdpa(q, k, v, cdf, config: TCAConfig, scale: float, out: torch.Tensor,
                       rows: int = 256) -> float:
    """Relative error of TCA's last ``rows`` queries vs SDPA with the explicit TCA mask."""
    length = q.shape[2]
    sel = select(q, k, cdf, scaling=scale, block_size=config.block_size, window=config.window,
                 alpha=config.alpha)
    queries = torch.arange(length - rows, length, device=q.device)
    mask = reference_mask(sel.keep_mask(length), config.window, q.shape[1], queries)
    g = q.shape[1] // k.shape[1]
    ref = F.scaled_dot_product_attention(q[:, :, length - rows:].float(), k.float().repeat_interleave(g, 1),
                                         v.float().repeat_interleave(g, 1), attn_mask=mask, scale=scale)
    got = out[:, :, length - rows:].float()
    return float((got - ref).norm() / ref.norm())


def prefill_rows(length: int, shape: dict[str, int], budgets: list[tuple[str, float]], window: int,
                 device: torch.device, dtype: torch.dtype, kernel_options) -> list[dict[str, Any]]:
    hq, hkv, d = shape["hq"], shape["hkv"], shape["d"]
    gen = torch.Generator(device=device).manual_seed(length)
    q, k, v = (torch.randn(1, h, length, d, device=device, dtype=dtype, generator=gen) for h in (hq, hkv, hkv))
    scale = d ** -0.5
    causal_flops = 4 * hq * d * length * (length + 1) / 2
    rows: list[dict[str, Any]] = []

    def add(name: str, ms: float, flops: float, **extra: Any) -> None:
        rows.append({"phase": "prefill", "length": length, "method": name, "ms": ms,
                     "tflops": flops / ms / 1e9, **extra})

    add("sdpa_default", timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                              device), causal_flops)
    if device.type == "cuda":
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            add("sdpa_flash2", timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                            enable_gqa=True), device),
                causal_flops)
    cbm = causal_block_mask(length, device)
    add("flex_causal", timed(lambda: flex(q, k, v, cbm, scale=scale, enable_gqa=True,
                                          kernel_options=kernel_options), device), causal_flops)
    for name, frac in budgets:
        config = TCAConfig(block_size=128, window=window)
        cdf = HeadBudgets.uniform(1, hkv, frac, config).cdf(0).to(device)
        out = tca_prefill_attention(q, k, v, cdf, config, scale, kernel_options=kernel_options)
        err = check_against_sdpa(q, k, v, cdf, config, scale, out)
        if not err < 2e-2:
            raise AssertionError(f"TCA {name} at L={length} differs from masked SDPA: rel err {err:.3g}")
        total = timed(lambda c=cdf, cf=config: tca_prefill_attention(q, k, v, c, cf, scale,
                                                                     kernel_options=kernel_options), device)
        stages = stage_times(q, k, v, cdf, config, scale, device, kernel_options)
        blocks = stages.pop("computed_blocks")
        flops = blocks * KERNEL_BLOCK * KERNEL_BLOCK * d * 4
        overhead = total - stages["attention"]
        add(name, total, causal_flops, rel_err=err, stages_ms=stages,
            attention_tflops=flops / stages["attention"] / 1e9,
            computed_fraction=blocks / (hq * (-(-length // 128)) * (-(-length // 128) + 1) / 2),
            overhead_ms=overhead)
    return rows


def build_cache_layer(length: int, hq: int, hkv: int, d: int, fractions: list[float], config: TCAConfig,
                      dtype: torch.dtype, device: torch.device, reserve_tokens: int = 0, backend: str = "auto"):
    """A ``TCACacheLayer`` after a synthetic prefill: random K/V, the real selection, and
    KV head ``i`` keeping ``fractions[i]`` of its global region."""
    from .cache import TCACacheLayer

    probs = torch.cat([HeadBudgets.uniform(1, 1, f, config).probs for f in fractions], dim=1)
    budgets = HeadBudgets(probs=probs, config=config)
    keep = torch.floor(budgets.expected_per_block()[0] + 1e-9).long().tolist()
    q = torch.randn(1, hq, length, d, dtype=dtype, device=device)
    k = torch.randn(1, hkv, length, d, dtype=dtype, device=device)
    sel = select(q, k, budgets.cdf(0).to(device), scaling=d**-0.5, block_size=config.block_size,
                 window=config.window, alpha=config.alpha)
    layer = TCACacheLayer(config, keep, reserve_tokens=reserve_tokens, backend=backend)
    layer.update(k, k)
    layer.finish_prefill(k, k, sel)
    return layer


# Per-KV-head keep fractions of the global region, as unequal as calibrated heads are;
# scaled so the whole cache keeps a given fraction.
HEAD_SPREAD = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.98]


def head_fractions(target: float, length: int, window: int, hkv: int) -> list[float]:
    """Per-head global keep fractions whose cache keeps ``target`` of ``length`` tokens overall."""
    spread = HEAD_SPREAD if hkv == len(HEAD_SPREAD) else [1.0] * hkv
    glob = max(0.0, (target * length - window) / max(1, length - window))
    mean = sum(spread) / len(spread)
    return [min(1.0, glob * f / mean) for f in spread]


def decode_rows(length: int, shape: dict[str, int], targets: list[float], device, dtype,
                window: int, compile_step: bool = False) -> list[dict]:
    """Per-layer decode: SDPA over the full cache, SDPA over a compact cache of the same
    kept size (the ideal), and TCA's head-packed cache with each decode kernel, plus the
    whole TCA step (append + attention + compression) replayed from a CUDA graph, eager and
    (``compile_step``, CUDA only: each compile takes tens of seconds) compiled."""
    from .decode import decode_attention, triton_supported

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
    backends = ["triton", "flex"] if triton_supported(q) else ["auto"]
    for target in targets:
        layer = build_cache_layer(length, hq, hkv, d, head_fractions(target, length, config.window, hkv),
                                  config, dtype, device, reserve_tokens=512)
        mem = layer.memory()
        tag = f"{round(100 * target)}%"  # by target, so a method's rows line up across lengths
        rows.append({**sdpa_row(f"sdpa_compact@{tag}", mem.kept_tokens // hkv), "kept_fraction": mem.kept_fraction})
        for backend in backends:
            us = graph_timed(lambda b=backend, c=layer: decode_attention(q, c.k_buf, c.v_buf, c.owner,
                                                                         group=hq // hkv, scale=scale, backend=b,
                                                                         segments=c.segments), device)
            rows.append({"phase": "decode", "length": length, "method": f"tca_{backend}@{tag}", "us": us,
                         "kv_bytes": mem.bytes_used, "kept_tokens": mem.kept_tokens,
                         "kept_fraction": mem.kept_fraction, "bytes_over_kept": mem.overhead})
        new = torch.randn(1, hkv, 1, d, device=device, dtype=dtype, generator=gen)

        def step(layer=layer, new=new):
            layer.update(new, new)
            return layer.decode_step(q, scale)

        rows.append({"phase": "decode", "length": length, "method": f"tca_step@{tag}",
                     "us": graph_timed(step, device), "kv_bytes": mem.bytes_used})
        if compile_step and device.type == "cuda":
            # Compiled, the step's ~40 small ops (append, importance, top-t, scatters) fuse into a few kernels.
            try:
                us = graph_timed(torch.compile(step, dynamic=False), device)
                rows.append({"phase": "decode", "length": length, "method": f"tca_step_compiled@{tag}", "us": us,
                             "kv_bytes": mem.bytes_used})
            except Exception as err:  # recorded, not fatal: the other rows still stand
                rows.append({"phase": "decode", "length": length, "method": f"tca_step_compiled@{tag}",
                             "us": float("nan"), "error": repr(err)[-1500:]})
    return rows


def fastest_dense_sdpa() -> str:
    """Registers and names transformers' SDPA attention with no materialised mask for unpadded
    causal shapes (``integration.tca_mask``): prefill takes SDPA's causal kernel (cuDNN on
    Hopper) and decode its native-GQA path, instead of a ``[.., L]`` mask that pushes decode
    to a slower kernel and repeats the KV heads. The dense baseline every e2e row is timed against."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    from .integration import tca_mask

    AttentionInterface.register("sdpa_maskless", sdpa_attention_forward)
    AttentionMaskInterface.register("sdpa_maskless", tca_mask)
    return "sdpa_maskless"


def decode_step_ms(model, cache, length: int, device: torch.device) -> float:
    """Milliseconds of one decode step (token ``length``) of ``model`` over ``cache``, replayed
    from a CUDA graph (eager on CPU): static inputs, positions as tensors, no host sync."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.full((1, 1), length, device=device)
    cache_position = torch.full((1,), length, device=device)
    return graph_timed(lambda: model(input_ids=ids, position_ids=pos, cache_position=cache_position,
                                     use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache)).logits,
                       device, reps=20) / 1e3


def static_copy(model, dynamic, length: int, device: torch.device):
    """A ``StaticCache`` holding ``dynamic``'s K/V (transformers' graph-safe dense cache; its
    decode attention takes a ``[1, 1, 1, max_len]`` mask)."""
    from transformers import StaticCache

    static = StaticCache(config=model.config, max_cache_len=length + 256)
    cache_position = torch.arange(length, device=device)
    for i, layer in enumerate(dynamic.layers):
        static.update(layer.keys, layer.values, i, {"cache_position": cache_position})
    return static


def one_step_dense(dynamic):
    """``dynamic`` with each layer preallocated one token longer: every ``update`` writes slot ``L``
    and returns all ``L + 1`` keys, so the step runs maskless SDPA over exactly the dense cache
    (the fastest dense decode step, for timing one step at length ``L``)."""
    from transformers.cache_utils import DynamicLayer

    class OneStepDenseLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            super().__init__()
            self.length = keys.shape[-2]
            self.k_buf = torch.cat([keys, keys[:, :, -1:]], dim=-2)
            self.v_buf = torch.cat([values, values[:, :, -1:]], dim=-2)
            self.keys, self.values = self.k_buf[:, :, :-1], self.v_buf[:, :, :-1]
            self.device, self.is_initialized = keys.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            self.k_buf[:, :, self.length:].copy_(key_states)
            self.v_buf[:, :, self.length:].copy_(value_states)
            return self.k_buf, self.v_buf

        def get_seq_length(self) -> int:
            return self.length

    dynamic.layers = [OneStepDenseLayer(layer.keys, layer.values) for layer in dynamic.layers]
    return dynamic


@torch.no_grad()
def e2e_rows(lengths: list[int], num_layers: int, keep: float, window: int, device, dtype,
             smoke: bool, compile_model: bool = False) -> list[dict[str, Any]]:
    """A LLaMA-3.1-8B-shaped model (random weights, few layers), dense vs TCA: time to first
    token, and time per output token (dense: StaticCache + SDPA; TCA: ``TCACache``)."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from .cache import TCACache
    from .integration import apply, remove

    if smoke:
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(lengths) + 512)
    else:
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=num_layers, num_attention_heads=32, num_key_value_heads=8,
                          max_position_embeddings=131072 + 512, rope_theta=500000.0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.set_attn_implementation(fastest_dense_sdpa())
    budgets = HeadBudgets.uniform(num_layers, cfg.num_key_value_heads, keep,
                                  TCAConfig(block_size=128 if not smoke else 32, window=window))
    label = f"tca_{int(keep * 100)}%+w"
    rows = []

    def add(phase: str, length: int, method: str, ms: float, **extra: Any) -> None:
        rows.append({"phase": phase, "length": length, "method": method, "ms": ms, "layers": num_layers,
                     **extra})

    for length in lengths:
        ids = torch.randint(0, cfg.vocab_size, (1, length), device=device)
        def forward(fn=model, x=ids):
            return fn(x, logits_to_keep=1)

        add("ttft", length, "dense_sdpa", timed(forward, device, warmup=1, reps=3))
        dynamic = DynamicCache(config=cfg)
        model(ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, dynamic))
        dense = one_step_dense(dynamic)
        add("tpot", length, "dense_tpot", decode_step_ms(model, dense, length, device),
            cache="preallocated, maskless SDPA")
        add("tpot", length, "dense_static_tpot", decode_step_ms(model, static_copy(model, dense, length, device),
                                                                length, device), cache="StaticCache")
        del dynamic, dense
        apply(model, budgets=budgets)
        add("ttft", length, label, timed(forward, device, warmup=1, reps=3))
        cache = TCACache(model, reserve_tokens=512)
        model(ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        report = cache.memory_report()
        add("tpot", length, f"{label} TCACache", decode_step_ms(model, cache, length, device),
            kept_fraction=report.total.kept_fraction, bytes_fraction=report.total.bytes_fraction)
        del cache
        if compile_model:
            eager_logits = model(ids, logits_to_keep=1).logits
            compiled = torch.compile(model)
            logits = compiled(ids, logits_to_keep=1).logits
            err = float((logits.float() - eager_logits.float()).abs().max())
            ms = timed(lambda fn=compiled, x=ids: fn(x, logits_to_keep=1), device, warmup=1, reps=3)
            add("ttft", length, f"{label} compiled", ms, max_abs_logit_diff_vs_eager=err)
        remove(model)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def triton_decode_settings() -> dict[str, int] | None:
    from . import decode

    kernels = decode.triton_decode
    if kernels is None:
        return None
    return {"block": kernels.BLOCK_N, "programs": kernels.TARGET_PROGRAMS, "num_warps": kernels.NUM_WARPS,
            "num_stages": kernels.NUM_STAGES}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return f"cpu-{platform.machine()}"


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'phase':<8}{'L':>8}  {'method':<24}{'time':>12}{'speedup':>9}{'TFLOP/s':>9}  notes")
    base: dict[tuple[str, int], float] = {}
    for r in rows:
        t = r.get("ms", r.get("us"))
        unit = "ms" if "ms" in r else "us"
        key = (r["phase"], r["length"], r["method"].split(" ")[0] if r["method"].startswith("turn") else "")
        if r["method"] in ("sdpa_default", "sdpa_full", "dense_sdpa", "dense_tpot", "dense_chunked") or (
                r["method"].endswith(" dense_append")):
            base[key] = t
        speed = base.get(key, t) / t
        notes = ""
        if "stages_ms" in r:
            notes = (f"attn {r['stages_ms']['attention']:.2f} ms @ {r['attention_tflops']:.0f} TF/s, "
                     f"overhead {r['overhead_ms']:.2f} ms, computed {100 * r['computed_fraction']:.0f}%")
        if "max_abs_logit_diff_vs_eager" in r:
            notes = f"max |logit - eager TCA| {r['max_abs_logit_diff_vs_eager']:.3g}"
        if "kv_bytes" in r:
            notes = f"KV {r['kv_bytes'] / 2**20:.0f} MiB"
        if "kept_fraction" in r:
            notes += f" kept {100 * r['kept_fraction']:.0f}%"
        if "error" in r:
            notes = f"failed: {r['error'][:60]}"
        tf = f"{r['tflops']:.0f}" if "tflops" in r else ""
        print(f"{r['phase']:<8}{r['length']:>8}  {r['method']:<24}{t:>9.3f} {unit}{speed:>8.2f}x{tf:>9}  {notes}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes (CI)")
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--no-tma", action="store_true",
                        help="FlexAttention defaults instead of USE_TMA (the default on Hopper)")
    parser.add_argument("--e2e-layers", type=int, default=2, help="layers of the 8B-shaped model (0: skip)")
    parser.add_argument("--compile-model", action="store_true", help="also time torch.compile(model) after apply")
    parser.add_argument("--phases", nargs="+", choices=["prefill", "decode", "e2e", "chunks"],
                        default=["prefill", "decode", "e2e"])
    parser.add_argument("--chunk-prompt", type=int, default=131072, help="chunks phase: prompt length")
    parser.add_argument("--chunk-size", type=int, default=8192, help="chunks phase: tokens per chunk")
    parser.add_argument("--turns", type=int, nargs="+", default=[32768, 2048, 2048, 2048],
                        help="chunks phase: tokens of each user turn of the conversation")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        shape, dtype, window = {"hq": 4, "hkv": 2, "d": 32}, torch.float32, 256
        lengths = args.lengths or [1024]
    else:
        shape, dtype, window = {"hq": 32, "hkv": 8, "d": 128}, torch.bfloat16, args.window
        lengths = args.lengths or [8192, 32768, 65536, 131072]
    kernel_options = {} if args.no_tma else None
    budgets = [("tca_25%+w", 0.25), ("tca_10%+w", 0.10)]
    rows: list[dict[str, Any]] = []
    for length in lengths:
        if "prefill" in args.phases:
            rows += prefill_rows(length, shape, budgets, window, device, dtype, kernel_options)
        if "decode" in args.phases:
            rows += decode_rows(length, shape, [0.39, 0.15], device, dtype, window,
                                compile_step=length == lengths[-1])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.e2e_layers and "e2e" in args.phases:
        e2e_lengths = [n for n in lengths if n >= 32768] or lengths[-1:]
        rows += e2e_rows(e2e_lengths, args.e2e_layers, 0.25, window, device, dtype, args.smoke,
                         args.compile_model)
    if "chunks" in args.phases:
        from .bench_chunks import chunk_bench_rows

        sizes = ((512, 200, [300, 64]) if args.smoke
                 else (args.chunk_prompt, args.chunk_size, args.turns))
        rows += chunk_bench_rows(max(1, args.e2e_layers), 0.25, 128 if args.smoke else window, device, dtype,
                                 args.smoke, *sizes, reply=8)
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device), "torch": torch.__version__,
        "shape": shape, "dtype": str(dtype), "window": window, "kernel_options": kernel_options,
        "triton_decode": triton_decode_settings(),
        "rows": rows,
    }
    print_table(rows)
    if not args.smoke:
        args.out.mkdir(parents=True, exist_ok=True)
        default = ["prefill", "decode", "e2e"]
        suffix = ("-notma" if args.no_tma else "") + ("" if args.phases == default else "-" + "-".join(args.phases))
        path = args.out / f"{result['device']}-{result['date'][:10]}{suffix}.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
