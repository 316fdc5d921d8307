"""Benchmark: TCA prefill/decode attention vs the fastest dense kernels.

    python -m tca_flex.bench                 # CUDA: LLaMA-3.1-8B attention shapes, 8K..128K
    python -m tca_flex.bench --smoke         # tiny CPU shapes: the same code paths, for CI

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
                      dtype: torch.dtype, device: torch.device):
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
    layer = TCACacheLayer(config, keep)
    layer.update(k, k)
    layer.finish_prefill(k, k, sel)
    return layer


def decode_rows(length: int, shape: dict[str, int], fractions: list[float], device, dtype,
                window: int) -> list[dict]:
    """Per-layer decode: SDPA over the full cache, SDPA over compact caches of the kept
    size (the ideal), and TCA's own head-packed cache (``decode.decode_attention``)."""
    from .decode import decode_attention

    hq, hkv, d = shape["hq"], shape["hkv"], shape["d"]
    gen = torch.Generator(device=device).manual_seed(length + 1)
    q = torch.randn(1, hq, 1, d, device=device, dtype=dtype, generator=gen)
    rows = []
    bytes_per_token = 2 * hkv * d * torch.finfo(dtype).bits // 8
    for frac in [1.0, *fractions]:
        kept = max(1, int(length * frac))
        k = torch.randn(1, hkv, kept, d, device=device, dtype=dtype, generator=gen)
        v = torch.randn_like(k)
        us = graph_timed(lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), device)
        rows.append({"phase": "decode", "length": length, "method": f"sdpa_compact_{frac:.2f}",
                     "us": us, "kv_bytes": kept * bytes_per_token})
    # Heads keep different amounts (mean 0.39 of the global region), as calibrated heads do.
    per_head = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.98][:hkv] if hkv == 8 else [0.39] * hkv
    config = TCAConfig(block_size=128 if length > 4 * 128 else 32, window=min(window, length // 2))
    layer = build_cache_layer(length, hq, hkv, d, per_head, config, dtype, device)
    mem = layer.memory()
    us = graph_timed(lambda: decode_attention(q, layer.k_buf, layer.v_buf, layer.owner, group=hq // hkv,
                                              scale=d ** -0.5), device)
    rows.append({"phase": "decode", "length": length, "method": f"tca_cache_{mem.kept_fraction:.2f}",
                 "us": us, "kv_bytes": mem.bytes_used, "kept_tokens": mem.kept_tokens})
    return rows


@torch.no_grad()
def e2e_rows(lengths: list[int], num_layers: int, keep: float, window: int, device, dtype,
             smoke: bool, compile_model: bool = False) -> list[dict[str, Any]]:
    """Time to first token of a LLaMA-3.1-8B-shaped model (random weights, few layers), dense vs TCA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .integration import apply, remove

    if smoke:
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(lengths))
    else:
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=num_layers, num_attention_heads=32, num_key_value_heads=8,
                          max_position_embeddings=131072, rope_theta=500000.0)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    budgets = HeadBudgets.uniform(num_layers, cfg.num_key_value_heads, keep,
                                  TCAConfig(block_size=128 if not smoke else 32, window=window))
    rows = []
    for length in lengths:
        ids = torch.randint(0, cfg.vocab_size, (1, length), device=device)
        def forward(fn=model, x=ids):
            return fn(x, logits_to_keep=1)

        dense = timed(forward, device, warmup=1, reps=3)
        apply(model, budgets=budgets)
        sparse = timed(forward, device, warmup=1, reps=3)
        rows.append({"phase": "ttft", "length": length, "method": "dense_sdpa", "ms": dense,
                     "layers": num_layers})
        rows.append({"phase": "ttft", "length": length, "method": f"tca_{int(keep * 100)}%+w", "ms": sparse,
                     "layers": num_layers})
        if compile_model:
            eager_logits = model(ids, logits_to_keep=1).logits
            compiled = torch.compile(model)
            logits = compiled(ids, logits_to_keep=1).logits
            err = float((logits.float() - eager_logits.float()).abs().max())
            ms = timed(lambda fn=compiled, x=ids: fn(x, logits_to_keep=1), device, warmup=1, reps=3)
            rows.append({"phase": "ttft", "length": length, "method": f"tca_{int(keep * 100)}%+w compiled",
                         "ms": ms, "layers": num_layers, "max_abs_logit_diff_vs_eager": err})
        remove(model)
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return f"cpu-{platform.machine()}"


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'phase':<8}{'L':>8}  {'method':<22}{'time':>12}{'speedup':>9}{'TFLOP/s':>9}  notes")
    base: dict[tuple[str, int], float] = {}
    for r in rows:
        t = r.get("ms", r.get("us"))
        unit = "ms" if "ms" in r else "us"
        if r["method"] in ("sdpa_default", "sdpa_compact_1.00", "dense_sdpa"):
            base[(r["phase"], r["length"])] = t
        speed = base.get((r["phase"], r["length"]), t) / t
        notes = ""
        if "stages_ms" in r:
            notes = (f"attn {r['stages_ms']['attention']:.2f} ms @ {r['attention_tflops']:.0f} TF/s, "
                     f"overhead {r['overhead_ms']:.2f} ms, computed {100 * r['computed_fraction']:.0f}%")
        if "max_abs_logit_diff_vs_eager" in r:
            notes = f"max |logit - eager TCA| {r['max_abs_logit_diff_vs_eager']:.3g}"
        if "kv_bytes" in r:
            notes = f"KV {r['kv_bytes'] / 2**20:.0f} MiB"
        tf = f"{r['tflops']:.0f}" if "tflops" in r else ""
        print(f"{r['phase']:<8}{r['length']:>8}  {r['method']:<22}{t:>9.3f} {unit}{speed:>8.2f}x{tf:>9}  {notes}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes (CI)")
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--no-tma", action="store_true",
                        help="FlexAttention defaults instead of USE_TMA (the default on Hopper)")
    parser.add_argument("--e2e-layers", type=int, default=2, help="layers of the 8B-shaped model (0: skip)")
    parser.add_argument("--compile-model", action="store_true", help="also time torch.compile(model) after apply")
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
        rows += prefill_rows(length, shape, budgets, window, device, dtype, kernel_options)
        rows += decode_rows(length, shape, [0.39, 0.15], device, dtype, window)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.e2e_layers:
        e2e_lengths = [n for n in lengths if n >= 32768] or lengths[-1:]
        rows += e2e_rows(e2e_lengths, args.e2e_layers, 0.25, window, device, dtype, args.smoke,
                         args.compile_model)
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device), "torch": torch.__version__,
        "shape": shape, "dtype": str(dtype), "window": window, "kernel_options": kernel_options,
        "rows": rows,
    }
    print_table(rows)
    if not args.smoke:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{result['device']}-{result['date'][:10]}{'-notma' if args.no_tma else ''}.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
