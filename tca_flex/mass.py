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
    bsz, hq, length, d = q_bhsd.shape
    hkv = k_bhsd.shape[1]
    g = hq // hkv
    pos = torch.arange(length, device=q_bhsd.device) if queries is None else queries.to(q_bhsd.device)
    k = k_bhsd.float()
    key_pos = torch.arange(length, device=q_bhsd.device)
    sparse_parts, dense_parts = [], []
    for start in range(0, pos.numel(), chunk):
        qp = pos[start:start + chunk]
        qc = q_bhsd[:, :, qp].float().view(bsz, hkv, g * qp.numel(), d)
        scores = torch.matmul(qc, k.transpose(-1, -2)).view(bsz, hkv, g, qp.numel(), length) * scaling
        causal = key_pos[None, :] <= qp[:, None]
        dense = scores.masked_fill(~causal, float("-inf"))
        local = causal & (key_pos[None, :] > qp[:, None] - window)
        if keep is None:
            sparse = dense
        else:
            far = key_pos[None, :] <= qp[:, None] - window
            sparse = scores.masked_fill(~(local | (far & keep[:, :, None, None, :])), float("-inf"))
        dense_parts.append(dense.logsumexp(-1).reshape(bsz, hq, qp.numel()))
        sparse_parts.append(sparse.logsumexp(-1).reshape(bsz, hq, qp.numel()))
    return torch.cat(sparse_parts, -1), torch.cat(dense_parts, -1)


def retained_mass(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, keep: torch.Tensor, window: int,
                  scaling: float, queries: torch.Tensor | None = None, chunk: int = 256) -> torch.Tensor:
    """float32 ``[B, H_q, Q]``: ``1 - gamma_i`` for each chosen query (see ``kept_lse``)."""
    lse_sparse, lse_dense = kept_lse(q_bhsd, k_bhsd, keep, window, scaling, queries, chunk)
    return torch.exp(lse_sparse - lse_dense).clamp(max=1.0)

