"""Independent oracles for the tests: what TCA should keep and output, computed from scratch in float64.

Nothing here takes an intermediate of the fast path (its importance, its
selection, its cache): the reference selection starts from q and k, and the
model-level reference runs a whole model with a float64 attention function
that re-derives the prefill selection and, for the pruned cache, the kept set
of every decode step by hand.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import AttentionInterface, DynamicCache

from tca_flex import HeadBudgets, TCAConfig
from tca_flex.hfcompat import cache_kwargs
from tca_flex.reference import (
    reference_attention,
    reference_chunks,
    reference_importance,
    reference_keep,
    reference_mask,
)


def reference_selection(q: torch.Tensor, k: torch.Tensor, probs_hk: torch.Tensor, config: TCAConfig,
                        span: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 importance ``[B, H_kv, L]``, bool keep ``[B, H_kv, L]``) from the float64 reference alone."""
    s = reference_importance(q, k, q.shape[-1] ** -0.5, config.num_observation_queries, config.gqa_aggregation,
                             config.spread_observation_queries, config.window)
    knobs = config.selection
    keep = reference_keep(s, probs_hk, knobs if span is None else dataclasses.replace(knobs, span=span))
    return s, keep


def selection_is_ambiguous(s: torch.Tensor, keep_no_span: torch.Tensor, config: TCAConfig,
                           rtol: float = 1e-4, ranks_matter: bool = True) -> bool:
    """True when float32 rounding could legitimately change the selection of the float64 importance ``s``.

    Two cases: two blocks whose redundancy scores are within ``rtol`` (their
    ranks, hence budgets, may swap), or a block whose last kept and first
    dropped token (by pooled importance) are within ``rtol``. ``keep_no_span``
    is the reference selection without span dilation (its per-block counts are
    the budgets). Computed here from ``s``, not with the library's functions.
    ``ranks_matter=False``: every rank gets the same budget (a one-hot budget
    distribution), so only the cuts inside blocks count.
    """
    bsz, hkv, length = s.shape
    global_len, b = length - config.window, config.block_size
    if global_len <= 0:
        return False
    r = config.pool_kernel // 2
    padded = torch.nn.functional.pad(s.double(), (r, r))
    pooled = torch.stack([padded[..., i: i + length] for i in range(config.pool_kernel)]).sum(0) / config.pool_kernel
    for bi in range(bsz):
        for h in range(hkv):
            scores = []
            for start in range(0, global_len, b):
                blk = s[bi, h, start: min(start + b, global_len)].double()
                mass = float(blk.sum())
                spread = 1.0 - float(blk.square().sum()) / mass**2 if mass > 0 else 0.0
                scores.append((mass, spread))
                vals = pooled[bi, h, start: start + blk.numel()].sort(descending=True).values
                t = int(keep_no_span[bi, h, start: start + blk.numel()].sum())
                if 0 < t < blk.numel() and vals[t - 1] - vals[t] <= rtol * abs(float(vals[t - 1])):
                    return True
            top = max(m for m, _ in scores)
            h_j = sorted(((1 - config.alpha) * (m / top if config.normalize_redundancy and top > 0 else m)
                          + config.alpha * c) for m, c in scores)
            if ranks_matter and any(hi - lo <= rtol * abs(hi) for lo, hi in zip(h_j, h_j[1:], strict=False)):
                return True
    return False


class ReferenceModel:
    """Runs a model with a float64 TCA attention function that tracks every kept set by hand.

    Prefill (``L`` queries on ``L`` keys): the reference selection of the
    prompt (``reference_selection``; dense when ``L <= dense_up_to``), then
    float64 attention under its mask. Decode (one query): with ``pruned``, the
    query sees the head's kept global tokens plus every position from the
    first not-yet-compressed one on; when a whole block of ``b`` lies
    ``grace_blocks`` blocks past the window, its ``t = floor(E[k])`` tokens with the highest attention (GQA
    aggregated, ties to the older token) join the kept set. Without
    ``pruned`` a decode step attends to every key (a full cache).

    With ``chunks`` (and ``pruned``), every call after the prefill, of one
    token or several, follows ``reference.reference_chunks`` (the written rule
    of docs/chunked_prefill.md, re-run from the prefill each call); ``min_gap``
    then holds its smallest relative importance gap at a compressed block's cut
    (below float32 rounding a tie either side may break).
    """

    name = "tca_test_reference"

    def __init__(self, budgets: HeadBudgets, pruned: bool, chunks: bool = False) -> None:
        self.budgets, self.config, self.pruned, self.chunks = budgets, budgets.config, pruned, chunks
        self.keep_per_block = torch.floor(budgets.expected_per_block() + 1e-9).long()
        self.state: dict[int, dict] = {}
        self.min_gap = float("inf")
        self.ambiguous = False  # a prefill selection rounding may legitimately change (checked with span 0 only)
        AttentionInterface.register(self.name, self.attention)

    def attention(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layer, cfg = module.layer_idx, self.config
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        bsz, hq, q_len, _ = query.shape
        hkv, k_len = key.shape[1], key.shape[2]
        g = hq // hkv
        if q_len == k_len:
            keep = torch.zeros(bsz, hkv, k_len, dtype=torch.bool)
            if k_len > cfg.dense_up_to:
                s, keep = reference_selection(query, key, self.budgets.probs[layer], cfg)
                flat = bool((self.budgets.probs[layer].max(-1).values == 1.0).all())  # one budget for every rank
                # rtol 1e-5: the fast path's importance differs from this one by float32 rounding (~1e-7) and
                # by the earlier layers' float32 attention (~1e-6); tiny random models' scores are near-uniform.
                self.ambiguous |= cfg.span == 0 and selection_is_ambiguous(s, keep, cfg, rtol=1e-5,
                                                                           ranks_matter=not flat)
            else:
                keep[..., : max(k_len - cfg.window, 0)] = True
            out = reference_attention(query, key, value, reference_mask(keep, cfg.window, hq), scale)
            self.state[layer] = {"kept": keep, "ncs": max(k_len - cfg.window, 0), "queries": [], "sizes": [],
                                 "kept0": keep | (torch.arange(k_len) >= k_len - cfg.window)}
            return out.to(query.dtype).transpose(1, 2).contiguous(), None
        if self.chunks and self.pruned:
            return self._chunk(layer, query, key, value, scale), None
        assert q_len == 1, "the reference decodes one token per step"
        st = self.state[layer]
        kept = torch.nn.functional.pad(st["kept"], (0, k_len - st["kept"].shape[-1]))
        visible = kept | (torch.arange(k_len) >= st["ncs"]) if self.pruned else torch.ones_like(kept)
        logits = (query.double() @ key.double().repeat_interleave(g, 1).transpose(-1, -2)) * scale
        probs = logits.masked_fill(~visible.repeat_interleave(g, 1)[:, :, None, :], float("-inf")).softmax(-1)
        out = probs @ value.double().repeat_interleave(g, 1)
        newest, ncs, b = k_len - 1, st["ncs"], cfg.block_size
        if self.pruned and newest - (cfg.window + cfg.grace_blocks * b) + 1 - ncs >= b:
            block = probs[:, :, 0, ncs: ncs + b].view(bsz, hkv, g, b)
            imp = block.mean(2) if cfg.gqa_aggregation == "mean" else block.amax(2)
            for row in range(bsz):
                for h in range(hkv):
                    order = sorted(range(b), key=lambda i, row=row, h=h: (-float(imp[row, h, i]), i))
                    for i in order[: int(self.keep_per_block[layer, h])]:
                        kept[row, h, ncs + i] = True
            ncs += b
        st["kept"], st["ncs"] = kept, ncs
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    def _chunk(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scale: float) -> torch.Tensor:
        st, cfg = self.state[layer], self.config
        st["queries"].append(query.double())
        st["sizes"].append(query.shape[2])
        prefill = st["kept0"].shape[-1]
        # reference_chunks reads the queries of the chunks' positions only; the prefill's are placeholders.
        before = query.new_zeros(*query.shape[:2], prefill, query.shape[-1], dtype=torch.float64)
        out, _, gap = reference_chunks(torch.cat([before, *st["queries"]], 2), key, value, st["kept0"], st["sizes"],
                                       self.keep_per_block[layer].tolist(), scaling=scale,
                                       block_size=cfg.block_size, window=cfg.window,
                                       num_queries=cfg.num_observation_queries, aggregation=cfg.gqa_aggregation,
                                       grace_blocks=cfg.grace_blocks)
        self.min_gap = min(self.min_gap, gap)
        return out[:, :, -query.shape[2]:].to(query.dtype).transpose(1, 2).contiguous()

    @torch.no_grad()
    def logits(self, model, sequences: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """Teacher-forced logits ``[B, steps, V]`` that predict ``sequences[:, prompt_len:]``.

        The prompt runs as one prefill, then one token per step over a full
        ``DynamicCache`` (the reference masks what the pruned cache would drop).
        """
        self.state.clear()
        previous = model.config._attn_implementation
        model.set_attn_implementation(self.name)
        try:
            cache = DynamicCache(config=model.config)
            out = [model(sequences[:, :prompt_len], **cache_kwargs(model, cache)).logits[:, -1]]
            for p in range(prompt_len, sequences.shape[1] - 1):
                out.append(model(sequences[:, p: p + 1], **cache_kwargs(model, cache)).logits[:, -1])
        finally:
            model.set_attn_implementation(previous)
        return torch.stack(out, 1)
