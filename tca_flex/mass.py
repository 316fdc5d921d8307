"""Exact per-query retained attention mass, without an ``L x L`` tensor.

For query ``i`` with kept keys ``S_i``, the retained mass is
``1 - gamma_i = exp(LSE_sparse_i - LSE_dense_i)``, where each LSE is the
log-sum-exp of the scaled scores over ``S_i`` and over all causal keys.
Queries are processed in chunks, so extra memory is ``O(chunk * L)`` per head.
Theorem 1 then bounds every output coordinate's change by
``2 * gamma_i * max|V|``.
"""

from __future__ import annotations

import torch


def masked_scores(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, keep: torch.Tensor | None, window: int,
                  scaling: float, qp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled scores of the queries ``qp`` under the sparse and the causal mask.

    The one place that says which keys query ``i`` keeps: kept keys
    ``<= i - window`` plus the local window ``(i - window, i]``.

    Args:
        q_bhsd: ``[B, H_q, L, D]``; k_bhsd: ``[B, H_kv, L, D]``; query head
            ``h`` uses KV head ``h // (H_q // H_kv)``.
        keep: bool ``[B, H_kv, L]``, the global subset (``None``: dense).
        window: local window ``w``.
        scaling: softmax scale.
        qp: int64 ``[C]`` query positions (one chunk).

    Returns:
        float32 ``(sparse, dense)``, each ``[B, H_kv, g, C, L]``, masked
        entries ``-inf``.
    """
    bsz, hq, length, d = q_bhsd.shape
    hkv = k_bhsd.shape[1]
    g = hq // hkv
    key_pos = torch.arange(length, device=q_bhsd.device)
    qc = q_bhsd[:, :, qp].float().view(bsz, hkv, g * qp.numel(), d)
    scores = torch.matmul(qc, k_bhsd.float().transpose(-1, -2)) * scaling
    scores = scores.view(bsz, hkv, g, qp.numel(), length)
    causal = key_pos[None, :] <= qp[:, None]
    dense = scores.masked_fill(~causal, float("-inf"))
    if keep is None:
        return dense, dense
    local = causal & (key_pos[None, :] > qp[:, None] - window)
    far = key_pos[None, :] <= qp[:, None] - window
    sparse = scores.masked_fill(~(local | (far & keep[:, :, None, None, :])), float("-inf"))
    return sparse, dense


def kept_lse(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, keep: torch.Tensor | None, window: int,
             scaling: float, queries: torch.Tensor | None = None,
             chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse and dense log-sum-exp of the chosen queries.

    Args:
        q_bhsd: ``[B, H_q, L, D]``; k_bhsd: ``[B, H_kv, L, D]``.
        keep: bool ``[B, H_kv, L]``, the global subset (``None``: dense).
            Query ``i`` keeps kept keys ``<= i - window`` and keys in
            ``(i - window, i]``.
        window: local window ``w``.
        scaling: softmax scale.
        queries: int64 ``[Q]`` query positions (default: all ``L``).
        chunk: queries per step.

    Returns:
        float32 ``(lse_sparse, lse_dense)``, each ``[B, H_q, Q]``.
    """
    bsz, hq, length, _ = q_bhsd.shape
    pos = torch.arange(length, device=q_bhsd.device) if queries is None else queries.to(q_bhsd.device)
    sparse_parts, dense_parts = [], []
    for start in range(0, pos.numel(), chunk):
        qp = pos[start:start + chunk]
        sparse, dense = masked_scores(q_bhsd, k_bhsd, keep, window, scaling, qp)
        dense_parts.append(dense.logsumexp(-1).reshape(bsz, hq, qp.numel()))
        sparse_parts.append(sparse.logsumexp(-1).reshape(bsz, hq, qp.numel()))
    return torch.cat(sparse_parts, -1), torch.cat(dense_parts, -1)


def retained_mass(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, keep: torch.Tensor, window: int,
                  scaling: float, queries: torch.Tensor | None = None, chunk: int = 256) -> torch.Tensor:
    """float32 ``[B, H_q, Q]``: ``1 - gamma_i`` for each chosen query (see ``kept_lse``)."""
    lse_sparse, lse_dense = kept_lse(q_bhsd, k_bhsd, keep, window, scaling, queries, chunk)
    return torch.exp(lse_sparse - lse_dense).clamp(max=1.0)

