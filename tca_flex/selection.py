"""Online core-context selection: which keys each KV head keeps.

Everything here is a pure tensor function, batched over ``(batch, KV head)``,
with no Python loop over heads or blocks and no ``L x L`` tensor, so it traces
under ``torch.compile`` without graph breaks.

Layout decision: the last ``w`` positions are the *final window*; every query
sees them through its local window (query ``i >= p`` sees key ``p`` when
``p > i - w``, and ``i < L < p + w``), so global tokens there would be wasted.
The global subset is therefore chosen from the *global region*
``[0, L - w)``, split into ``n = ceil((L - w) / b)`` blocks (the last one may
be short). The KV cache after prefill is exactly (global subset) + (final
window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_choice
from .config import SelectionConfig

# Position used for unused slots of the packed index list. Large enough that
# "position <= q - window" is never true for it, small enough for int32 math.
PAD_POSITION = 1 << 30


@dataclass(frozen=True)
class Selection:
    """The global subset of every KV head.

    Attributes:
        positions: int64 ``[B, H_kv, capacity]``, kept key positions in
            ascending order, padded with ``PAD_POSITION``. ``capacity`` depends
            only on the sequence length (static shapes for compilation).
        counts: int64 ``[B, H_kv]``, the number of valid entries per row.
        importance: float32 ``[B, H_kv, L]``, the GQA-aggregated last-query
            attention row that drove the choice (``None`` where only the kept
            set travelled, as out of the prefill custom op).
    """

    positions: torch.Tensor
    counts: torch.Tensor
    importance: torch.Tensor | None = None

    def keep_mask(self, length: int) -> torch.Tensor:
        """bool ``[B, H_kv, length]``: True at kept positions."""
        keep = torch.zeros(*self.counts.shape, length + 1, dtype=torch.bool, device=self.positions.device)
        keep.scatter_(-1, self.positions.clamp(max=length), True)
        return keep[..., :length]


def global_region_length(seq_len: int, window: int) -> int:
    """Number of positions before the final window (0 means: run dense)."""
    return max(seq_len - window, 0)


def observation_queries(length, num_last: int, num_spread: int = 0, window: int = 0,
                        device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions of the observation queries: the last ``num_last``, then up to
    ``num_spread`` evenly spaced over ``[window, length - num_last)``.

    Tensor arithmetic on ``length`` (an int or a symbolic size under
    ``torch.compile``), never a Python branch on it: one compiled selection
    serves every prompt length. Slots that do not exist at this length (more
    last queries than tokens, spread positions that coincide or fall outside
    the range) get weight 0, so the weighted mean over slots is the mean over
    the distinct observation queries.

    Returns:
        (int64 ``[num_last + num_spread]`` positions, float32 weights (1 or 0),
        bool ``far_only``: True for the spread queries).
    """
    last = torch.arange(num_last, device=device) + (length - num_last)
    weight = last >= 0
    far_only = torch.zeros(num_last, dtype=torch.bool, device=device)
    if num_spread:
        m = torch.clamp(torch.tensor(num_last, device=device), max=length)
        lo, hi = window, length - 1 - m
        i = torch.arange(num_spread, device=device)
        spread = lo + (hi - lo) * i // max(num_spread - 1, 1) if num_spread > 1 else hi.expand(1)
        distinct = torch.ones_like(i, dtype=torch.bool)
        distinct[1:] = spread[1:] != spread[:-1]
        last = torch.cat([last, spread])
        weight = torch.cat([weight, distinct & (hi >= lo)])
        far_only = torch.cat([far_only, torch.ones(num_spread, dtype=torch.bool, device=device)])
    return torch.clamp(last, min=0), weight.float(), far_only


def importance(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, scaling: float,
               num_queries: int = 1, aggregation: str = "mean", num_spread: int = 0,
               window: int = 0, observed: bool = False) -> torch.Tensor:
    """Attention rows of the observation queries, averaged, aggregated per KV head.

    The last ``num_queries`` queries contribute their softmax rows (the
    paper's importance for ``num_queries = 1``). The ``num_spread`` queries
    spread through the prompt (``observation_positions``) contribute only the
    part of their row on their *far* keys (``<= i - window``): the mass query
    ``i`` loses if those keys leave the global subset. They make the subset
    serve the whole prompt, not only its end.

    Args:
        q_bhsd: ``[B, H_q, L, D]`` queries (RoPE applied).
        k_bhsd: ``[B, H_kv, L, D]`` keys; ``H_q = g * H_kv``, query head ``h``
            uses KV head ``h // g``.
        scaling: softmax scale (usually ``D ** -0.5``).
        num_queries: ``m``; rows of the last ``m`` queries, each under its own
            causal mask.
        aggregation: ``"mean"`` or ``"max"`` over the ``g`` query heads.
        num_spread: queries spread over ``[window, L - m)`` (0: none).
        window: local window ``w`` (only used with ``num_spread``).
        observed: ``q_bhsd`` already holds only the observation queries,
            ``[B, H_q, num_queries + num_spread, D]`` in ``observation_queries``
            order (``observed_queries``); ``L`` is then the keys' length.

    Returns:
        float32 ``[B, H_kv, L]``; with ``num_spread = 0`` each row sums to 1.
    """
    check_choice("aggregation", aggregation, ("mean", "max"))
    b, hq, d = q_bhsd.shape[0], q_bhsd.shape[1], q_bhsd.shape[3]
    hkv, length = k_bhsd.shape[1], k_bhsd.shape[2]
    g = hq // hkv
    q_pos, weight, far_only = observation_queries(length, num_queries, num_spread, window, q_bhsd.device)
    n = q_pos.shape[0]
    q_obs = (q_bhsd if observed else q_bhsd.index_select(2, q_pos)).reshape(b, hkv, g * n, d)
    scores = torch.matmul(q_obs.float(), k_bhsd.float().transpose(-1, -2)) * scaling
    scores = scores.view(b, hkv, g, n, length)
    k_pos = torch.arange(length, device=q_bhsd.device)
    scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    probs = scores.softmax(-1)
    # Spread rows count only their far keys.
    far = (k_pos[None, :] <= q_pos[:, None] - window) | ~far_only[:, None]
    probs = (probs * (far * weight[:, None])).sum(dim=3) / weight.sum()
    return probs.mean(dim=2) if aggregation == "mean" else probs.amax(dim=2)


def to_blocks(values: torch.Tensor, block_size: int, fill: float) -> torch.Tensor:
    """``[..., N]`` -> ``[..., ceil(N / b), b]``, the tail padded with ``fill``."""
    n = values.shape[-1]
    num_blocks = -(-n // block_size)
    # Always pad (possibly by 0): a branch on the length would specialise a compiled selection.
    values = torch.nn.functional.pad(values, (0, num_blocks * block_size - n), value=fill)
    return values.view(*values.shape[:-1], num_blocks, block_size)


def pool_importance(s: torch.Tensor, kernel: int) -> torch.Tensor:
    """Mean of each token's importance with its ``kernel // 2`` neighbours on both sides.

    Ranking tokens inside a block by this keeps contiguous spans (a multi-token
    number the question points at by its first token) instead of isolated
    peaks, as SnapKV's pooling does. ``kernel == 1`` returns ``s`` unchanged.
    Zero padding at the ends; shape ``[..., L]`` preserved.
    """
    if kernel == 1:
        return s
    flat = s.reshape(-1, 1, s.shape[-1])
    pooled = torch.nn.functional.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2,
                                            count_include_pad=True)
    return pooled.reshape(s.shape)


def dilate_keep(keep: torch.Tensor, span: int) -> torch.Tensor:
    """Also keep the ``span`` neighbours on each side of every kept token.

    Keeps whole phrases (a multi-token number whose first token the question
    attends to) in the pruned cache. ``span == 0`` returns ``keep``. bool ``[..., N]``.
    """
    if span == 0:
        return keep
    flat = keep.reshape(-1, 1, keep.shape[-1]).float()
    # A mean over the neighbourhood is > 0 iff a token in it is kept (max_pool1d would do
    # the same, but specialises a compiled graph on the length).
    grown = torch.nn.functional.avg_pool1d(flat, 2 * span + 1, stride=1, padding=span)
    return grown.reshape(keep.shape) > 0


def redundancy_score(s_blocks: torch.Tensor, alpha: float, normalize: bool = False) -> torch.Tensor:
    """``h_j = (1 - alpha) * S_j + alpha * C_j`` for every block.

    ``S_j`` is the block's importance mass and ``C_j = 1 - sum s_i^2 / S_j^2``
    one minus its Herfindahl index (0: one token holds the mass; near 1:
    spread). A block with no mass gets ``C_j = 0``.

    Args:
        s_blocks: ``[..., n, b]`` non-negative importance (padding = 0).
        alpha: weight of the spread term.
        normalize: divide ``S_j`` by ``max_j S_j`` so both terms lie in [0, 1].

    Returns:
        ``[..., n]`` scores; higher ranks first.
    """
    mass = s_blocks.sum(-1)
    sq = s_blocks.square().sum(-1)
    spread = torch.where(mass > 0, 1.0 - sq / mass.square().clamp_min(torch.finfo(mass.dtype).tiny), 0.0)
    if normalize:
        mass = mass / mass.amax(-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
    return (1.0 - alpha) * mass + alpha * spread


def budget_ladder(cdf_hk: torch.Tensor, num_blocks: int, anchor_blocks: int = 0) -> torch.Tensor:
    """Per-rank budgets ``Psi``: rank ``r`` gets the ``1 - (r + 0.5) / n`` quantile.

    With ``anchor_blocks > n`` the ranks instead take, from the top, the
    ladder of ``anchor_blocks`` blocks while the running total stays within
    the ``n``-block ladder's total: the same tokens per head, moved to the
    top-ranked blocks (``TCAConfig.anchor_blocks``). Equal to the quantile
    ladder when ``n >= anchor_blocks``.

    Args:
        cdf_hk: float64 ``[H_kv, b + 1]``, cumulative budget distribution.
        num_blocks: ``n``.
        anchor_blocks: block count of the reference ladder (0: off).

    Returns:
        int64 ``[H_kv, n]``, non-increasing along the last dimension.
    """
    ladder = _quantile_ladder(cdf_hk, num_blocks, num_blocks)
    if anchor_blocks == 0:
        return ladder
    # Branch-free in num_blocks (a symbolic size under torch.compile): ranks past
    # anchor_blocks get the empty quantile, and the anchored ladder is chosen by a where.
    caps = _quantile_ladder(cdf_hk, anchor_blocks, num_blocks)
    before = caps.cumsum(-1) - caps
    anchored = torch.minimum(caps, (ladder.sum(-1, keepdim=True) - before).clamp(min=0))
    fewer = torch.full((), num_blocks, device=cdf_hk.device) < anchor_blocks
    return torch.where(fewer, anchored, ladder)


def _quantile_ladder(cdf_hk: torch.Tensor, num_blocks: int, width: int) -> torch.Tensor:
    """Rank ``r < width`` gets the ``1 - (r + 0.5) / num_blocks`` quantile (0 past ``num_blocks``)."""
    r = torch.arange(width, dtype=torch.float64, device=cdf_hk.device)
    q = (1.0 - (r + 0.5) / num_blocks).expand(cdf_hk.shape[0], width).contiguous()
    # Guard against cdf rows that end a hair below 1 through rounding.
    cdf = cdf_hk.clone()
    cdf[:, -1] = 1.0
    return torch.where(q > 0, torch.searchsorted(cdf, q, right=False), 0)


def rank_of(scores: torch.Tensor) -> torch.Tensor:
    """Rank (0 = best) of every entry along the last dim; ties keep index order."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks


def block_budgets(block_scores: torch.Tensor, ladder: torch.Tensor, global_len: int,
                  block_size: int) -> torch.Tensor:
    """Tokens each block keeps: ``Psi[rank]``, capped by the block's size.

    Args:
        block_scores: ``[B, H_kv, n]`` redundancy scores.
        ladder: int64 ``[H_kv, n]`` from ``budget_ladder``.
        global_len: length of the global region (the last block may be short).
        block_size: ``b``.

    Returns:
        int64 ``[B, H_kv, n]``.
    """
    ranks = rank_of(block_scores)
    per_block = ladder.unsqueeze(0).expand_as(ranks).gather(-1, ranks)
    n = block_scores.shape[-1]
    sizes = (global_len - torch.arange(n, device=ranks.device) * block_size).clamp(max=block_size)
    return torch.minimum(per_block, sizes)


def keep_top_in_blocks(s_blocks: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """Boolean ``[..., n, b]``: each block's top-``budget`` tokens by importance.

    Padding slots must hold ``-inf`` and budgets must not exceed the number of
    real tokens in a block, so padding is never kept.
    """
    return rank_of(s_blocks) < budgets.unsqueeze(-1)


def pack_positions(keep: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept positions in ascending order, padded to ``capacity``.

    A stable sort of one-byte keys (kept first, each part in position order) rather than a
    cumsum-and-scatter: inductor (torch 2.11, CUDA) fails to generate code when a split cumsum
    feeds the indirect loads that follow (scripts/gpu_compile_probe.py, in git history at
    fa7eae9). One-byte keys are one 8-bit radix digit: sorting int64 positions took eight
    digit passes per call on the H200, whose launches cost more host time than their work.

    Args:
        keep: bool ``[B, H, N]``.
        capacity: output width, at least the largest count.

    Returns:
        (int64 ``[B, H, capacity]`` positions, int64 ``[B, H]`` counts).
    """
    n = keep.shape[-1]
    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices
    counts = keep.sum(-1)
    # Read into a fresh [.., capacity] tensor rather than pad-and-slice: a slice's contiguity
    # would depend on the length and specialise a compiled selection.
    slot = torch.arange(capacity, device=keep.device)
    taken = order.gather(-1, slot.clamp(max=n - 1).expand(*keep.shape[:-1], capacity))
    return torch.where(slot < counts.unsqueeze(-1), taken, PAD_POSITION), counts


def observed_queries(q_bhsd: torch.Tensor, num_queries: int, num_spread: int = 0, window: int = 0) -> torch.Tensor:
    """``[B, H_q, num_queries + num_spread, D]``: the observation queries' rows, a new tensor
    with standard contiguous strides (none depends on the prompt length).

    What a selection with ``observed=True`` takes instead of every query: the
    selection reads no other query row, so a caller that compiles it passes
    these few rows and the graph never depends on how the queries are laid out.
    """
    length = q_bhsd.shape[2]
    if num_spread == 0 and length >= num_queries:
        # The common case as one slice: the general path's few index ops cost more host time
        # than the GPU spends on the whole selection (32K tokens, H200).
        # A copy, not .contiguous(): with one row per head (or a batch of one) the slice already
        # counts as contiguous and keeps the full tensor's batch stride, L * H * D, which a
        # compiled caller's guards would then tie to this prompt length (one graph per length).
        return q_bhsd[:, :, length - num_queries:].clone(memory_format=torch.contiguous_format)
    positions = observation_queries(length, num_queries, num_spread, window, q_bhsd.device)[0]
    return q_bhsd.index_select(2, positions)


def last_query_probs(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax row of the last query, per query head (the last query sees every key).

    Args:
        q_bhsd: ``[B, H_q, L, D]``; k_bhsd: ``[B, H_kv, L, D]``; query head
            ``h`` uses KV head ``h // g``.
        scaling: softmax scale.

    Returns:
        float32 ``[B, H_kv, g, L]``; every row sums to 1.
    """
    b, hq, length, d = q_bhsd.shape
    hkv = k_bhsd.shape[1]
    q_last = q_bhsd[:, :, -1, :].float().reshape(b, hkv, hq // hkv, d)
    return (torch.matmul(q_last, k_bhsd.float().transpose(-1, -2)) * scaling).softmax(-1)


def guard_keep(keep: torch.Tensor, order_key: torch.Tensor, probs_bhgl: torch.Tensor,
               floor: float, global_len: int | None = None) -> torch.Tensor:
    """Runtime guard: grow each KV head's global subset until its last query keeps ``floor``.

    The last query sees the global subset plus the final window, so for query
    head ``h`` its retained mass is ``r_h = sum(p_h[final window]) +
    sum(p_h[kept])``. Where ``min_h r_h < floor``, not-yet-kept global tokens
    are added in descending ``order_key`` (top-p style) until every query head
    of the KV head reaches ``floor``; heads already there are unchanged.
    Guarantee: after the guard, ``r_h >= floor`` for *every* query head of
    every KV head (not only for the GQA-aggregated row), up to float32
    rounding of ``p`` (about 1e-6). Adding every global token gives ``r_h = 1``,
    so any ``floor <= 1`` is reachable.

    Args:
        keep: bool ``[B, H_kv, N]``, the global subset; positions ``>= global_len``
            (block padding, ``N >= global_len``) must be False.
        order_key: ``[B, H_kv, N]`` non-negative importance; higher joins first.
        probs_bhgl: float32 ``[B, H_kv, g, L]`` from ``last_query_probs``, with
            ``L - global_len`` the final window (``N < L``).
        floor: required retained mass in ``[0, 1]``.
        global_len: ``G``, the global region's length (default ``N``).

    Returns:
        bool ``[B, H_kv, N]``, a superset of ``keep`` inside the global region.
    """
    width = keep.shape[-1]
    global_len = width if global_len is None else global_len
    in_global = torch.arange(width, device=keep.device) < global_len
    p_head = probs_bhgl[..., :width]
    p_global = torch.where(in_global, p_head, 0.0)
    keep_g = keep.unsqueeze(2)
    outside = probs_bhgl[..., width:].sum(-1) + torch.where(in_global, 0.0, p_head).sum(-1)
    retained = outside + torch.where(keep_g, p_global, 0.0).sum(-1)
    deficit = floor - retained
    # Kept tokens rank after every candidate (importance >= 0 > -1), and positions past
    # the region after those (-2), so a count of k tokens from the front adds only new ones.
    ranks = rank_of(torch.where(keep, -1.0, torch.where(in_global, order_key.float(), -2.0)))
    order = ranks.argsort(-1).unsqueeze(2).expand_as(p_global)
    gained = torch.where(keep_g, 0.0, p_global).gather(-1, order).cumsum(-1)
    # Smallest prefix whose gain reaches the deficit: entries still short, plus one.
    needed = torch.where(deficit > 0, (gained < deficit.unsqueeze(-1)).sum(-1) + 1, 0)
    take = needed.amax(-1).clamp(max=global_len)
    return keep | (ranks < take.unsqueeze(-1))


def select(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, cdf_hk: torch.Tensor, knobs: SelectionConfig, *,
           scaling: float, capacity_multiple: int = 128, observed: bool = False) -> Selection:
    """TCA's online core-context selection for one layer.

    Args:
        q_bhsd: ``[B, H_q, L, D]`` queries; ``k_bhsd``: ``[B, H_kv, L, D]`` keys.
        cdf_hk: float64 ``[H_kv, b + 1]``, the layer's budget distributions.
        knobs: the selection's knobs (``TCAConfig.selection``): block size,
            window, redundancy balance, observation queries, GQA aggregation,
            and the options: ``pool_kernel`` (tokens inside a block ranked by
            importance averaged over that many neighbours, ``pool_importance``),
            ``span`` (``dilate_keep``), ``num_spread`` (spread observation
            queries, ``importance``), ``anchor_blocks`` (``budget_ladder``) and
            ``guard_floor`` (``guard_keep``: the last query of every query head
            retains at least this mass).
        scaling: softmax scale.
        capacity_multiple: the packed width is the global-region length
            rounded up to this (the attention kernel's KV tile).
        observed: ``q_bhsd`` holds only the observation queries
            (``observed_queries``); ``L`` is the keys' length.

    Returns:
        The ``Selection``; requires ``L > window``.
    """
    block_size, window, num_queries = knobs.block_size, knobs.window, knobs.num_queries
    length = k_bhsd.shape[2]
    if length <= window:
        raise ValueError(f"selection needs more tokens ({length}) than the window ({window})")
    # Shape arithmetic only, and no view whose contiguity depends on the length: under
    # torch.compile the length is symbolic and one graph serves every prompt length.
    global_len = length - window
    s = importance(q_bhsd, k_bhsd, scaling, num_queries, knobs.aggregation, knobs.num_spread, window, observed)
    keep = keep_from_importance(s, cdf_hk, knobs, global_len)
    if knobs.guard_floor is not None:
        # The last query (position L - 1) ends the block of last observation queries.
        q_last = q_bhsd[:, :, :num_queries] if observed else q_bhsd
        s_flat = to_blocks(s[..., :global_len], block_size, 0.0).flatten(-2)
        keep = guard_keep(keep, s_flat, last_query_probs(q_last, k_bhsd, scaling), knobs.guard_floor, global_len)
    capacity = -(-global_len // capacity_multiple) * capacity_multiple
    positions, counts = pack_positions(keep, capacity)
    return Selection(positions=positions, counts=counts, importance=s)


def keep_from_importance(s: torch.Tensor, cdf_hk: torch.Tensor, knobs: SelectionConfig, global_len: int
                         ) -> torch.Tensor:
    """The global subset from an importance row: block scores, the budget ladder, top tokens per block.

    ``select``'s steps after ``importance`` (before the guard), for any
    non-negative importance: the last queries' attention (``select``) or
    another score of the same prompt positions (``reconstruct.py``).

    Args:
        s: float ``[B, H_kv, N]`` non-negative importance, ``N >= global_len``.
        cdf_hk: float64 ``[H_kv, b + 1]``, the layer's budget distributions.
        knobs: block size, redundancy balance, pooling, span, anchored ladder.
        global_len: ``G``, the global region's length.

    Returns:
        bool ``[B, H_kv, n * b]`` with ``n = ceil(G / b)``; False past ``G``.
    """
    block_size = knobs.block_size
    s_blocks = to_blocks(s[..., :global_len], block_size, 0.0)
    scores = redundancy_score(s_blocks, knobs.alpha, knobs.normalize)
    ladder = budget_ladder(cdf_hk.to(s.device), s_blocks.shape[-2], knobs.anchor_blocks)
    budgets = block_budgets(scores, ladder, global_len, block_size)
    ranked = to_blocks(pool_importance(s, knobs.pool_kernel)[..., :global_len], block_size, float("-inf"))
    # Work on whole blocks (width n * b); the padding past the region is never kept.
    in_global = torch.arange(s_blocks.shape[-2] * block_size, device=s.device) < global_len
    return dilate_keep(keep_top_in_blocks(ranked, budgets).flatten(-2), knobs.span) & in_global
