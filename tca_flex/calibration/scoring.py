"""Retained attention mass of every candidate on one layer, without an ``L x L`` tensor.

Queries are processed in chunks of ``chunk`` rows against the causal prefix
of the keys, so extra memory is ``O(chunk * L)`` per query head plus
``O(M * L)`` for the candidates' keep masks. All candidates are measured from
the same softmax rows: the exact dense probabilities are computed once per
chunk and each candidate only sums the part it keeps.

Two criteria (``TCAConfig.mass_criterion``):

- ``"column_mean"``, the paper's cumulative column-mean attention. Column
  ``k`` has mean ``c_k = mean_{j >= k} A[j, k]`` over the queries that see
  it. A key outside the global subset is still seen by queries within the
  local window after it, so only the part of its column from queries
  ``j >= k + w`` is lost: ``a(S) = 1 - sum_{k not in S} c_k^far / sum_k c_k``.
  The full set gives 1. **Decision**: the window is credited this way
  because it is what TCA actually keeps.
- ``"lse"``, the exact per-query retained mass ``exp(LSE_sparse_i -
  LSE_dense_i) = sum_{kept} A[i, k]``, averaged (or its
  ``config.mass_quantile``) over queries ``i >= w``. **Decision**: queries in
  the first window see every key and would retain exactly 1, so they are left
  out of the statistic.

Both may sample queries (``max_queries``): evenly spaced, always including the
last position. ``None`` uses every query (exact).
"""

from __future__ import annotations

import torch

from ..attention import tca_select
from ..config import TCAConfig


def candidate_keep_masks(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, candidate_cdfs: torch.Tensor,
                         config: TCAConfig, scaling: float) -> torch.Tensor:
    """The global subset each candidate would select, via the online ``select``.

    Args:
        q_bhsd: ``[1, H_q, L, D]``; k_bhsd: ``[1, H_kv, L, D]`` (RoPE applied).
        candidate_cdfs: float64 ``[M, b + 1]``, cumulative candidate distributions
            (one candidate is tried on all KV heads at once).
        config: TCAConfig (block size, window, alpha, ...); ``L > window``.
        scaling: softmax scale.

    Returns:
        bool ``[M, H_kv, L]``; the final window is never marked.
    """
    length, hkv = q_bhsd.shape[2], k_bhsd.shape[1]
    masks = []
    for cdf in candidate_cdfs:
        # The run-time selection itself (every config knob), so calibration measures what runs.
        sel = tca_select(q_bhsd, k_bhsd, cdf.expand(hkv, -1), config, scaling)
        masks.append(sel.keep_mask(length)[0])
    return torch.stack(masks)


def query_positions(length: int, first: int, max_queries: int | None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 ``[Q]``: positions ``first..length-1``, evenly thinned to ``max_queries``."""
    if max_queries is None or max_queries >= length - first:
        return torch.arange(first, length, device=device)
    if max_queries < 1:
        raise ValueError(f"max_queries={max_queries} must be >= 1 or None")
    thinned = torch.linspace(first, length - 1, max_queries, dtype=torch.float64).round().long().unique()
    return thinned.to(device)


def _chunk_probs(q_hld: torch.Tensor, k_hld: torch.Tensor, qp: torch.Tensor, scaling: float) -> torch.Tensor:
    """float32 ``[H_q, C, E]``: dense causal softmax rows of queries ``qp`` over keys ``< E``.

    ``E = qp[-1] + 1``: later keys are masked for every query in the chunk,
    so they are never computed (halves the work on average). Only keys in
    ``(qp[0], qp[-1]]`` need the causal mask, so only that slice is masked.
    """
    hq, _, d = q_hld.shape
    hkv = k_hld.shape[0]
    g = hq // hkv
    first, end = int(qp[0]), int(qp[-1]) + 1
    qc = q_hld[:, qp].reshape(hkv, g * qp.numel(), d)
    scores = torch.matmul(qc, k_hld[:, :end].transpose(-1, -2)).view(hq, qp.numel(), end)
    future = torch.arange(first + 1, end, device=qp.device)[None, :] > qp[:, None]
    scores[..., first + 1:].masked_fill_(future, float("-inf"))
    return torch.softmax(scores * scaling, dim=-1)


def _far_split(qp: torch.Tensor, window: int) -> tuple[int, int, torch.Tensor]:
    """Where the far keys (``k <= i - w``) of the chunk's queries lie.

    Returns ``(lo, hi, partial)``: keys ``< lo`` are far for every query in
    the chunk, keys ``>= hi`` for none, and bool ``partial [C, hi - lo]``
    marks the far keys of the slice in between. So no full-width mask is built.
    """
    lo = max(int(qp[0]) - window + 1, 0)
    hi = max(int(qp[-1]) - window + 1, 0)
    partial = torch.arange(lo, hi, device=qp.device)[None, :] <= qp[:, None] - window
    return lo, hi, partial


def column_mean_mass(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, keep: torch.Tensor, window: int,
                     scaling: float, max_queries: int | None = None, chunk: int = 128) -> torch.Tensor:
    """float64 ``[H_q, M]``: column-mean retained mass of each candidate (module docstring).

    Args:
        q_bhsd: ``[1, H_q, L, D]``; k_bhsd: ``[1, H_kv, L, D]``.
        keep: bool ``[M, H_kv, L]`` from ``candidate_keep_masks``.
        window: local window ``w``.
        scaling: softmax scale.
        max_queries: sample this many queries from ``[0, L)`` (``None``: all).
        chunk: queries per step.
    """
    q, k = q_bhsd[0].float(), k_bhsd[0].float()
    hq, length = q.shape[0], q.shape[1]
    g = hq // k.shape[0]
    queries = query_positions(length, 0, max_queries, q.device)
    total = torch.zeros(hq, length, dtype=torch.float64, device=q.device)
    far = torch.zeros(hq, length, dtype=torch.float64, device=q.device)
    for start in range(0, queries.numel(), chunk):
        qp = queries[start:start + chunk]
        probs = _chunk_probs(q, k, qp, scaling)
        col = probs.sum(1).double()
        total[:, :col.shape[-1]] += col
        lo, hi, partial = _far_split(qp, window)
        far[:, :lo] += col[:, :lo]
        far[:, lo:hi] += probs[..., lo:hi].masked_fill(~partial, 0.0).sum(1).double()
    # Sampled queries that see key k: those at positions >= k.
    seen_by = queries.numel() - torch.searchsorted(queries, torch.arange(length, device=q.device))
    seen_by = seen_by.clamp(min=1).double()
    col_mean, col_far = total / seen_by, far / seen_by
    dropped_keys = (~keep).double().repeat_interleave(g, dim=1)  # [M, H_q, L]
    dropped = (dropped_keys * col_far[None]).sum(-1)  # [M, H_q]
    return (1.0 - dropped / col_mean.sum(-1)[None]).clamp(0.0, 1.0).T.contiguous()


def lse_mass(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, keep: torch.Tensor, window: int, scaling: float,
             max_queries: int | None = None, chunk: int = 128, quantile: float | None = None
             ) -> torch.Tensor:
    """float64 ``[H_q, M]``: mean (or ``quantile``) over queries ``>= w`` of ``exp(LSE_sparse - LSE_dense)``.

    Equals ``mass.retained_mass`` per query, for all candidates from one
    score computation: query ``i`` loses exactly its far keys that candidate
    ``m`` drops, ``retained[i, m] = 1 - sum_k P[i, k] far[i, k] (1 - keep_m[k])``,
    a ``[chunk, L] x [L, M]`` product per KV head.

    Args: as ``column_mean_mass``; queries are sampled from ``[w, L)``.
    """
    q, k = q_bhsd[0].float(), k_bhsd[0].float()
    hq, length = q.shape[0], q.shape[1]
    hkv = k.shape[0]
    g = hq // hkv
    drop_hlm = (~keep).permute(1, 2, 0).float()  # [H_kv, L, M]
    queries = query_positions(length, window, max_queries, q.device)
    parts = []
    for start in range(0, queries.numel(), chunk):
        qp = queries[start:start + chunk]
        c = qp.numel()
        probs = _chunk_probs(q, k, qp, scaling).view(hkv, g * c, -1)
        lo, hi, partial = _far_split(qp, window)
        lost = torch.matmul(probs[..., :lo], drop_hlm[:, :lo])
        edge = probs[..., lo:hi].view(hq, c, hi - lo).masked_fill(~partial, 0.0).view(hkv, g * c, hi - lo)
        lost = lost + torch.matmul(edge, drop_hlm[:, lo:hi])
        parts.append(1.0 - lost.view(hq, c, -1).double())
    per_query = torch.cat(parts, dim=1).clamp(0.0, 1.0)  # [H_q, Q, M]
    if quantile is None:
        return per_query.mean(1)
    return torch.quantile(per_query, quantile, dim=1)


def score_layer(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, candidate_cdfs: torch.Tensor,
                config: TCAConfig, scaling: float, max_queries: int | None = None,
                chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Retained mass and kept fraction of every candidate on one layer.

    Args:
        q_bhsd: ``[1, H_q, L, D]``; k_bhsd: ``[1, H_kv, L, D]``; query head
            ``h`` uses KV head ``h // g``. Requires ``L > window``.
        candidate_cdfs: float64 ``[M, b + 1]``.
        config: TCAConfig; ``mass_criterion`` and ``mass_quantile`` pick the measure.
        scaling: softmax scale.
        max_queries, chunk: query sampling and chunking (module docstring).

    Returns:
        (retained float64 ``[H_kv, M]``, mean over the ``g`` query heads;
        kept_fraction float64 ``[H_kv, M]`` of the global region).
    """
    length, hkv = q_bhsd.shape[2], k_bhsd.shape[1]
    keep = candidate_keep_masks(q_bhsd, k_bhsd, candidate_cdfs, config, scaling)
    global_len = length - config.window
    kept_fraction = keep.sum(-1).double().T / global_len
    if config.mass_criterion == "lse":
        per_head = lse_mass(q_bhsd, k_bhsd, keep, config.window, scaling, max_queries, chunk,
                            config.mass_quantile)
    else:
        per_head = column_mean_mass(q_bhsd, k_bhsd, keep, config.window, scaling, max_queries, chunk)
    retained = per_head.view(hkv, -1, per_head.shape[-1]).mean(1)
    return retained, kept_fraction.contiguous()
