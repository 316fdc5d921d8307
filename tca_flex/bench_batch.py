"""Benchmark phase ``batch``: mixed-length batches, left-padded as ``generate`` gives them.

    python -m tca_flex.bench --phases batch                   # CUDA: 2-layer LLaMA-3.1-8B shapes, 16K-64K
    python -m tca_flex.bench --phases batch --smoke           # tiny CPU shapes, for CI
    python -m tca_flex.bench --phases batch --batch-sizes 4 8 --batch-range 16384 65536

Per batch size, row lengths are drawn (seeded) from the range and the rows are
left-padded to the longest. On a LLaMA-3.1-8B-shaped model with random weights:

- **prefill** (whole forward, ``logits_to_keep=1``): TCA over the padded batch
  with a ``TCACache`` (each row's attention on its own tokens, ``attention.py``;
  projections and MLPs on the real tokens only, ``unpad.py``) vs the
  sum of its rows' single-request TCA prefills; dense SDPA over the padded
  batch (transformers' 4-D mask) vs the sum of per-row dense prefills
  (maskless SDPA, the fastest dense kernel);
- **decode**: tokens/s of the batch over ``TCACache`` vs dense over the padded
  batch, ``steps`` greedy-shaped steps each, two ways: an eager step-by-step loop
  (``DynamicCache`` for dense; ``steps`` times the median step, so the first step's
  Triton JIT does not count), and one step replayed from a CUDA graph ``steps`` times
  (``_replayed_decode_ms``; dense on a ``StaticCache`` with the padding mask, the
  graph-safe dense cache, and, as the fair bound for dense, the same K/V read by SDPA's
  maskless native-GQA kernel, every padded slot included), where transformers'
  padded-mask construction and our mask check no longer run on the host;
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

from .bench_models import captured_decode, fastest_dense_sdpa, llama_8b_shaped, one_step_dense, static_copy
from .budgets import HeadBudgets
from .cache import TCACache
from .config import TCAConfig
from .hfcompat import cache_kwargs
from .integration import apply, remove
from .memory import cache_bytes


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
        out, ms = _ms(lambda token=token, step_mask=step_mask, i=i: model(
            token, attention_mask=step_mask, position_ids=positions + i,
            cache_position=torch.tensor([width + i], device=device), use_cache=True,
            **cache_kwargs(model, cache)).logits[:, -1], device)
        token = out.argmax(-1, keepdim=True)
        times.append(ms)
    return statistics.median(times) * steps


def _replayed_decode_ms(model, cache: Any, logits: torch.Tensor, mask: torch.Tensor, lengths: list[int],
                        steps: int, device: torch.device, warmup: int = 3, masked: bool = True) -> float:
    """Milliseconds of ``steps`` decode steps of the padded batch, each replayed from one CUDA graph
    (as the ``e2e`` phase's TPOT): ``warmup`` eager steps with their exact masks (which also check
    them), one captured step, then replays of it with its inputs (each row's greedy token at its next
    position; the mask, which the captured step no longer reads on the host, one token wider than the
    cache). A ``TCACache`` keeps its block compression in the graph (it decides on the device whether a
    block leaves) and its host counters advance per replay; a dense ``StaticCache`` rewrites the
    captured slot. ``masked=False``: no mask at all (``one_step_dense``'s preallocated cache, whose
    replays rewrite one slot): dense attention over every padded position at the speed of SDPA's
    maskless GQA kernel. CPU (CI): the same steps, eager, each timed."""
    from .cache import TCACache

    tca = isinstance(cache, TCACache)
    width = mask.shape[1]
    token = logits.argmax(-1, keepdim=True)
    positions = torch.tensor(lengths, device=device).unsqueeze(1)
    static_width = None if tca or not masked else cache.layers[0].keys.shape[-2]  # its preallocated capacity
    ones = torch.ones(mask.shape[0], warmup + 1 + steps, dtype=mask.dtype, device=device)

    def step_inputs(i: int) -> dict[str, Any]:
        seen = torch.cat([mask, ones[:, : i + 1]], 1)
        if static_width is not None:  # a static cache's mask spans its capacity (future slots masked by causality)
            seen = torch.cat([seen, seen.new_zeros(seen.shape[0], static_width - seen.shape[1])], 1)
        return {"input_ids": token, **({"attention_mask": seen} if masked else {}), "position_ids": positions + i,
                "cache_position": torch.tensor([width + i], device=device), "use_cache": True, "logits_to_keep": 1,
                **cache_kwargs(model, cache)}

    if device.type != "cuda":
        times = []
        for i in range(steps):
            _, ms = _ms(lambda i=i: model(**step_inputs(i)), device)
            times.append(ms)
        return sum(times)
    inputs = step_inputs(warmup)  # the captured step's inputs, made once: the graph reads these tensors
    graph = captured_decode(lambda i: model(**(inputs if i == warmup else step_inputs(i))), cache, warmup)[None]
    if tca and cache.replayable_steps() < steps:
        raise RuntimeError("the TCACache would grow during replays: reserve more tokens")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graph.replay()
        if tca:
            cache.replayed()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _safely(rows: list[dict[str, Any]], base: dict[str, Any], method: str, fn: Callable[[], dict[str, Any]],
            device: torch.device) -> None:
    try:
        rows.append({**base, "method": method, **fn()})
    except Exception as err:  # recorded, not fatal: the other rows still stand
        rows.append({**base, "method": method, "ms": float("nan"), "error": repr(err)[-1500:]})
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _rows_sum(model, singles: list[torch.Tensor], make_cache: Callable[[], Any], device: torch.device
              ) -> dict[str, float]:
    """The rows' prefills one at a time, each timed on its second call, summed."""
    return {"ms": sum(_twice(lambda x=x: _prefill(model, x, None, make_cache()), device)[1] for x in singles)}


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

        def dense_padded(size=size, lengths=lengths, ids=ids, mask=mask):
            _, ms = _twice(lambda: _prefill(model, ids, mask, dense_cache()), device)
            cache = dense_cache()
            logits = _prefill(model, ids, mask, cache)
            static = static_copy(model, cache, ids.shape[1], device)
            tok_ms = _decode_ms(model, cache, logits, mask, lengths, decode_steps, device)
            kv_bytes = cache_bytes(cache)
            graph_ms = _replayed_decode_ms(model, static, logits, mask, lengths, decode_steps, device)
            del static
            # transformers' padded SDPA decode repeats the KV heads for the masked kernel; the same
            # cache read without a mask by the native-GQA kernel bounds what a dense padded batch costs
            model.set_attn_implementation(fastest_dense_sdpa())
            maskless_ms = _replayed_decode_ms(model, one_step_dense(cache), logits, mask, lengths, decode_steps,
                                              device, masked=False)
            model.set_attn_implementation("sdpa")
            return {"ms": ms, "decode_tokens_per_s": size * decode_steps / (tok_ms / 1e3),
                    "decode_tokens_per_s_graph": size * decode_steps / (graph_ms / 1e3),
                    "decode_tokens_per_s_graph_maskless": size * decode_steps / (maskless_ms / 1e3),
                    "kv_bytes": kv_bytes}

        _safely(rows, base, "dense_sdpa_padded", dense_padded, device)
        model.set_attn_implementation(fastest_dense_sdpa())
        _safely(rows, base, "dense_sdpa_rows_sum",
                lambda singles=singles: _rows_sum(model, singles, dense_cache, device), device)
    apply(model, budgets=budgets)
    try:
        for size, lengths in batches:
            singles, ids, mask = data[size]
            base = {"phase": "batch", "batch": size, "lengths": lengths, "length": max(lengths),
                    "layers": num_layers}

            def tca_padded(size=size, lengths=lengths, ids=ids, mask=mask):
                _, ms = _twice(lambda: _prefill(model, ids, mask, TCACache(model)), device)
                cache = TCACache(model, reserve_tokens=decode_steps)
                logits = _prefill(model, ids, mask, cache)
                if not torch.isfinite(logits).all():
                    raise RuntimeError("TCA batch prefill gave non-finite logits")
                tok_ms = _decode_ms(model, cache, logits, mask, lengths, decode_steps, device)
                total = cache.memory_report().total
                del cache
                cache = TCACache(model, reserve_tokens=decode_steps + 8)
                logits = _prefill(model, ids, mask, cache)
                graph_ms = _replayed_decode_ms(model, cache, logits, mask, lengths, decode_steps, device)
                return {"ms": ms, "decode_tokens_per_s": size * decode_steps / (tok_ms / 1e3),
                        "decode_tokens_per_s_graph": size * decode_steps / (graph_ms / 1e3),
                        "kv_bytes": total.bytes_used, "kv_dense_bytes": total.dense_bytes,
                        "kept_fraction": total.kept_fraction}

            _safely(rows, base, "tca_padded", tca_padded, device)
            _safely(rows, base, "tca_rows_sum",
                    lambda singles=singles: _rows_sum(model, singles, lambda: TCACache(model), device), device)
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
                maskless = r.get("decode_tokens_per_s_graph_maskless")
                extra = (f"  decode {r['decode_tokens_per_s']:.1f} tok/s eager, "
                         f"{r['decode_tokens_per_s_graph']:.1f} replayed"
                         + (f" ({maskless:.1f} maskless)" if maskless else "")
                         + f"  KV {r['kv_bytes'] / 2**20:.1f} MiB")
            print(f"  {method:<22} prefill {r['ms']:>10.1f} ms{extra}")
