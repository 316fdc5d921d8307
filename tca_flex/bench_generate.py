"""Benchmark phase ``generate``: what a user of plain ``model.generate`` sees.

    python -m tca_flex.bench --phases generate --e2e-layers 32 --lengths 32768 131072
    python -m tca_flex.bench --phases generate --generate-compile ...   # + transformers' auto-compile
    python -m tca_flex.bench --phases generate --smoke          # tiny CPU shapes, for CI

A LLaMA-3.1-8B-shaped model with random weights (``--e2e-layers`` layers). Per prompt length,
greedy ``model.generate`` with ``min_new_tokens`` (every call makes exactly its tokens): dense
with transformers' default cache (``DynamicCache``; the fastest dense SDPA, ``fastest_dense_sdpa``)
and TCA after ``apply`` with a ``TCACache``, one row per budget of ``--e2e-keep``. Each method
runs one untimed call (compiles, cuDNN plans), then one call of 1 new token (the time to first
token through ``generate``) and one of ``1 + steps``; the time per output token is their
difference over ``steps`` (default 128: one block leaves the window and is compressed).
Eagerly, a call of ``1 + steps`` tokens runs before the timed ones, over key lengths not decoded
before in the process: ``unseen_ms_per_token`` is its per-token time (eager dense pays a cost per
new key length there, likely SDPA's cuDNN plans). No ``torch.compile`` and no CUDA graphs: the host's time
(Python, kernel launches) counts, as it does for these users; the ``e2e`` phase times the
graph-replayed and compiled steps.

With ``compiled`` (``--generate-compile``), also the path where ``generate`` compiles the decode
step itself and replays it from CUDA graphs (transformers' auto-compile, ``reduce-overhead``, for
a compileable cache): dense with ``cache_implementation="static"`` (the ``StaticCache`` that
``generate`` makes once and reuses) and TCA with ``TCACache(model, reserve_tokens=...)``, a new
cache per call as a new request would have (so the timed call records its CUDA graphs again for
the new buffers). Their untimed call generates the timed call's tokens, so every compile (the
decode step, its recompile at the second step) falls there; every compiled row is compared
with the compiled dense row.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .bench_models import dense_kv_bytes, fastest_dense_sdpa, generate_compile_config, llama_8b_shaped
from .budgets import HeadBudgets
from .cache import TCACache
from .config import TCAConfig
from .hfcompat import cache_kwargs
from .integration import apply, remove
from .memory import cache_bytes


def _synced_ms(fn, device: torch.device) -> float:
    """Milliseconds of one ``fn()``, the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


@torch.no_grad()
def generate_rows(lengths: list[int], num_layers: int, budgets: list[tuple[str, float]], window: int,
                  device: torch.device, dtype: torch.dtype, smoke: bool, steps: int,
                  compiled: bool = False) -> list[dict[str, Any]]:
    """Rows ``{"phase": "generate", "length", "method", "ttft_ms", "total_ms", "ms_per_token",
    "new_tokens", "cache", "compiled", "first_call_ms", "layers", "kv_bytes"}`` per length and method
    and ``unseen_ms_per_token`` (see the module doc; ``first_call_ms``: the untimed warm-up call of 2 new
    tokens, or of the timed call's tokens where generate compiles)."""
    from transformers import DynamicCache

    model = llama_8b_shaped(num_layers, device, dtype, smoke, max(lengths) + steps + 64)
    model.set_attn_implementation(fastest_dense_sdpa())
    cfg = model.config
    config = TCAConfig(block_size=128 if not smoke else 32, window=window)
    rows: list[dict[str, Any]] = []

    compile_config = generate_compile_config(device)

    def generate(ids: torch.Tensor, new: int, cache, **kwargs: Any) -> torch.Tensor:
        given = cache_kwargs(model, cache) if cache is not None else {}
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0, **given, **kwargs)
        if out.shape[1] != ids.shape[1] + new:
            raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens, not {new}")
        return out

    def measure(ids: torch.Tensor, method: str, make_cache, compile_step: bool = False, **kwargs: Any) -> None:
        if compile_step:
            kwargs["compile_config"] = compile_config
        # The untimed call, timed too: the first request's own cost (compiles included when generate compiles).
        first_call = _synced_ms(lambda: generate(ids, 1 + steps if compile_step else 2, make_cache(), **kwargs),
                                device)
        # Eagerly, a call over key lengths this process has not decoded yet, before the timed one: what is
        # paid once per process and shape (eager dense: ~0.14 s for each new key length on the H200, likely
        # the SDPA kernel's cuDNN plan, BENCHMARKS.md). Where generate compiles, the untimed call did it.
        unseen = None if compile_step else _synced_ms(lambda: generate(ids, 1 + steps, make_cache(), **kwargs),
                                                      device)
        first = _synced_ms(lambda: generate(ids, 1, make_cache(), **kwargs), device)
        cache = make_cache()
        total = _synced_ms(lambda: generate(ids, 1 + steps, cache, **kwargs), device)
        if cache is not None:
            kv = cache_bytes(cache)
        else:  # the StaticCache generate makes: room for the prompt and the new tokens
            kv = dense_kv_bytes(cfg, ids.shape[1] + 1 + steps, dtype)
        rows.append({"phase": "generate", "length": ids.shape[1], "method": method, "ttft_ms": first,
                     "total_ms": total, "ms_per_token": (total - first) / steps,
                     "unseen_ms_per_token": None if unseen is None else (unseen - first) / steps,
                     "new_tokens": 1 + steps,
                     "cache": type(cache).__name__ if cache is not None else "StaticCache",
                     "compiled": compile_step, "first_call_ms": first_call, "layers": num_layers, "kv_bytes": kv})
        if not smoke:
            print("generate row:", rows[-1], flush=True)
        if compile_step:
            torch._dynamo.reset()  # the next method compiles its own step

    for length in lengths:
        ids = torch.randint(1, cfg.vocab_size, (1, length), device=device)
        measure(ids, "dense", lambda: DynamicCache(config=cfg))
        if compiled:
            measure(ids, "dense compiled", lambda: None, True, cache_implementation="static")
        for label, keep in budgets:
            apply(model, budgets=HeadBudgets.uniform(num_layers, cfg.num_key_value_heads, keep, config))
            try:
                measure(ids, label, lambda: TCACache(model))
                if compiled:
                    measure(ids, f"{label} compiled", lambda: TCACache(model, reserve_tokens=steps + 16), True)
            finally:
                remove(model)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def print_generate(rows: list[dict[str, Any]]) -> None:
    """Per length, each method's times against dense's (speedup = dense time / method time)."""
    dense = {(r["length"], r.get("compiled", False)): r for r in rows if r["method"].startswith("dense")}
    print(f"\n{'L':>8}  {'method':<22}{'TTFT ms':>10}{'per token ms':>14}{'vs dense':>10}"
          f"{'unseen lengths':>15}{'vs dense':>10}  cache, KV")
    for r in rows:
        base = dense.get((r["length"], r.get("compiled", False)), r)
        cold = r.get("unseen_ms_per_token") or float("nan")
        print(f"{r['length']:>8}  {r['method']:<22}{r['ttft_ms']:>10.1f}{r['ms_per_token']:>14.3f}"
              f"{base['ms_per_token'] / r['ms_per_token']:>9.2f}x{cold:>15.3f}"
              f"{(base.get('unseen_ms_per_token') or float('nan')) / cold:>9.2f}x"
              f"  {r['cache']}, {r['kv_bytes'] / 2**20:,.0f} MiB")
