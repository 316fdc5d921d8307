"""Benchmark phase ``generate_stream``: a stream of requests through plain ``model.generate``.

    python -m tca_flex.bench --phases generate_stream --e2e-layers 32 --stream-count 12 --stream-range 8192 65536
    python -m tca_flex.bench --phases generate_stream --smoke     # tiny CPU shapes (CI)

What a server built on ``model.generate`` sees, compiles and CUDA-graph recordings included: one
process, a LLaMA-3.1-8B-shaped model with random weights, and a stream of prompt lengths that
never repeat (``bench_stream.stream_lengths``). Every request is one greedy ``generate`` of
``new_tokens`` tokens, timed as it comes (wall clock, device synchronised). Four methods see the
same stream, one after the other:

- ``dense``: transformers' default ``DynamicCache``, eager;
- ``dense compiled``: ``cache_implementation="static"``: ``generate`` compiles its decode step and
  replays it from CUDA graphs (transformers' auto-compile);
- ``tca``: ``tca_flex.apply`` + ``tca_flex.warmup(..., generate=True)`` (timed apart: the
  prefill's graphs and generate's compiled decode step) + a new ``TCACache`` per request;
- ``tca compiled``: the same with one ``TCACache(model, reserve_tokens=...)``, ``reset()`` before each
  request (as ``generate`` reuses its static cache), which ``generate`` compiles like the static cache
  (the warm-up compiled it): a request records CUDA graphs only where its size bucket is new to the
  cache (since 2026-12-05; before, a new cache per request recorded at every request).

Per request the row keeps the graphs dynamo compiled during it and, on CUDA, the memory held
after it (allocated and reserved): a path that recompiles or records per length shows it here.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .bench_models import fastest_dense_sdpa, generate_compile_config, llama_8b_shaped
from .bench_stream import speed_words, stream_lengths
from .budgets import HeadBudgets
from .cache import TCACache
from .config import TCAConfig
from .hfcompat import cache_kwargs
from .integration import apply, remove
from .warmup import warmup

METHODS = ("dense", "dense compiled", "tca", "tca compiled")


@torch.no_grad()
def generate_stream_rows(count: int, lo: int, hi: int, num_layers: int, keep: float, window: int,
                         device: torch.device, dtype: torch.dtype, smoke: bool, new_tokens: int,
                         seed: int = 0) -> dict[str, Any]:
    """``{"lengths", "warmup_s", "warmup_graphs", "rows"}``; rows ``{"phase": "generate_stream", "index",
    "length", "method", "ms", "graphs", "cache", "layers", "new_tokens"}`` (+ ``"regrew"`` for a
    ``TCACache``, ``"allocated_bytes"`` and ``"reserved_bytes"`` on CUDA), one per request and method,
    in stream order."""
    from torch._dynamo.utils import counters
    from transformers import DynamicCache

    lengths = stream_lengths(count, lo, hi, seed)
    model = llama_8b_shaped(num_layers, device, dtype, smoke, hi + new_tokens + 64)
    model.set_attn_implementation(fastest_dense_sdpa())
    cfg = model.config
    config = TCAConfig(block_size=32 if smoke else 128, window=window)
    compile_config = generate_compile_config(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    prompts = [torch.randint(1, cfg.vocab_size, (1, n), device=device, generator=gen) for n in lengths]
    rows: list[dict[str, Any]] = []

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def stream(method: str, make_cache, **kwargs: Any) -> None:
        for index, ids in enumerate(prompts):
            cache = make_cache()
            given = cache_kwargs(model, cache) if cache is not None else {}
            graphs = counters["stats"]["unique_graphs"]
            sync()
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **given, **kwargs)
            sync()
            ms = (time.perf_counter() - start) * 1e3
            if out.shape[1] != ids.shape[1] + new_tokens:
                raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens, not {new_tokens}")
            row = {"phase": "generate_stream", "index": index, "length": ids.shape[1], "method": method,
                   "ms": ms, "graphs": counters["stats"]["unique_graphs"] - graphs,
                   "cache": type(cache).__name__ if cache is not None else "StaticCache",
                   "layers": num_layers, "new_tokens": new_tokens}
            if isinstance(cache, TCACache):
                row["regrew"] = cache.regrew  # a re-lay inside the compiled step: a recompile, no graphs
            if device.type == "cuda":
                row |= {"allocated_bytes": torch.cuda.memory_allocated(device),
                        "reserved_bytes": torch.cuda.memory_reserved(device)}
            rows.append(row)
            if not smoke:
                print("generate_stream row:", row, flush=True)
            del cache, out

    def fresh() -> None:  # each compiled method starts from no compiled code, as a new server would
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    stream("dense", lambda: DynamicCache(config=cfg))
    fresh()
    stream("dense compiled", lambda: None, cache_implementation="static", compile_config=compile_config)
    fresh()
    apply(model, budgets=HeadBudgets.uniform(num_layers, cfg.num_key_value_heads, keep, config))
    try:
        report = warmup(model, hi, generate=True, compile_config=compile_config, progress=False)
        stream("tca", lambda: TCACache(model))
        reused = TCACache(model, reserve_tokens=new_tokens + 16)

        def reset() -> TCACache:
            reused.reset()
            return reused

        stream("tca compiled", reset, compile_config=compile_config)
    finally:
        remove(model)
    return {"lengths": lengths, "keep": keep, "new_tokens": new_tokens, "warmup_s": report.seconds,
            "warmup_generate_s": report.generate_seconds, "warmup_graphs": report.graphs, "rows": rows}


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per method: first request, median and largest of the rest, stream total, total against dense's."""
    rows = [r for r in rows if r["phase"] == "generate_stream"]
    out: dict[str, dict[str, float]] = {}
    for method in METHODS:
        ms = [r["ms"] for r in rows if r["method"] == method]
        rest = sorted(ms[1:]) or ms
        out[method] = {"first_ms": ms[0], "median_rest_ms": rest[len(rest) // 2], "max_rest_ms": rest[-1],
                       "total_s": sum(ms) / 1e3, "graphs": sum(r["graphs"] for r in rows if r["method"] == method)}
    for method in METHODS:
        base = out["dense compiled" if method.endswith("compiled") else "dense"]
        out[method]["total_vs_dense"] = base["total_s"] / out[method]["total_s"]
    return out


def print_generate_stream(result: dict[str, Any]) -> None:
    """``result`` as ``generate_stream_rows`` returns it (other phases' rows are skipped)."""
    lengths = result["lengths"]
    print(f"\ngenerate stream: {len(lengths)} distinct lengths {min(lengths)}-{max(lengths)}, "
          f"{result['new_tokens']} new tokens each, TCA {round(100 * result['keep'])}% + window; "
          f"tca_flex.warmup {result['warmup_s']:.1f} s ({result['warmup_graphs']} graphs; generate's step "
          f"{result['warmup_generate_s']:.1f} s of it)")
    print(f"  {'method':<16}{'first ms':>11}{'median ms':>11}{'max ms':>11}{'total s':>9}{'graphs':>8}  "
          "total vs dense (same compile path)")
    for method, s in summarise(result["rows"]).items():
        print(f"  {method:<16}{s['first_ms']:>11.0f}{s['median_rest_ms']:>11.0f}{s['max_rest_ms']:>11.0f}"
              f"{s['total_s']:>9.1f}{s['graphs']:>8.0f}  "
              + ("(baseline)" if method.startswith("dense") else
                 speed_words(s["total_vs_dense"])))
