"""Question-agnostic selection by reconstruction, for a prompt that later turns will question.

TCA's prefill ranks the prompt's tokens by the attention of its own last
queries. In a conversation that appends every turn to one ``TCACache``, the
first turn is pruned before the question that needs it exists
(``docs/chunked_prefill.md``, "Who scores a block"). This module scores the
prompt instead by what the model looks at when it *repeats* it (the idea of
KVzip, Kim et al. 2025, written here on TCA's selection): after the prefill, a
pass feeds a repeat instruction followed by the prompt itself, teacher-forced,
attending to the prompt's full (not yet pruned) K/V; a prompt position's score
is the largest attention any query of that pass gives it (``reduce="max"``:
over the queries and the ``g`` query heads of its KV head). Filler that occurs
many times is copied from any of its copies and scores low; a fact stated
once must be read where it stands. TCA's per-block budgets then apply to this
score exactly as to the last queries' (``selection.keep_from_importance``), so
the cache holds as many tokens as the ordinary prefill would keep.

Cost: the prompt's full K/V of every layer is held until the pass is done (as
a dense prefill would), and the pass reads the prompt once more
(``context_chunk`` bounds its attention to ``L x (chunk + prompt)`` scores at a time).
On CUDA the pass runs on FlexAttention and a Triton score kernel
(``triton_reconstruct``); the eager ``"math"`` form is the CPU path and the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

from .cache import TCACache
from .checks import check_choice, check_count
from .config import SelectionConfig
from .hfcompat import cache_kwargs, output_cache
from .layer import tca_layers
from .selection import (
    Selection,
    budget_ladder,
    dilate_keep,
    global_region_length,
    keep_from_importance,
    pack_positions,
    pool_importance,
    rank_of,
    to_blocks,
)

try:
    from . import triton_reconstruct
except ImportError:  # no Triton (e.g. a CPU-only install): the "math" backend remains
    triton_reconstruct = None

REDUCTIONS = ("max", "mean")
QUOTAS = ("blocks", "head")
SCORE_BACKENDS = ("auto", "triton", "math")


def _check(input_ids: torch.Tensor, prompt_ids: torch.Tensor) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with length >= 1, got {tuple(input_ids.shape)}")
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] not in (1, input_ids.shape[0]):
        raise ValueError(f"prompt_ids must be [1 or batch, length], got {tuple(prompt_ids.shape)}")


def score_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: str = "auto") -> str:
    """The ``score_rows`` backend that runs: ``"auto"`` resolved, an impossible ``"triton"`` refused.

    ``"auto"``: ``"triton"`` on CUDA where ``triton_reconstruct.supported``
    holds, else ``"math"``. An explicit ``"triton"`` also runs CPU tensors
    under Triton's interpreter (``TRITON_INTERPRET=1``; slow, for tests).
    """
    check_choice("backend", backend, SCORE_BACKENDS)
    fused = triton_reconstruct is not None and triton_reconstruct.supported(query, key, value)
    if backend == "auto":
        return "triton" if fused and query.is_cuda else "math"
    if backend == "triton" and not fused:
        raise ValueError("score_rows backend 'triton' needs Triton, CUDA tensors (or CPU ones with "
                         "TRITON_INTERPRET=1), a power-of-two head dim in 16..256 and one float16/bfloat16/float32 "
                         f"dtype for q/k/v (got head dim {query.shape[-1]}, {query.dtype}/{key.dtype}/{value.dtype} "
                         f"on {query.device.type}); use backend='math' or 'auto' otherwise")
    return backend


def score_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, context: int,
               scored_from: int, reduce: str = "max", query_chunk: int = 256, backend: str = "auto"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of a pass on top of ``context`` cached positions, and its score of those positions.

    Args:
        query: ``[B, H_q, Lq, D]``, the pass's queries at positions ``context + i``.
        key, value: ``[B, H_kv, context + Lq, D]``, the cached context then the pass.
        scaling: softmax scale.
        context: number of cached context positions (the scored ones).
        scored_from: only queries ``i >= scored_from`` score (the repeated text,
            not the instruction before it).
        reduce: ``"max"`` or ``"mean"`` over those queries and the ``g`` query heads.
        query_chunk: queries per score tile (``"math"`` only).
        backend: ``"auto"`` (``score_backend``), ``"triton"``
            (``triton_reconstruct``: FlexAttention and a score kernel) or
            ``"math"`` (float32 tensor ops, score tiles materialised: the CPU
            path and the reference).

    Returns:
        (``[B, H_q, Lq, D]`` attention output in ``query``'s dtype, float32
        ``[B, H_kv, context]`` scores).
    """
    check_choice("reduce", reduce, REDUCTIONS)
    if score_backend(query, key, value, backend) == "triton":
        return triton_reconstruct.fused_rows(query, key, value, scaling, context, scored_from, reduce)
    bsz, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    g = hq // hkv
    k = key.float().repeat_interleave(g, dim=1)
    v = value.float().repeat_interleave(g, dim=1)
    out = torch.empty_like(query)
    score = torch.zeros(bsz, hkv, context, dtype=torch.float32, device=query.device)
    counted = 0
    k_pos = torch.arange(lk, device=query.device)
    for start in range(0, lq, query_chunk):
        stop = min(start + query_chunk, lq)
        q_pos = context + torch.arange(start, stop, device=query.device)
        logits = torch.matmul(query[:, :, start:stop].float(), k.transpose(-1, -2)) * scaling
        logits = logits.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        probs = logits.softmax(-1)
        out[:, :, start:stop] = torch.matmul(probs, v).to(query.dtype)
        first = max(scored_from, start)
        if first < stop:
            part = probs[:, :, first - start:, :context].reshape(bsz, hkv, g * (stop - first), context)
            if reduce == "max":
                score = torch.maximum(score, part.amax(2))
            else:
                score += part.sum(2)
                counted += g * (stop - first)
    if reduce == "mean" and counted:
        score /= counted
    return out, score


@torch.no_grad()
def reconstruction_importance(model: torch.nn.Module, past: Sequence[tuple[torch.Tensor, torch.Tensor]],
                              context_ids: torch.Tensor, prompt_ids: torch.Tensor, reduce: str = "max",
                              context_chunk: int | None = None, query_chunk: int = 256) -> list[torch.Tensor]:
    """Score every context position by the attention of a pass that repeats the context.

    Args:
        model: a transformers decoder (prepared by ``tca_flex.apply`` or not:
            the pass runs through its own attention function).
        past: per layer ``(key, value)``, ``[B, H_kv, L, D]``, the context's
            full K/V (RoPE applied), at positions ``0 .. L - 1``.
        context_ids: int64 ``[B, L]``, the context that is repeated.
        prompt_ids: int64 ``[1 or B, R]``, the repeat instruction.
        reduce: ``"max"`` or ``"mean"`` (``score_rows``).
        context_chunk: repeat the context in pieces of this many tokens, each
            after the instruction and on top of the full context (KVzip's
            chunked scoring); ``None``: in one piece.
        query_chunk: queries per score tile.

    Returns:
        per layer, float32 ``[B, H_kv, L]``.
    """
    from .integration import attention_routed  # integration imports the cache, which imports nothing of ours

    _check(context_ids, prompt_ids)
    bsz, length = context_ids.shape
    prompt_ids = prompt_ids.expand(bsz, -1).to(context_ids.device)
    r = prompt_ids.shape[1]
    check_count("context_chunk", context_chunk, optional=True)
    piece = length if context_chunk is None else context_chunk
    scores: list[torch.Tensor | None] = [None] * len(past)
    counts: list[int] = [0] * len(past)

    def capture(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Any, dropout: float = 0.0, scaling: float | None = None, **kwargs: Any):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out, score = score_rows(query, key, value, scale, length, r, reduce, query_chunk)
        i = module.layer_idx
        if scores[i] is None:
            scores[i] = score
        elif reduce == "max":
            scores[i] = torch.maximum(scores[i], score)
        else:  # a running mean over pieces, weighted by their scored queries
            scores[i] = (scores[i] * counts[i] + score * (query.shape[2] - r)) / (counts[i] + query.shape[2] - r)
        counts[i] += query.shape[2] - r
        return out.transpose(1, 2).contiguous(), None

    with attention_routed(model, "tca_reconstruct", capture):
        for start in range(0, length, piece):
            ids = torch.cat([prompt_ids, context_ids[:, start:start + piece]], dim=1)
            cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in past])
            positions = torch.arange(length, length + ids.shape[1], device=ids.device).expand(bsz, -1)
            model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                  **cache_kwargs(model, cache))
    if any(s is None for s in scores):
        raise RuntimeError("the repeat pass did not reach every layer's attention")
    return scores  # type: ignore[return-value]


def head_top_keep(s: torch.Tensor, cdf_hk: torch.Tensor, knobs: SelectionConfig, global_len: int) -> torch.Tensor:
    """Per KV head, the top tokens of the whole global region by pooled importance, as many as the
    budget ladder would keep there in total (no per-block quota), each with its ``span`` neighbours
    (``dilate_keep``), as the per-block quota keeps them.

    Returns bool ``[B, H_kv, G]``.
    """
    n = -(-global_len // knobs.block_size)
    ladder = budget_ladder(cdf_hk.to(s.device), n, knobs.anchor_blocks)
    sizes = to_blocks(torch.ones(global_len, device=s.device), knobs.block_size, 0.0).sum(-1)
    total = torch.minimum(ladder, sizes.long()).sum(-1)  # [H_kv]: the ladder's tokens, ranks capped by sizes
    pooled = pool_importance(s, knobs.pool_kernel)[..., :global_len]
    return dilate_keep(rank_of(pooled) < total.view(1, -1, 1), knobs.span)


def selection_from_importance(model: torch.nn.Module, importance: Sequence[torch.Tensor], length: int,
                              capacity_multiple: int = 128, quota: str = "blocks") -> list[Selection]:
    """Every layer's global subset from a per-layer importance, with the layer's own budgets and knobs.

    Args:
        model: prepared by ``tca_flex.apply`` (its ``TCALayer`` records give
            each layer's budget distributions and selection knobs).
        importance: per layer, ``[B, H_kv, length]`` non-negative scores.
        length: the prompt length ``L`` (must exceed the window).
    """
    check_choice("quota", quota, QUOTAS)
    records = tca_layers(model)
    if len(records) != len(importance):
        raise ValueError(f"{len(importance)} importance rows for {len(records)} TCA layers")
    out = []
    for record, s in zip(records, importance, strict=True):
        knobs = record.config.selection
        global_len = global_region_length(length, knobs.window)
        if global_len == 0:
            raise ValueError(f"a prompt of {length} tokens fits the window ({knobs.window}): nothing to select")
        if quota == "blocks":
            keep = keep_from_importance(s, record.cdf, knobs, global_len)
        else:
            keep = head_top_keep(s, record.cdf, knobs, global_len)
        capacity = -(-global_len // capacity_multiple) * capacity_multiple
        positions, counts = pack_positions(keep, capacity)
        out.append(Selection(positions=positions, counts=counts, importance=s))
    return out


@torch.no_grad()
def prefill_by_reconstruction(model: torch.nn.Module, input_ids: torch.Tensor, cache: Any,
                              prompt_ids: torch.Tensor, reduce: str = "max", context_chunk: int | None = None,
                              quota: str = "blocks", window_prior: bool = True, **model_kwargs: Any
                              ) -> torch.Tensor:
    """Prefill ``input_ids`` into an empty ``TCACache``, keeping what a repeat of the prompt reads.

    The prefill itself is TCA's (sparse above ``config.dense_up_to``), run
    into a temporary ``DynamicCache`` so every layer's full K/V survives it;
    ``reconstruction_importance`` then scores the prompt by a pass that
    repeats it after ``prompt_ids``, and each layer of ``cache`` keeps the
    global subset that score selects under the layer's budgets, plus the
    final window (``TCACacheLayer.finish_prefill``). With ``window_prior``
    the final window's blocks, when later tokens push them out of the window,
    keep their top tokens by the same score (``TCACacheLayer.set_prior``)
    rather than by the queries that push them out. Later turns append to
    ``cache`` as usual. A prompt that fits the window is kept whole.

    Args:
        model: prepared by ``tca_flex.apply``.
        input_ids: int64 ``[B, L]``, unpadded rows.
        cache: an empty ``tca_flex.TCACache(model)``.
        prompt_ids: int64 ``[1 or B, R]``, the repeat instruction, e.g. the
            tokens of ``"\\nUser: Repeat the previous text.\\nAssistant:"``.
        reduce, context_chunk: ``reconstruction_importance``.
        quota: ``"blocks"`` (TCA's per-block ladder) or ``"head"`` (``head_top_keep``).
        window_prior: score the final window's blocks by reconstruction too.
        **model_kwargs: passed to the prefill (not ``attention_mask``).

    Returns:
        ``[B, V]`` logits of the last prompt position.
    """
    _check(input_ids, prompt_ids)
    if "attention_mask" in model_kwargs:
        raise ValueError("prefill_by_reconstruction takes unpadded rows only: drop attention_mask")
    # Checked here, not where they are used: a prompt that fits the window never gets there.
    check_choice("reduce", reduce, REDUCTIONS)
    check_choice("quota", quota, QUOTAS)
    check_count("context_chunk", context_chunk, optional=True)
    records = tca_layers(model)
    if not records:
        raise ValueError("prefill_by_reconstruction: this model was not prepared by tca_flex.apply")
    guarded = sorted({r.config.guard_floor for r in records if r.config.guard_floor is not None})
    if guarded:
        # The guard tops up what the prompt's last query reads; this selection scores by the repeat
        # pass and never sees that query, so the guard's guarantee would not hold.
        raise ValueError(f"prefill_by_reconstruction cannot apply guard_floor={guarded[0]} (the guard measures the "
                         "prompt's last query, which the repeat pass's selection does not see): apply the budgets "
                         "with guard_floor=None (budgets.with_config(guard_floor=None)) for this call, or prefill "
                         "the ordinary way")
    if not isinstance(cache, TCACache):
        raise TypeError(f"prefill_by_reconstruction fills a tca_flex.TCACache(model), got {type(cache).__name__}")
    cache.check_model(model)
    if cache.get_seq_length() != 0:
        raise ValueError("prefill_by_reconstruction needs an empty TCACache (later turns append as usual)")
    full = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, full), **model_kwargs)
    full = output_cache(out)
    past = [(layer.keys, layer.values) for layer in full.layers]
    length = input_ids.shape[1]
    if length > records[0].config.dense_up_to:
        importance = reconstruction_importance(model, past, input_ids, prompt_ids, reduce, context_chunk)
        selections: list[Selection | None] = list(selection_from_importance(model, importance, length,
                                                                                quota=quota))
    else:
        selections = [None] * len(past)
    for i, (layer, (k, v), sel) in enumerate(zip(cache.layers, past, selections, strict=True)):
        layer.lazy_initialization(k, v)
        layer.finish_prefill(k, v, sel)
        if sel is not None and window_prior:
            layer.set_prior(importance[i])  # the final window's blocks: the same score when they leave
    return out.logits[:, -1]
