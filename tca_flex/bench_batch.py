"""Benchmark phase ``batch``: mixed-length batches, left-padded as ``generate`` gives them.

    python -m tca_flex.bench --phases batch                   # CUDA: 2-layer LLaMA-3.1-8B shapes, 16K-64K
    python -m tca_flex.bench --phases batch --smoke           # tiny CPU shapes, for CI
    python -m tca_flex.bench --phases batch --batch-sizes 4 8 --batch-range 16384 65536

Per batch size, row lengths are drawn (seeded) from the range and the rows are
left-padded to the longest. On a LLaMA-3.1-8B-shaped model with random weights:

- **prefill** (whole forward, ``logits_to_keep=1``): TCA over the padded batch
  with a ``TCACache`` (each row runs on its own tokens, ``attention.py``) vs the
  sum of its rows' single-request TCA prefills; dense SDPA over the padded
  batch (transformers' 4-D mask) vs the sum of per-row dense prefills
  (maskless SDPA, the fastest dense kernel);
- **decode**: tokens/s of the batch over ``TCACache`` vs dense over the padded
  batch (``DynamicCache``, SDPA with the padding mask), ``steps`` greedy-shaped
  steps each; timed eagerly step by step (device synchronised), not replayed
  from CUDA graphs as the ``e2e`` phase's TPOT: transformers' padded-mask
  construction reads the mask on the host, which a graph capture refuses, so
  both sides run the same eager loop;
- **KV bytes** of the batch: ``TCACache.memory_report()`` vs the dense cache.

Each timed call runs once untimed first (FlexAttention compiles for the
first shapes it meets). A method that fails (e.g. the dense padded prefill's
``B * L^2`` mask running out of memory) is recorded with its error.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .bench_models import fastest_dense_sdpa, llama_8b_shaped
from .budgets import HeadBudgets
from .cache import TCACache
from .config import TCAConfig
from .hfcompat import cache_kwargs
from .integration import apply, remove


def batch_lengths(size: int, lo: int, hi: int, seed: int) -> list[int]:
    """``size`` row lengths drawn uniformly from ``[lo, hi]``."""
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(size)]


def left_padded(lengths: list[int], vocab: int, device: torch.device, gen: torch.Generator
                ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Random rows and their left-padded batch: ``(rows, ids [B, L], mask [B, L])``."""
    width = max(lengths)
    rows = [torch.randint(1, vocab, (1, n), device=device, generator=gen) for n in lengths]
    ids = torch.zeros(len(lengths), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for r, x in enumerate(rows):
        ids[r, width - x.shape[1]:] = x[0]
        mask[r, width - x.shape[1]:] = 1
    return rows, ids, mask


def _ms(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, (time.perf_counter() - start) * 1e3


def _twice(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """The second of two calls, timed (the first compiles what it meets)."""
    fn()
    return _ms(fn, device)


def _prefill(model, ids: torch.Tensor, mask: torch.Tensor | None, cache: Any) -> torch.Tensor:
    kwargs = {} if mask is None else {"attention_mask": mask}
    return model(ids, use_cache=True, logits_to_keep=1, **kwargs, **cache_kwargs(model, cache)).logits[:, -1]


def _decode_ms(model, cache: Any, logits: torch.Tensor, mask: torch.Tensor, lengths: list[int], steps: int,
               device: torch.device) -> float:
    """Milliseconds of ``steps`` eager decode steps of the padded batch (greedy tokens, row positions):
    ``steps`` times the median step, so that a one-time cost (the first step JIT-compiles the Triton
    decode and compression kernels: seconds) does not count as decode time."""
    positions = torch.tensor(lengths, device=device).unsqueeze(1)
    width = mask.shape[1]
    token = logits.argmax(-1, keepdim=True)
    ones = torch.ones(mask.shape[0], steps, dtype=mask.dtype, device=device)
    times = []
    for i in range(steps):
        step_mask = torch.cat([mask, ones[:, : i + 1]], 1)
        out, ms = _ms(lambda: model(token, attention_mask=step_mask, position_ids=positions + i,
                                    cache_position=torch.tensor([width + i], device=device), use_cache=True,
                                    **cache_kwargs(model, cache)).logits[:, -1], device)
        token = out.argmax(-1, keepdim=True)
        times.append(ms)
    return statistics.median(times) * steps


def _dense_bytes(cache: Any) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _safely(rows: list[dict[str, Any]], base: dict[str, Any], method: str, fn: Callable[[], dict[str, Any]],
            device: torch.device) -> None:
    try:
        rows.append({**base, "method": method, **fn()})
    except Exception as err:  # recorded, not fatal: the other rows still stand
        rows.append({**base, "method": method, "ms": float("nan"), "error": repr(err)[-1500:]})
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def batch_bench_rows(batch_sizes: list[int], lo: int, hi: int, num_layers: int, keep: float, window: int,
                     device: torch.device, dtype: torch.dtype, smoke: bool, decode_steps: int,
                     seed: int = 0) -> list[dict[str, Any]]:
    """Rows of the ``batch`` phase (module docstring), one set per batch size."""
    from transformers import DynamicCache

    model = llama_8b_shaped(num_layers, device, dtype, smoke, hi + decode_steps + 16)
    vocab = model.config.vocab_size
    config = TCAConfig(block_size=32 if smoke else 128, window=window)
    budgets = HeadBudgets.uniform(num_layers, model.config.num_key_value_heads, keep, config)
    gen = torch.Generator(device=device).manual_seed(seed)
    batches = [(size, batch_lengths(size, lo, hi, seed + size)) for size in batch_sizes]
    data = {size: left_padded(lengths, vocab, device, gen) for size, lengths in batches}
    rows: list[dict[str, Any]] = []

    def dense_cache():
        return DynamicCache(config=model.config)

    # Dense first (the model as built), then TCA (apply), then the model is handed back (remove).
    for size, lengths in batches:
        singles, ids, mask = data[size]
        base = {"phase": "batch", "batch": size, "lengths": lengths, "length": max(lengths), "layers": num_layers}
        model.set_attn_implementation("sdpa")

        def dense_padded():
            _, ms = _twice(lambda: _prefill(model, ids, mask, dense_cache()), device)
            cache = dense_cache()
            logits = _prefill(model, ids, mask, cache)
            tok_ms = _decode_ms(model, cache, logits, mask, lengths, decode_steps, device)
            return {"ms": ms, "decode_tokens_per_s": size * decode_steps / (tok_ms / 1e3),
                    "kv_bytes": _dense_bytes(cache)}

        _safely(rows, base, "dense_sdpa_padded", dense_padded, device)
        model.set_attn_implementation(fastest_dense_sdpa())
        _safely(rows, base, "dense_sdpa_rows_sum",
                lambda: {"ms": sum(_twice(lambda x=x: _prefill(model, x, None, dense_cache()), device)[1]
                                   for x in singles)}, device)
    apply(model, budgets=budgets)
    try:
        for size, lengths in batches:
            singles, ids, mask = data[size]
            base = {"phase": "batch", "batch": size, "lengths": lengths, "length": max(lengths),
                    "layers": num_layers}

            def tca_padded():
                _, ms = _twice(lambda: _prefill(model, ids, mask, TCACache(model)), device)
                cache = TCACache(model, reserve_tokens=decode_steps)
                logits = _prefill(model, ids, mask, cache)
                if not torch.isfinite(logits).all():
                    raise RuntimeError("TCA batch prefill gave non-finite logits")
                tok_ms = _decode_ms(model, cache, logits, mask, lengths, decode_steps, device)
                total = cache.memory_report().total
                return {"ms": ms, "decode_tokens_per_s": size * decode_steps / (tok_ms / 1e3),
                        "kv_bytes": total.bytes_used, "kv_dense_bytes": total.dense_bytes,
                        "kept_fraction": total.kept_fraction}

            _safely(rows, base, "tca_padded", tca_padded, device)
            _safely(rows, base, "tca_rows_sum",
                    lambda: {"ms": sum(_twice(lambda x=x: _prefill(model, x, None, TCACache(model)), device)[1]
                                       for x in singles)}, device)
    finally:
        remove(model)
    return rows


def print_batch(rows: list[dict[str, Any]]) -> None:
    by = {(r["batch"], r["method"]): r for r in rows}
    for size in sorted({r["batch"] for r in rows}):
        lengths = by[(size, "tca_padded")]["lengths"] if (size, "tca_padded") in by else []
        print(f"\nbatch {size}, lengths {lengths}")
        for method in ("tca_padded", "tca_rows_sum", "dense_sdpa_padded", "dense_sdpa_rows_sum"):
            r = by.get((size, method))
            if r is None:
                continue
            if "error" in r:
                print(f"  {method:<22} failed: {r['error'][:100]}")
                continue
            extra = ""
            if "decode_tokens_per_s" in r:
                extra = f"  decode {r['decode_tokens_per_s']:.1f} tok/s  KV {r['kv_bytes'] / 2**20:.1f} MiB"
            print(f"  {method:<22} prefill {r['ms']:>10.1f} ms{extra}")
