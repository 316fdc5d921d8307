"""Benchmark phase ``stream``: what a server sees, compiles included.

    python -m tca_flex.bench --phases stream            # CUDA: 24 lengths in 8K-128K, 8B layer shapes
    python -m tca_flex.bench --phases stream --smoke    # tiny CPU shapes (CI)

Two fresh processes run one after the other with one new, empty compile
cache directory (``TORCHINDUCTOR_CACHE_DIR``): the first pays every compile,
the second shows what the on-disk caches save. Each process times, request
by request (wall clock, device synchronised), a stream of prompt lengths that
never repeat, drawn uniformly (seeded) from the range:

- ``attention``: one attention layer (cuDNN SDPA vs ``tca_prefill_attention``);
- ``e2e``: a 2-layer model of the same shapes (transformers' SDPA vs
  ``tca_flex.apply``), the whole forward.

TCA runs ``tca_flex.warmup`` first (its time is reported); every request is
then timed once as it comes and once more right after (the warm time at that
length), and the number of graphs compiled during the stream is counted.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def speed_words(dense_over_method: float) -> str:
    """``"1.37x faster"`` or, below 1, ``"1.47x slower"``: a slowdown said as one."""
    if dense_over_method >= 1:
        return f"{dense_over_method:.2f}x faster"
    return f"{1 / dense_over_method:.2f}x slower"


def stream_lengths(count: int, lo: int, hi: int, seed: int) -> list[int]:
    """``count`` distinct lengths drawn uniformly from ``[lo, hi]``."""
    if count > hi - lo + 1:
        raise ValueError(f"{count} distinct lengths do not fit in [{lo}, {hi}]: widen the range or ask for fewer")
    rng = random.Random(seed)
    seen: list[int] = []
    while len(seen) < count:
        n = rng.randint(lo, hi)
        if n not in seen:
            seen.append(n)
    return seen


def _wall(device: torch.device, fn, *args: Any, **kwargs: Any) -> float:
    """Milliseconds of one call of ``fn(*args, **kwargs)``, device synchronised."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def child(smoke: bool, lengths: list[int], keep: float, window: int) -> dict[str, Any]:
    """One process's stream (see the module docstring); returns its rows and warm-up."""
    from torch._dynamo.utils import counters

    from .bench_models import llama_8b_shaped
    from .budgets import HeadBudgets
    from .config import TCAConfig
    from .integration import apply
    from .warmup import warmup

    start = time.perf_counter()
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    model = llama_8b_shaped(2, device, dtype, smoke, max(lengths) + 512)
    model.set_attn_implementation("sdpa")
    cfg = model.config
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    config = TCAConfig(block_size=32 if smoke else 128, window=window)
    budgets = HeadBudgets.uniform(2, hkv, keep, config)
    gen = torch.Generator(device=device).manual_seed(1)
    rows: list[dict[str, Any]] = []

    def qkv(length: int):
        return [torch.randn(1, h, length, d, device=device, dtype=dtype, generator=gen) for h in (hq, hkv, hkv)]

    def ids(length: int):
        return torch.randint(0, cfg.vocab_size, (1, length), device=device, generator=gen)

    with torch.no_grad():
        for length in lengths:
            q, k, v = qkv(length)
            ms = _wall(device, F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True)
            rows.append({"scope": "attention", "method": "dense_sdpa", "length": length, "ms": ms})
            x = ids(length)
            rows.append({"scope": "e2e", "method": "dense_sdpa", "length": length,
                         "ms": _wall(device, model, x, logits_to_keep=1)})
        apply(model, budgets=budgets)
        report = warmup(model, max(lengths), progress=False)
        before = counters["stats"]["unique_graphs"]
        from .attention import tca_prefill_attention

        cdf = budgets.cdf(0).to(device)
        scale = d ** -0.5
        for length in lengths:
            q, k, v = qkv(length)
            first = _wall(device, tca_prefill_attention, q, k, v, cdf, config, scale)
            warm = _wall(device, tca_prefill_attention, q, k, v, cdf, config, scale)
            rows.append({"scope": "attention", "method": "tca", "length": length, "ms": first, "warm_ms": warm})
            x = ids(length)
            first = _wall(device, model, x, logits_to_keep=1)
            warm = _wall(device, model, x, logits_to_keep=1)
            rows.append({"scope": "e2e", "method": "tca", "length": length, "ms": first, "warm_ms": warm})
    return {"warmup_s": report.seconds, "warmup_graphs": report.graphs, "warmup_lengths": list(report.lengths),
            "stream_graphs": counters["stats"]["unique_graphs"] - before, "process_s": time.perf_counter() - start,
            "rows": rows}


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    """Per scope and method: p50 / p99 / max per request, stream total, TCA / dense and warm ratios."""
    out: dict[str, Any] = {}
    for scope in ("attention", "e2e"):
        per: dict[str, Any] = {}
        for method in ("dense_sdpa", "tca"):
            ms = [r["ms"] for r in run["rows"] if r["scope"] == scope and r["method"] == method]
            ms_sorted = sorted(ms)
            per[method] = {"p50_ms": statistics.median(ms), "p99_ms": ms_sorted[min(len(ms) - 1, int(0.99 * len(ms)))],
                           "max_ms": ms_sorted[-1], "total_s": sum(ms) / 1e3}
        tca = [r for r in run["rows"] if r["scope"] == scope and r["method"] == "tca"]
        per["tca"]["max_first_over_warm"] = max(r["ms"] / r["warm_ms"] for r in tca)
        per["tca"]["median_first_over_warm"] = statistics.median(r["ms"] / r["warm_ms"] for r in tca)
        per["tca_over_dense_total"] = per["tca"]["total_s"] / per["dense_sdpa"]["total_s"]
        per["tca_over_dense_total_with_warmup"] = ((per["tca"]["total_s"] + run["warmup_s"])
                                                   / per["dense_sdpa"]["total_s"])
        out[scope] = per
    return out


def run_stream(smoke: bool, count: int, lo: int, hi: int, keep: float, window: int, seed: int = 0) -> dict[str, Any]:
    """Two fresh processes over the same stream, sharing one new compile cache directory."""
    lengths = stream_lengths(count, lo, hi, seed)
    cache_dir = tempfile.mkdtemp(prefix="tca_flex_stream_cache_")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    spec = json.dumps({"smoke": smoke, "lengths": lengths, "keep": keep, "window": window})
    runs = []
    for name in ("fresh process", "second process, on-disk caches"):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
            out_path = Path(handle.name)
        subprocess.run([sys.executable, "-m", "tca_flex.bench_stream", spec, str(out_path)], env=env, check=True)
        run = json.loads(out_path.read_text())
        out_path.unlink()
        run["process"] = name
        run["summary"] = summarise(run)
        runs.append(run)
    return {"lengths": lengths, "keep": keep, "window": window, "cache_dir": cache_dir, "runs": runs}


def print_stream(result: dict[str, Any]) -> None:
    print(f"\nstream: {len(result['lengths'])} distinct lengths {min(result['lengths'])}-{max(result['lengths'])}, "
          f"TCA {int(100 * result['keep'])}% + window {result['window']}")
    for run in result["runs"]:
        print(f"  {run['process']}: warm-up {run['warmup_s']:.1f} s ({run['warmup_graphs']} graphs), "
              f"graphs compiled during the stream: {run['stream_graphs']}")
        for scope, per in run["summary"].items():
            d, t = per["dense_sdpa"], per["tca"]
            print(f"    {scope:<9} dense p50 {d['p50_ms']:.1f} p99 {d['p99_ms']:.1f} max {d['max_ms']:.1f} ms, "
                  f"total {d['total_s']:.2f} s | TCA p50 {t['p50_ms']:.1f} p99 {t['p99_ms']:.1f} "
                  f"max {t['max_ms']:.1f} ms, total {t['total_s']:.2f} s: "
                  f"{speed_words(1 / per['tca_over_dense_total'])} than dense "
                  f"({speed_words(1 / per['tca_over_dense_total_with_warmup'])} with the warm-up); first/warm "
                  f"max {t['max_first_over_warm']:.2f}")


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    Path(sys.argv[2]).write_text(json.dumps(child(spec["smoke"], spec["lengths"], spec["keep"], spec["window"])))
