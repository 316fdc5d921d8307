"""One forward pass over the calibration text, scoring every layer as it runs.

q and k are captured through the sanctioned hook: a temporary attention
function registered with transformers' ``AttentionInterface`` hands the
post-RoPE ``q``/``k`` of each layer to a probe and returns ordinary SDPA
output, so the model's own forward runs unchanged. The probe is passed as a
keyword argument of the forward (transformers forwards such kwargs to the
attention function), so no global state is involved. Each layer is scored
inside the hook and its q/k dropped right after, so extra memory stays
``O(L)`` per head (plus the chunked score rows; see ``scoring.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..budgets import HeadBudgets
from ..checks import check_count
from ..config import TCAConfig
from ..integration import attention_modules, attention_routed, check_model, model_fingerprint
from .candidates import CandidateScores, budgets_from_scores, candidate_distributions
from .scoring import score_layer

logger = logging.getLogger(__name__)

CAPTURE_ATTN = "tca_calibration"
_PROBE_KWARG = "tca_calibration_probe"
# The global region must hold a few blocks, or there is nothing to rank.
MIN_GLOBAL_BLOCKS = 4

Probe = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, float], None]


def min_calibration_tokens(config: TCAConfig) -> int:
    """Shortest calibration text: the window plus ``MIN_GLOBAL_BLOCKS`` blocks."""
    return config.window + MIN_GLOBAL_BLOCKS * config.block_size


def _capture_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0,
                       scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """AttentionInterface function: give q/k to the probe, then run SDPA."""
    probe: Probe | None = kwargs.pop(_PROBE_KWARG, None)
    if probe is None:
        raise RuntimeError(f"attn_implementation={CAPTURE_ATTN!r} is internal to tca_flex.calibrate")
    probe(module, query, key, scaling if scaling is not None else query.shape[-1] ** -0.5)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def _check_input_ids(input_ids: torch.Tensor, config: TCAConfig) -> torch.Tensor:
    """``[L]`` or ``[1, L]`` token ids -> ``[1, L]``; refuses empty and too short texts."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError("input_ids must be an integer tensor of token ids, shape [L] or [1, L]")
    ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"calibrate takes one sequence, shape [L] or [1, L]; got {tuple(input_ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("the calibration text is empty (0 tokens)")
    need = min_calibration_tokens(config)
    if ids.shape[1] < need:
        raise ValueError(f"the calibration text has {ids.shape[1]} tokens; it needs at least {need} "
                         f"(window {config.window} + {MIN_GLOBAL_BLOCKS} blocks of {config.block_size})")
    return ids


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional; fall back to log lines
        return None
    return tqdm(total=total, desc="calibrating layers", unit="layer", disable=not enabled)


@torch.no_grad()
def score_candidates(model: torch.nn.Module, input_ids: torch.Tensor, config: TCAConfig | None = None, *,
                     max_queries: int | None = None, chunk: int = 128, progress: bool = True,
                     model_name: str | None = None) -> CandidateScores:
    """Retained mass and kept fraction of every candidate on every (layer, KV head).

    Args:
        model: a transformers decoder-only model that ``tca_flex.apply`` supports,
            in eval mode and not yet prepared by ``apply``.
        input_ids: int64 ``[L]`` or ``[1, L]``, the calibration text;
            ``L >= min_calibration_tokens(config)``.
        config: TCAConfig (default ``TCAConfig()``).
        max_queries: queries sampled per head for the mass (``None``: all, exact).
        chunk: queries per step; extra memory ``O(chunk * L)`` per query head.
        progress: show a progress bar over layers (needs ``tqdm``).
        model_name: recorded in the fingerprint instead of ``config._name_or_path``.

    Returns:
        CandidateScores with ``[layers, kv_heads, M]`` tables.

    Raises:
        ValueError: unsupported model, empty or too short text, non-finite q/k.
    """
    if config is not None and not isinstance(config, TCAConfig):
        raise TypeError(f"calibrate: config must be a TCAConfig or None, got {type(config).__name__}; "
                        "TCAConfig.from_dict(d) makes one from a dict")
    config = config or TCAConfig()
    ids = _check_input_ids(input_ids, config)
    # A chunk < 1 would score no query at all, and every head would come out dense.
    check_count("chunk (queries per step)", chunk)
    check_model(model)
    if model.training:
        raise ValueError("call model.eval() before calibrating (dropout would make budgets random)")
    mods = attention_modules(model)
    if not mods:
        raise ValueError(f"found no attention modules with k_proj/layer_idx in {type(model).__name__}")
    fingerprint = model_fingerprint(model)
    if model_name is not None:
        fingerprint["name_or_path"] = model_name
    candidates = candidate_distributions(config.block_size, config.num_candidates, config.sigma)
    cdfs = candidates.cumsum(-1)
    results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    bar = _progress(len(mods), progress)

    def probe(module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, scaling: float) -> None:
        layer = module.layer_idx
        if not (torch.isfinite(q).all() and torch.isfinite(k).all()):
            raise ValueError(f"non-finite query/key activations in layer {layer}; check the weights, the "
                             "dtype (float16 overflows) and the input ids")
        start = time.perf_counter()
        retained, kept = score_layer(q.detach(), k.detach(), cdfs.to(q.device), config, scaling,
                                     max_queries, chunk)
        results[layer] = (retained.cpu(), kept.cpu())
        logger.debug("layer %d scored in %.1f s", layer, time.perf_counter() - start)
        if bar is not None:
            bar.update(1)
        elif progress:
            logger.info("calibrated layer %d/%d", layer + 1, len(mods))

    device = next(model.parameters()).device
    try:
        with attention_routed(model, CAPTURE_ATTN, _capture_attention):
            model.base_model(input_ids=ids.to(device), use_cache=False, **{_PROBE_KWARG: probe})
    finally:
        if bar is not None:
            bar.close()
    missing = sorted({m.layer_idx for m in mods} - set(results))
    if missing:
        raise RuntimeError(f"attention layers {missing} were never called during the calibration forward")
    retained = torch.stack([results[m.layer_idx][0] for m in mods])
    kept = torch.stack([results[m.layer_idx][1] for m in mods])
    notes = {"num_tokens": ids.shape[1], "max_queries": max_queries}
    return CandidateScores(retained=retained, kept_fraction=kept, candidates=candidates, config=config,
                           fingerprint=fingerprint, notes=notes)


def calibrate(model: torch.nn.Module, input_ids: torch.Tensor, config: TCAConfig | None = None,
              progress: bool = True, *, max_queries: int | None = None, chunk: int = 128,
              model_name: str | None = None) -> HeadBudgets:
    """Per-head budgets from one forward pass over a calibration text.

    For every layer and KV head, each of the ``config.num_candidates``
    log-Gaussian candidates (``candidate_distributions``) is run through the
    online selection on this text, its retained attention mass measured
    (``config.mass_criterion``; see ``scoring.py``) and the candidate keeping
    the fewest tokens with mass ``>= config.tau`` kept; heads where none
    passes stay dense (candidate -1).

    Args:
        model: transformers decoder-only model supported by ``tca_flex.apply``
            (eval mode, not prepared by ``apply``).
        input_ids: int64 ``[L]`` or ``[1, L]``; at least ``window + 4 * block_size`` tokens.
        config: TCAConfig (default ``TCAConfig()``); block size, window,
            alpha etc. must be the ones used at inference.
        progress: progress bar over layers.
        max_queries: sample this many queries per head for the mass. ``None``:
            every query (exact), ``O(L^2 D)`` time per head like dense
            attention; ``Q`` queries cost ``O(Q L D)``.
        chunk: queries per step; peak extra memory ``O(chunk * L)`` per query head.
        model_name: name recorded in the fingerprint (default: the model's name_or_path).

    Returns:
        HeadBudgets ``[layers, kv_heads, b + 1]`` with retained_mass, candidate
        and fingerprint filled in.
    """
    start = time.perf_counter()
    scores = score_candidates(model, input_ids, config, max_queries=max_queries, chunk=chunk,
                              progress=progress, model_name=model_name)
    budgets = budgets_from_scores(scores)
    dense = int((budgets.candidate == -1).sum())
    logger.info("calibrated %d layers x %d KV heads in %.1f s: mean kept fraction %.3f, %d dense heads",
                budgets.num_layers, budgets.num_kv_heads, time.perf_counter() - start,
                budgets.keep_fraction().mean().item(), dense)
    return budgets
