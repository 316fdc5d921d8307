"""Slow, obviously-correct TCA: the yardstick every fast path is tested against.

Loops over batch, heads and blocks in Python, builds the explicit boolean
``[L, L]`` mask and runs float64 softmax attention. Small shapes only.
"""

from __future__ import annotations

import torch

from .config import SelectionConfig


def reference_importance(q: torch.Tensor, k: torch.Tensor, scaling: float, num_queries: int = 1,
                         aggregation: str = "mean", num_spread: int = 0, window: int = 0) -> torch.Tensor:
    """float64 ``[B, H_kv, L]``: mean softmax row of the observation queries, per KV head.

    The last ``num_queries`` queries count their whole causal row; ``num_spread``
    queries at ``window + round_down((L - m - 1 - window) * t / (num_spread - 1))``,
    ``t = 0..num_spread-1`` (duplicates once; the last one alone when ``num_spread = 1``)
    count only keys ``<= i - window``. Rows are averaged over all observation queries.
    """
    bsz, hq, length, _ = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    m = min(num_queries, length)
    lo, hi = window, length - m - 1
    spread = []
    if num_spread == 1 and hi >= lo:
        spread = [hi]
    elif num_spread > 1 and hi >= lo:
        spread = sorted({lo + (hi - lo) * t // (num_spread - 1) for t in range(num_spread)})
    observers = [(i, False) for i in range(length - m, length)] + [(i, True) for i in spread]
    out = torch.zeros(bsz, hkv, length, dtype=torch.float64)
    for b in range(bsz):
        for kvh in range(hkv):
            rows = []
            for h in range(kvh * g, (kvh + 1) * g):
                acc = torch.zeros(length, dtype=torch.float64)
                for i, far_only in observers:
                    logits = (k[b, kvh, : i + 1].double() @ q[b, h, i].double()) * scaling
                    row = torch.softmax(logits, 0)
                    if far_only:
                        row[max(i - window + 1, 0):] = 0.0
                    acc[: i + 1] += row
                rows.append(acc / len(observers))
            stacked = torch.stack(rows)
            out[b, kvh] = stacked.mean(0) if aggregation == "mean" else stacked.amax(0)
    return out


def reference_keep(importance: torch.Tensor, probs_hk: torch.Tensor, knobs: SelectionConfig) -> torch.Tensor:
    """bool ``[B, H_kv, L]``: the global subset (final-window positions are False).

    Args:
        importance: ``[B, H_kv, L]`` importance rows.
        probs_hk: ``[H_kv, b + 1]`` budget distributions of the layer.
        knobs: the selection's knobs; of them this reads the block size, window,
            ``alpha``, ``normalize``, ``pool_kernel`` (tokens inside a block are
            ranked by the mean importance of that many positions centred on them,
            zeros outside ``[0, L)``), ``span`` (every chosen token also keeps its
            ``span`` neighbours on each side that lie in the global region) and
            ``anchor_blocks`` (with more blocks than the prompt has, ranks take the
            quantile ladder of that many blocks from the top until the prompt's own
            ladder total is spent). The guard floor is not modelled.
    """
    block_size, window, alpha, normalize = knobs.block_size, knobs.window, knobs.alpha, knobs.normalize
    pool, span, anchor_blocks = knobs.pool_kernel, knobs.span, knobs.anchor_blocks
    bsz, hkv, length = importance.shape
    global_len = max(length - window, 0)
    keep = torch.zeros(bsz, hkv, length, dtype=torch.bool)
    if global_len == 0:
        return keep
    n = -(-global_len // block_size)
    for b in range(bsz):
        for h in range(hkv):
            s = importance[b, h, :global_len].double()
            cdf = probs_hk[h].double().cumsum(0)
            ladder = _quantile_ladder(cdf, n, block_size)
            if anchor_blocks > n:
                left, anchored = sum(ladder), []
                for cap in _quantile_ladder(cdf, anchor_blocks, block_size)[:n]:
                    anchored.append(min(cap, left))
                    left -= anchored[-1]
                ladder = anchored
            blocks = [s[j * block_size: (j + 1) * block_size] for j in range(n)]
            mass = [float(blk.sum()) for blk in blocks]
            top = max(mass)
            scores = []
            for blk, sj in zip(blocks, mass, strict=True):
                spread = 1.0 - float(blk.square().sum()) / sj**2 if sj > 0 else 0.0
                sj_term = sj / top if normalize and top > 0 else sj
                scores.append((1 - alpha) * sj_term + alpha * spread)
            order = sorted(range(n), key=lambda j: (-scores[j], j))
            full = importance[b, h].double()
            r = pool // 2
            for rank, j in enumerate(order):
                blk = blocks[j]
                t = min(ladder[rank], len(blk))

                start = j * block_size
                pooled = [float(full[max(start + i - r, 0): start + i + r + 1].sum()) / pool
                          for i in range(len(blk))]
                within = sorted(range(len(blk)), key=lambda i: (-pooled[i], i))[:t]
                for i in within:
                    pos = j * block_size + i
                    for near in range(max(pos - span, 0), min(pos + span, global_len - 1) + 1):
                        keep[b, h, near] = True
    return keep


def _quantile_ladder(cdf: torch.Tensor, count: int, block_size: int) -> list[int]:
    return [next((kk for kk in range(block_size + 1) if cdf[kk] >= 1.0 - (r + 0.5) / count), block_size)
            for r in range(count)]


def reference_mask(keep: torch.Tensor, window: int, num_q_heads: int,
                   q_positions: torch.Tensor | None = None) -> torch.Tensor:
    """bool ``[B, H_q, Q, L]``: query i sees kept keys ``<= i - w`` and keys ``(i - w, i]``.

    ``q_positions`` (int64 ``[Q]``) selects query rows; default: all ``L``.
    """
    bsz, hkv, length = keep.shape
    g = num_q_heads // hkv
    i = torch.arange(length, device=keep.device) if q_positions is None else q_positions
    i = i[:, None]
    j = torch.arange(length, device=keep.device)[None, :]
    local = (j <= i) & (j > i - window)
    far = j <= i - window
    mask = local | (far & keep[:, :, None, :])
    return mask.repeat_interleave(g, dim=1)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                        scaling: float) -> torch.Tensor:
    """float64 softmax attention under an explicit boolean mask.

    Args:
        q: ``[B, H_q, Lq, D]``; k, v: ``[B, H_kv, Lk, D]``; mask: ``[B, H_q, Lq, Lk]``.

    Returns:
        float64 ``[B, H_q, Lq, D]``.
    """
    g = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(g, dim=1)
    vv = v.double().repeat_interleave(g, dim=1)
    logits = (q.double() @ kk.transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, -1) @ vv


def causal_mask(q_len: int, k_len: int) -> torch.Tensor:
    """bool ``[q_len, k_len]``: the last query sits at position ``k_len - 1``."""
    offset = k_len - q_len
    return torch.arange(k_len)[None, :] <= (torch.arange(q_len)[:, None] + offset)


def reference_tca(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, probs_hk: torch.Tensor,
                  knobs: SelectionConfig, *, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TCA prefill end to end: (float64 output ``[B, H_q, L, D]``, keep ``[B, H_kv, L]``)."""
    s = reference_importance(q, k, scaling, knobs.num_queries, knobs.aggregation, knobs.num_spread, knobs.window)
    keep = reference_keep(s, probs_hk, knobs)
    mask = reference_mask(keep, knobs.window, q.shape[1])
    return reference_attention(q, k, v, mask, scaling), keep


def reference_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept_after_prefill: torch.Tensor,
                     chunk_sizes: list[int], keep_per_block: list[int], *, scaling: float, block_size: int,
                     window: int, num_queries: int = 1, aggregation: str = "mean", grace_blocks: int = 0
                     ) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """Chunks appended to a pruned cache, by the rule of ``docs/chunked_prefill.md``, in float64.

    Sets of positions, one query at a time, no buffers. A chunk of one token
    is a decode step.

    Args:
        q: ``[B, H_q, T, D]``; k, v: ``[B, H_kv, T, D]``, every position (RoPE applied).
        kept_after_prefill: bool ``[B, H_kv, L0]``: what the cache holds after a
            prefill of ``L0`` tokens (its global subset and its final window).
        chunk_sizes: sizes of the chunks that follow; they sum to ``T - L0``.
        keep_per_block: ``t`` per KV head.
        scaling, block_size, window: softmax scale, ``b``, ``w``.
        num_queries: ``m``; a chunk's last ``min(m, c)`` queries score the
            blocks that leave the window.
        aggregation: ``"mean"`` or ``"max"`` over a KV head's query heads.
        grace_blocks: a block is compressed once it lies this many blocks past
            the window (``TCAConfig.grace_blocks``).

    Returns:
        (float64 output ``[B, H_q, T - L0, D]``, bool ``[B, H_kv, T]`` kept set
        after each chunk, the smallest gap between the ``t``-th and ``t + 1``-th
        importance of any compressed block relative to the block's largest:
        below float32 rounding the cut is a tie that either side may break.)
    """
    bsz, hq, total, _ = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    prefill = kept_after_prefill.shape[-1]
    if sum(chunk_sizes) != total - prefill:
        raise ValueError(f"chunks {chunk_sizes} do not cover positions {prefill}..{total - 1}")
    kept = torch.zeros(bsz, hkv, total, dtype=torch.bool)
    kept[..., :prefill] = kept_after_prefill
    first_uncompressed = prefill - min(prefill, window)
    out = torch.zeros(bsz, hq, total - prefill, q.shape[-1], dtype=torch.float64)
    states, min_gap, n = [], float("inf"), prefill
    for c in chunk_sizes:
        observers = list(range(n + c - min(num_queries, c), n + c))
        score = torch.zeros(bsz, hkv, g, total, dtype=torch.float64)
        for b in range(bsz):
            for h in range(hq):
                kvh = h // g
                for i in range(n, n + c):
                    sees = kept[b, kvh].clone()
                    sees[n: i + 1] = True
                    sees[i + 1:] = False
                    idx = sees.nonzero()[:, 0]
                    probs = torch.softmax((k[b, kvh, idx].double() @ q[b, h, i].double()) * scaling, 0)
                    out[b, h, i - prefill] = probs @ v[b, kvh, idx].double()
                    if i in observers:
                        score[b, kvh, h % g, idx] += probs / len(observers)
        importance = score.mean(2) if aggregation == "mean" else score.amax(2)
        kept[..., n: n + c] = True
        n += c
        while first_uncompressed + block_size - 1 <= n - 1 - (window + grace_blocks * block_size):
            block = list(range(first_uncompressed, first_uncompressed + block_size))
            for b in range(bsz):
                for kvh in range(hkv):
                    t = keep_per_block[kvh]
                    ranked = sorted(block, key=lambda p, b=b, kvh=kvh: (-float(importance[b, kvh, p]), p))
                    for p in ranked[t:]:
                        kept[b, kvh, p] = False
                    if 0 < t < block_size:
                        top = float(importance[b, kvh, ranked[0]])
                        gap = float(importance[b, kvh, ranked[t - 1]] - importance[b, kvh, ranked[t]])
                        min_gap = min(min_gap, gap / top if top > 0 else 0.0)
            first_uncompressed += block_size
        states.append(kept.clone())
    return out, states, min_gap
