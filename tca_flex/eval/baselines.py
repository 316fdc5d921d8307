"""Peer methods at a fixed KV budget, as prefill + decode attention functions.

Not part of tca_flex's public API: these exist so the evaluation compares
TCA with the usual baselines on the same prompts and the same model.

Every method is a ``KeepPolicy``: at the fresh prefill it computes the
prompt's attention output and a boolean *kept set* ``keep[B, H_kv, L]``, the
prompt tokens that stay in the KV cache; every decode step then attends to
the kept set plus the generated tokens (``decode_visible``). The cache itself
is not shrunk (the attention function never sees the cache object), so the
accuracy is that of the pruned cache while memory and decode time are those
of the full cache. ``install.py`` installs a policy on a model.

- ``StreamingPolicy`` (StreamingLLM, Xiao et al. 2023): ``sinks`` first tokens
  plus a sliding window, the same visibility in prefill and decode, so every
  query sees at most ``budget`` keys.
- ``SnapKVPolicy`` (SnapKV, Li et al. 2024): dense prefill; importance of every
  prompt key is the attention of the last ``obs`` queries (mean over them and
  over the GQA group), smoothed by a ``kernel``-wide average pool; each KV
  head keeps its top ``budget - obs`` keys plus the observation window.
- ``TCAPolicy``: tca_flex's own prefill (installed by ``tca_flex.apply``),
  kept set = global subset + final window, i.e. what the pruned decode cache
  (``TCACache``) will hold.
- ``TCAMaskPolicy``: the same selection and kept keys, attention by SDPA
  under the explicit mask instead of FlexAttention. Same accuracy, no
  FlexAttention compile per distinct prompt length (which dominates a suite
  of many prompt lengths); its timings are not TCA's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import cache_selection, tca_prefill_attention, tca_select
from ..config import TCAConfig
from ..layer import tca_layer
from ..reference import reference_mask
from ..selection import Selection, importance

PREFILL_CHUNK = 1024


def streaming_visible(q_pos: torch.Tensor, k_len: int, budget: int, sinks: int) -> torch.Tensor:
    """bool ``[Lq, Lk]``: key ``j`` visible to the query at position ``i``.

    Visible when ``j <= i`` and (``j < sinks`` or ``j > i - (budget - sinks)``):
    exactly ``min(i + 1, budget)`` keys per query.
    """
    if not 0 <= sinks < budget:
        raise ValueError(f"StreamingLLM needs 0 <= sinks < budget, got sinks={sinks}, budget={budget}")
    j = torch.arange(k_len, device=q_pos.device)
    i = q_pos[:, None]
    return (j <= i) & ((j < sinks) | (j > i - (budget - sinks)))


def snapkv_keep(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, scaling: float, budget: int, obs: int,
                kernel: int) -> torch.Tensor:
    """SnapKV's kept set: top ``budget - obs`` pooled-importance keys + last ``obs``.

    Args:
        q_bhsd: ``[B, H_q, L, D]`` queries (RoPE applied); k_bhsd: ``[B, H_kv, L, D]``.
            Query head ``h`` uses KV head ``h // (H_q // H_kv)``.
        scaling: softmax scale.
        budget: tokens kept per KV head (all of them when ``budget >= L``).
        obs: observation window (the last ``obs`` queries; always kept).
        kernel: width of the average pool over key positions (odd).

    Returns:
        bool ``[B, H_kv, L]`` with exactly ``min(budget, L)`` True per row.
    """
    bsz, hkv, length = k_bhsd.shape[0], k_bhsd.shape[1], k_bhsd.shape[2]
    if budget >= length:
        return torch.ones(bsz, hkv, length, dtype=torch.bool, device=k_bhsd.device)
    if not 0 < obs < budget:
        raise ValueError(f"SnapKV needs 0 < obs < budget, got obs={obs}, budget={budget}")
    s = importance(q_bhsd, k_bhsd, scaling, num_queries=obs, aggregation="mean")[..., :length - obs]
    if kernel > 1:
        s = F.avg_pool1d(s.reshape(bsz * hkv, 1, -1), kernel, stride=1, padding=kernel // 2,
                         count_include_pad=False).view(bsz, hkv, -1)
    top = s.topk(budget - obs, dim=-1).indices
    keep = torch.zeros(bsz, hkv, length, dtype=torch.bool, device=k_bhsd.device)
    keep.scatter_(-1, top, True)
    keep[..., length - obs:] = True
    return keep


def tca_keep(positions: torch.Tensor, counts: torch.Tensor, length: int, window: int) -> torch.Tensor:
    """bool ``[B, H_kv, L]``: TCA's global subset (``Selection.positions``) + final window."""
    keep = Selection(positions=positions, counts=counts).keep_mask(length)
    keep[..., max(length - window, 0):] = True
    return keep


def keep_then_new(keep: torch.Tensor, q_pos: torch.Tensor, k_len: int) -> torch.Tensor:
    """bool ``[B, H_kv, Lq, Lk]``: kept prompt keys plus generated keys up to each query.

    ``keep`` is ``[B, H_kv, L_prompt]``; keys at ``>= L_prompt`` were generated.
    """
    prompt_len = keep.shape[-1]
    new = torch.arange(prompt_len, k_len, device=keep.device)
    new_vis = new[None, :] <= q_pos[:, None]
    old = keep[:, :, None, :].expand(-1, -1, q_pos.numel(), -1)
    return torch.cat([old, new_vis.expand(*keep.shape[:2], -1, -1)], dim=-1)


def masked_attention(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor,
                     visible: Callable[[torch.Tensor], torch.Tensor], scaling: float,
                     chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """SDPA under an arbitrary visibility, in query chunks (no ``L x L`` mask at once).

    Args:
        q_bhsd: ``[B, H_q, Lq, D]``; k_bhsd, v_bhsd: ``[B, H_kv, Lk, D]``. The
            queries sit at positions ``Lk - Lq .. Lk - 1``.
        visible: maps query positions ``[c]`` to a bool mask ``[c, Lk]`` or
            ``[B, H_kv, c, Lk]``; every query must see at least one key.
        scaling: softmax scale.

    Returns:
        ``[B, H_q, Lq, D]``.
    """
    hq, q_len = q_bhsd.shape[1], q_bhsd.shape[2]
    hkv, k_len = k_bhsd.shape[1], k_bhsd.shape[2]
    group = hq // hkv
    outs = []
    for start in range(0, q_len, chunk):
        q = q_bhsd[:, :, start:start + chunk]
        q_pos = torch.arange(start, start + q.shape[2], device=q.device) + (k_len - q_len)
        mask = visible(q_pos)
        if mask.dim() == 4 and group > 1:
            mask = mask.repeat_interleave(group, dim=1)
        outs.append(F.scaled_dot_product_attention(q, k_bhsd, v_bhsd, attn_mask=mask, scale=scaling,
                                                   enable_gqa=group > 1))
    return torch.cat(outs, dim=2)


def dense_attention(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor,
                    scaling: float) -> torch.Tensor:
    """Causal SDPA for a fresh prefill (``Lq == Lk``); ``[B, H_q, L, D]``."""
    group = q_bhsd.shape[1] // k_bhsd.shape[1]
    return F.scaled_dot_product_attention(q_bhsd, k_bhsd, v_bhsd, is_causal=True, scale=scaling,
                                          enable_gqa=group > 1)


@dataclass(frozen=True)
class StreamingPolicy:
    """StreamingLLM: ``sinks`` attention sinks + a recent window, ``budget(L)`` keys in all."""

    budget: Callable[[int], int]
    sinks: int = 4

    def prefill(self, module, q, k, v, scaling):
        length = k.shape[2]
        budget = min(self.budget(length), length)
        if budget >= length:
            keep = torch.ones(k.shape[0], k.shape[1], length, dtype=torch.bool, device=k.device)
            return dense_attention(q, k, v, scaling), keep

        def visible(q_pos):
            return streaming_visible(q_pos, length, budget, self.sinks)

        keep = visible(torch.tensor([length - 1], device=k.device))[0].expand(k.shape[0], k.shape[1], -1)
        return masked_attention(q, k, v, visible, scaling), keep

    def decode_visible(self, keep, q_pos, k_len):
        budget = int(keep[0, 0].sum())
        if budget == keep.shape[-1]:
            return keep_then_new(keep, q_pos, k_len)
        return streaming_visible(q_pos, k_len, budget, self.sinks)


@dataclass(frozen=True)
class SnapKVPolicy:
    """SnapKV: dense prefill, then a per-KV-head top-k kept set of ``budget(L)`` tokens."""

    budget: Callable[[int], int]
    obs: int = 32
    kernel: int = 7

    def prefill(self, module, q, k, v, scaling):
        keep = snapkv_keep(q, k, scaling, self.budget(k.shape[2]), self.obs, self.kernel)
        return dense_attention(q, k, v, scaling), keep

    def decode_visible(self, keep, q_pos, k_len):
        return keep_then_new(keep, q_pos, k_len)


@dataclass(frozen=True)
class TCAPolicy:
    """TCA prefill from ``tca_flex.apply``'s layer record; kept set = global subset + window."""

    def prefill(self, module, q, k, v, scaling):
        layer = tca_layer(module)
        cfg, length = layer.config, k.shape[2]
        if length <= cfg.dense_up_to:
            keep = torch.ones(k.shape[0], k.shape[1], length, dtype=torch.bool, device=k.device)
            return dense_attention(q, k, v, scaling), keep
        out, sel = tca_prefill_attention(q, k, v, layer.cdf, cfg, scaling, return_selection=True)  # the cache's
        return out, tca_keep(sel.positions, sel.counts, length, cfg.window)

    def decode_visible(self, keep, q_pos, k_len):
        return keep_then_new(keep, q_pos, k_len)


@dataclass(frozen=True)
class TCAMaskPolicy:
    """TCA with explicit-mask SDPA: ``TCAPolicy``'s kept keys without FlexAttention.

    ``pruned``: decode over the kept set (what ``TCACache`` holds); otherwise
    over the full cache (sparse prefill only).
    """

    config: TCAConfig
    cdf: torch.Tensor
    pruned: bool = True

    def prefill(self, module, q, k, v, scaling):
        cfg, length = self.config, k.shape[2]
        full = torch.ones(k.shape[0], k.shape[1], length, dtype=torch.bool, device=k.device)
        if length <= cfg.dense_up_to:
            return dense_attention(q, k, v, scaling), full
        sel = tca_select(q, k, self.cdf, cfg, scaling)
        glob = sel.keep_mask(length)
        visible = functools.partial(reference_mask, glob, cfg.window, glob.shape[1])  # per KV head
        out = masked_attention(q, k, v, visible, scaling)
        if not self.pruned:
            return out, full
        kept = sel if cfg.cache_selection is None else cache_selection(q, k, self.cdf, cfg, scaling)
        return out, tca_keep(kept.positions, kept.counts, length, cfg.window)

    def decode_visible(self, keep, q_pos, k_len):
        return keep_then_new(keep, q_pos, k_len)
