"""Benchmark phase ``chunks``: chunked prefill and multi-turn conversations over ``TCACache``.

    python -m tca_flex.bench --phases chunks                  # CUDA: 2-layer LLaMA-3.1-8B shapes
    python -m tca_flex.bench --phases chunks --smoke          # tiny CPU shapes, for CI

Two measurements on a LLaMA-3.1-8B-shaped model with random weights
(``docs/chunked_prefill.md`` has the rule the chunks follow):

- **chunked prefill** of one long prompt in chunks: ``TCACache`` (every chunk
  attends to the kept set plus itself) vs a dense ``DynamicCache`` (SDPA over
  the growing cache) vs one-shot TCA prefill; wall time and, on CUDA, peak
  memory above the weights;
- **a conversation** (a first turn, then shorter turns, each answered with a
  few greedy tokens): time to feed each turn with ``TCACache`` appending,
  ``DynamicCache`` appending, TCA re-prefilling the whole conversation into
  a fresh ``TCACache``, and ``TCACache`` appending after a first turn selected
  by reconstruction (``prefill_by_reconstruction``, a repeat instruction of
  ``REPEAT_TOKENS`` random tokens): its first turn's cost over a plain TCA prefill.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from .bench_models import fastest_dense_sdpa, llama_8b_shaped
from .budgets import HeadBudgets
from .cache import TCACache
from .chunked import chunked_prefill
from .config import TCAConfig
from .hfcompat import cache_kwargs
from .integration import apply, remove
from .reconstruct import prefill_by_reconstruction

REPEAT_TOKENS = 16  # about the length of "\nUser: Repeat the previous text.\nAssistant:"


def measured(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float | None]:
    """``(result, milliseconds, peak GiB allocated above the start or None on CPU)`` of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else None
    return result, ms, peak


def _feed(model, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    return model(ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache)).logits[:, -1]


@torch.no_grad()
def chunked_prefill_rows(model, budgets: HeadBudgets, prompt: int, chunk: int, device: torch.device,
                         dense_attn: str) -> list[dict[str, Any]]:
    """One prompt of ``prompt`` tokens: TCA in chunks, dense in chunks, TCA in one shot.

    Each method runs twice; the second run is timed (the first compiles
    FlexAttention for the shapes it meets).
    """
    from transformers import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device=device)
    rows: list[dict[str, Any]] = []

    def add(method: str, ms: float, peak: float | None, **extra: Any) -> None:
        rows.append({"phase": "chunks", "length": prompt, "method": method, "ms": ms, "chunk": chunk,
                     "peak_gib": peak, **extra})

    def run(make_cache, size: int | None):
        def go():
            cache = make_cache()
            logits = chunked_prefill(model, ids, cache, size) if size else _feed(model, ids, cache)
            return logits, cache

        go()
        (logits, cache), ms, peak = measured(go, device)
        if not torch.isfinite(logits).all():
            raise AssertionError("non-finite logits in the chunks benchmark")
        return cache, ms, peak

    model.set_attn_implementation(dense_attn)
    _, ms, peak = run(lambda: DynamicCache(config=model.config), chunk)
    add("dense_chunked", ms, peak)
    apply(model, budgets=budgets)
    try:
        cache, ms, peak = run(lambda: TCACache(model), chunk)
        add("tca_chunked", ms, peak, kept_fraction=cache.memory_report().total.kept_fraction)
        del cache
        cache, ms, peak = run(lambda: TCACache(model), None)
        add("tca_one_shot", ms, peak, kept_fraction=cache.memory_report().total.kept_fraction)
    finally:
        remove(model)
    return rows


@torch.no_grad()
def conversation_rows(model, budgets: HeadBudgets, turns: list[int], reply: int, device: torch.device,
                      dense_attn: str) -> list[dict[str, Any]]:
    """A conversation of ``turns`` (tokens per user turn), each answered with ``reply`` greedy tokens.

    Per turn: milliseconds to feed the turn (to the first reply token's
    logits) and, for the appending methods, per reply token.
    """
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(0)
    messages = [torch.randint(0, model.config.vocab_size, (1, n), generator=gen).to(device) for n in turns]
    rows: list[dict[str, Any]] = []

    repeat = torch.randint(0, model.config.vocab_size, (1, REPEAT_TOKENS), generator=gen).to(device)

    def converse(method: str, make_cache: Callable[[], Any], reprefill: bool, recon: bool = False) -> None:
        cache, history, pending = None, None, None
        for turn, message in enumerate(messages):
            history = message if history is None else torch.cat([history, message], 1)
            first = reprefill or cache is None
            if first:
                cache, ids = make_cache(), history
            else:
                ids = torch.cat([pending, message], 1)
            if recon and first:  # the first turn selected by a repeat pass (reconstruct.py)
                feed = lambda c=cache, x=ids: prefill_by_reconstruction(model, x, c, repeat)  # noqa: E731
            else:
                feed = lambda c=cache, x=ids: _feed(model, x, c)  # noqa: E731
            logits, feed_ms, peak = measured(feed, device)
            token = logits.argmax(-1, keepdim=True)
            start = time.perf_counter()
            for _ in range(reply - 1):
                token = _feed(model, token, cache).argmax(-1, keepdim=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            decode_ms = (time.perf_counter() - start) * 1e3 / max(1, reply - 1)
            # Stand-in ids for the reply (only lengths matter for timing); the cache holds all but its last.
            history = torch.cat([history, token.new_zeros(1, reply - 1), token], 1)
            pending = token
            rows.append({"phase": "chunks", "length": history.shape[1], "method": f"turn{turn + 1} {method}",
                         "ms": feed_ms, "turn_tokens": ids.shape[1], "decode_ms_per_token": decode_ms,
                         "peak_gib": peak})

    def timed_twice(method: str, make_cache: Callable[[], Any], reprefill: bool, recon: bool = False) -> None:
        # The first conversation compiles FlexAttention for every prefill length it meets.
        converse(method, make_cache, reprefill, recon)
        del rows[len(rows) - len(messages):]
        converse(method, make_cache, reprefill, recon)

    model.set_attn_implementation(dense_attn)
    timed_twice("dense_append", lambda: DynamicCache(config=model.config), reprefill=False)
    apply(model, budgets=budgets)
    try:
        timed_twice("tca_reprefill", lambda: TCACache(model), reprefill=True)
        timed_twice("tca_append", lambda: TCACache(model), reprefill=False)
        timed_twice("tca_recon_append", lambda: TCACache(model), reprefill=False, recon=True)
    finally:
        remove(model)
    return rows


def chunk_bench_rows(num_layers: int, keep: float, window: int, device: torch.device, dtype: torch.dtype,
                     smoke: bool, prompt: int, chunk: int, turns: list[int], reply: int) -> list[dict[str, Any]]:
    """Both measurements on one model (see the module docstring)."""

    model = llama_8b_shaped(num_layers, device, dtype, smoke, max(prompt, sum(turns) + reply * len(turns)) + 512)
    config = TCAConfig(block_size=32 if smoke else 128, window=window)
    budgets = HeadBudgets.uniform(num_layers, model.config.num_key_value_heads, keep, config)
    dense_attn = fastest_dense_sdpa()
    rows = chunked_prefill_rows(model, budgets, prompt, chunk, device, dense_attn)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows += conversation_rows(model, budgets, turns, reply, device, dense_attn)
    return rows
