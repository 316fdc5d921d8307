"""Fidelity report: how much attention mass TCA dropped for one request, and what that guarantees.

For query ``i`` of a head, the dropped softmax mass is
``gamma_i = 1 - exp(LSE_sparse_i - LSE_dense_i)`` (exact, from ``mass.py``)
and Theorem 1 bounds every coordinate of the attention output's change by
``2 * gamma_i * max|V|``. ``report`` runs the prefill once with TCA and
measures both per layer and KV head, chunked over queries: memory is
``O(chunk * L)`` per head, never ``L x L``.

Capture: a recording attention function is registered through transformers'
``AttentionInterface`` (the sanctioned hook), the model is switched to it for
one forward and switched back in ``finally``. The function calls
``tca_attention_forward`` unchanged and hands the post-RoPE ``q/k/v`` and the
layer's output to a recorder that arrives as a keyword argument of that
forward call, so no state lives on the model, its config or a class.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .attention import tca_attention_forward, tca_select
from .checks import check_count
from .fidelity_report import FidelityReport, LayerFidelity
from .integration import applied_budgets, attention_modules, attention_routed
from .layer import tca_layer
from .mass import masked_scores

logger = logging.getLogger(__name__)

RECORD_ATTN = "tca_fidelity"
RECORDER_KWARG = "tca_fidelity_recorder"

__all__ = ["FidelityReport", "LayerFidelity", "layer_fidelity", "query_positions", "report"]


def query_positions(length: int, queries: str | int) -> torch.Tensor:
    """int64 ``[Q]`` ascending query positions for ``queries``.

    ``"last"``: ``[L - 1]``; ``"all"``: ``0..L-1``; an int ``N``: ``N``
    evenly spaced positions ending at the last query (all when ``N >= L``),
    deterministic so that two reports of one prompt compare.
    """
    if queries == "last":
        return torch.tensor([length - 1])
    if queries == "all":
        return torch.arange(length)
    if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
        raise ValueError(f"queries={queries!r} must be 'last', 'all' or a positive int")
    n = min(queries, length)
    return (length - 1 - torch.arange(n) * length // n).flip(0)


def layer_fidelity(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor,
                   keep: torch.Tensor | None, window: int, scaling: float, positions: torch.Tensor, *,
                   out_bhsd: torch.Tensor | None = None, measure: bool = True,
                   chunk: int = 128) -> LayerFidelity:
    """Dropped mass, Theorem-1 inputs and measured output change of one layer.

    Args:
        q_bhsd: ``[1, H_q, L, D]`` post-RoPE queries; k_bhsd, v_bhsd:
            ``[1, H_kv, L, D]``; query head ``h`` uses KV head ``h // g``.
        keep: bool ``[1, H_kv, L]`` global subset (``Selection.keep_mask``);
            ``None`` for a layer that ran dense.
        window: local window ``w``.
        scaling: softmax scale.
        positions: int64 ``[Q]`` query positions.
        out_bhsd: ``[1, H_q, L, D]`` the layer's actual attention output
            (kernel, model dtype), compared against dense when given.
        measure: also compute outputs (sparse and dense, float32) to measure
            the change; costs about one eager dense attention for the queries.
        chunk: queries per step; extra memory ``O(chunk * L)`` per head.

    Returns:
        A ``LayerFidelity`` with per-query ``[H_q, Q]`` tensors on the CPU.
    """
    bsz, hq, length, d = q_bhsd.shape
    hkv = k_bhsd.shape[1]
    if bsz != 1:
        raise ValueError(f"layer_fidelity measures one request at a time, got batch size {bsz}")
    g = hq // hkv
    pos = positions.to(q_bhsd.device)
    nan = torch.full((hq, pos.numel()), float("nan"))
    gamma, diff, kernel_diff = [], [], []
    v5 = v_bhsd.float().unsqueeze(2)  # [1, H_kv, 1, L, D] broadcasts over the g query heads
    for start in range(0, pos.numel(), chunk):
        qp = pos[start:start + chunk]
        sparse, dense = masked_scores(q_bhsd, k_bhsd, keep, window, scaling, qp)
        # -expm1 keeps small gammas exact where 1 - exp would cancel.
        dropped = -torch.expm1(sparse.logsumexp(-1) - dense.logsumexp(-1))
        gamma.append(dropped.clamp(0.0, 1.0).reshape(hq, -1))
        if not measure:
            continue
        o_dense = dense.softmax(-1) @ v5
        diff.append((sparse.softmax(-1) @ v5 - o_dense).abs().amax(-1).reshape(hq, -1))
        if out_bhsd is not None:
            o_kernel = out_bhsd[:, :, qp].float().reshape(1, hkv, g, qp.numel(), d)
            kernel_diff.append((o_kernel - o_dense).abs().amax(-1).reshape(hq, -1))
    # What stays in the KV cache: the global subset plus the final window.
    global_len = max(length - window, 0)
    kept = ((keep[0, :, :global_len].sum(-1) + length - global_len).float() / length if keep is not None
            else torch.ones(hkv))
    return LayerFidelity(
        kept_fraction=kept.cpu(),
        gamma=torch.cat(gamma, -1).cpu(),
        diff=torch.cat(diff, -1).cpu() if diff else nan,
        kernel_diff=torch.cat(kernel_diff, -1).cpu() if kernel_diff else nan.clone(),
        max_abs_v=v_bhsd[0].float().abs().amax((-2, -1)).cpu(),
        sparse=keep is not None,
    )


class _Recorder:
    """Collects one ``LayerFidelity`` per layer during the recorded forward."""

    def __init__(self, positions: torch.Tensor, measure: bool, chunk: int) -> None:
        self.positions, self.measure, self.chunk = positions, measure, chunk
        self.layers: dict[int, LayerFidelity] = {}

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 out_blhd: torch.Tensor, scaling: float | None) -> None:
        layer = tca_layer(module)
        config = layer.config
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        length = key.shape[2]
        keep = None
        if length > config.dense_up_to:
            # The kernel's own selection, recomputed: same pure function, same inputs.
            keep = tca_select(query, key, layer.cdf, config, scale).keep_mask(length)
        self.layers[layer.layer_idx] = layer_fidelity(
            query, key, value, keep, config.window, scale, self.positions, out_bhsd=out_blhd.transpose(1, 2),
            measure=self.measure, chunk=self.chunk)


def recording_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, attention_mask: torch.Tensor | None,
                                dropout: float = 0.0, scaling: float | None = None,
                                **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``tca_attention_forward`` that also hands its inputs and output to the call's recorder."""
    recorder = kwargs.pop(RECORDER_KWARG, None)
    out, weights = tca_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                         scaling=scaling, **kwargs)
    if recorder is not None:
        recorder(module, query, key, value, out, scaling)
    return out, weights


@torch.no_grad()
def report(model: torch.nn.Module, input_ids: torch.Tensor, *, queries: str | int = "last",
           quantile: float = 0.95, measure: bool = True, chunk: int = 128) -> FidelityReport:
    """Run one TCA prefill of ``input_ids`` and report, per layer and KV head, what it dropped.

    Args:
        model: a model prepared by ``tca_flex.apply`` (a ``torch.compile``
            wrapper is unwrapped: the report runs eagerly).
        input_ids: int64 ``[1, L]``, one unpadded request.
        queries: ``"last"`` (the query that generates the next token),
            ``"all"``, or an int ``N`` of evenly spaced queries ending at the
            last one.
        quantile: the high quantile of gamma reported besides mean and max.
        measure: also measure the actual output change against dense for the
            same queries (about one extra eager dense attention for them;
            turn off for ``"all"`` on long prompts if that is too slow).
        chunk: queries per step (memory ``O(chunk * L)`` per head).

    Returns:
        A ``FidelityReport``; print it for the table.
    """
    model = getattr(model, "_orig_mod", model)
    applied_budgets(model)  # raises with a clear message when apply() was not called
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"report takes one request, input_ids of shape [1, L] with L >= 1; got "
                         f"{tuple(input_ids.shape)}")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile={quantile} is out of range: allowed [0, 1]")
    check_count("chunk", chunk)
    length = input_ids.shape[1]
    recorder = _Recorder(query_positions(length, queries), measure, chunk)
    with attention_routed(model, RECORD_ATTN, recording_attention_forward):
        # The base model skips the LM head: its [L, vocab] logits are not needed.
        model.base_model(input_ids=input_ids, use_cache=False, **{RECORDER_KWARG: recorder})
    missing = sorted({m.layer_idx for m in attention_modules(model)} - set(recorder.layers))
    if missing:
        raise RuntimeError(f"the recorded forward did not reach TCA attention in layers {missing}")
    logger.info("tca_flex.report: %d layers, %d queries of %d tokens", len(recorder.layers),
                recorder.positions.numel(), length)
    return FidelityReport.from_layers([recorder.layers[i] for i in sorted(recorder.layers)],
                                      positions=recorder.positions, seq_len=length,
                                      queries=str(queries), quantile=quantile)
