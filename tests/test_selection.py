import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

from tca_flex import HeadBudgets, TCAConfig
from tca_flex.selection import (
    PAD_POSITION,
    budget_ladder,
    importance,
    observation_queries,
    observed_queries,
    pack_positions,
    pool_importance,
    redundancy_score,
    select,
)

from .oracles import reference_selection, selection_is_ambiguous

shapes = st.fixed_dictionaries({
    "bsz": st.integers(1, 2),
    "hkv": st.integers(1, 3),
    "group": st.sampled_from([1, 2, 3]),
    "block": st.sampled_from([8, 16, 32]),
    "win_blocks": st.integers(1, 3),
    "extra": st.integers(1, 150),
    "frac": st.floats(0.0, 1.0),
    "alpha": st.floats(0.0, 1.0),
    "normalize": st.booleans(),
    "m": st.integers(1, 4),
    "agg": st.sampled_from(["mean", "max"]),
    "pool": st.sampled_from([1, 3, 7]),
    "span": st.sampled_from([0, 0, 1, 3]),
    "spread": st.sampled_from([0, 0, 1, 4, 9]),
    "anchor": st.sampled_from([0, 0, 2, 7, 40]),
    "seed": st.integers(0, 2**31 - 1),
})


def draw_inputs(p, d=8):
    g = torch.Generator().manual_seed(p["seed"])
    window = p["block"] * p["win_blocks"]
    length = window + p["extra"]
    hq = p["hkv"] * p["group"]
    q = torch.randn(p["bsz"], hq, length, d, generator=g) * 2
    k = torch.randn(p["bsz"], p["hkv"], length, d, generator=g) * 2
    config = TCAConfig(block_size=p["block"], window=window, alpha=p["alpha"],
                       normalize_redundancy=p["normalize"], num_observation_queries=p["m"],
                       gqa_aggregation=p["agg"], pool_kernel=p.get("pool", 1), span=p.get("span", 0),
                       spread_observation_queries=p.get("spread", 0), anchor_blocks=p.get("anchor", 0))
    return q, k, config


def random_budgets(p, config):
    """Non-uniform per-head budget distributions (a uniform one makes every ladder flat)."""
    g = torch.Generator().manual_seed(p["seed"] + 1)
    probs = torch.rand(1, p["hkv"], config.block_size + 1, generator=g, dtype=torch.float64) ** 4
    return HeadBudgets(probs=probs / probs.sum(-1, keepdim=True), config=config)


def run_select(q, k, config, budgets):
    return select(q, k, budgets.cdf(0), config.selection, scaling=q.shape[-1] ** -0.5, capacity_multiple=16)


@given(shapes)
@example({"bsz": 1, "hkv": 1, "group": 1, "block": 8, "win_blocks": 1, "extra": 1, "frac": 1.0,
          "alpha": 0.5, "normalize": False, "m": 1, "agg": "mean", "seed": 0})
def test_select_matches_reference(p):
    q, k, config = draw_inputs(p)
    budgets = random_budgets(p, config)
    sel = run_select(q, k, config, budgets)
    # The oracle selects from its own float64 importance, never from the fast path's.
    s_ref, keep_ref = reference_selection(q, k, budgets.probs[0], config)
    torch.testing.assert_close(sel.importance.double(), s_ref, atol=1e-6, rtol=1e-5)
    # Block scores, or pooled importances at a block's cut, that tie within float32 noise
    # may be ordered either way (the fast path ranks float32 values): skip those draws.
    keep_cut = reference_selection(q, k, budgets.probs[0], config, span=0)[1] if config.span else keep_ref
    assume(not selection_is_ambiguous(s_ref, keep_cut, config))
    assert torch.equal(sel.keep_mask(q.shape[2]), keep_ref)


@given(shapes, st.booleans())
def test_selection_invariants(p, whole_blocks):
    p = {**p, "span": 0}  # exact per-block counts; the span's growth is checked against the reference
    if whole_blocks:  # half the draws end the global region on a block boundary: the exact-ladder branch below
        p["extra"] = -(-p["extra"] // p["block"]) * p["block"]
    q, k, config = draw_inputs(p)
    length, b = q.shape[2], config.block_size
    global_len = length - config.window
    budgets = HeadBudgets.uniform(1, p["hkv"], p["frac"], config)
    sel = run_select(q, k, config, budgets)
    keep = sel.keep_mask(length)
    # Kept keys lie in the global region, in ascending order, without repeats.
    assert not keep[..., global_len:].any()
    valid = sel.positions[..., :-1] != PAD_POSITION
    assert (sel.positions[..., 1:] > sel.positions[..., :-1])[valid].all()
    assert torch.equal(keep.sum(-1), sel.counts)
    # Each block keeps exactly its ladder budget (capped by its size), in rank order.
    n = -(-global_len // b)
    ladder = budget_ladder(budgets.cdf(0), n, config.anchor_blocks)
    per_block = torch.nn.functional.pad(keep[..., :global_len], (0, n * b - global_len)).view(*keep.shape[:2], n, b)
    counts = per_block.sum(-1)
    sizes = (global_len - torch.arange(n) * b).clamp(max=b)
    if global_len % b == 0:
        assert torch.equal(counts.sort(-1, descending=True).values, ladder.expand_as(counts))
    else:
        # Only the short last block can be capped below its ladder entry.
        assert (counts[..., :-1].sort(-1, descending=True).values
                <= ladder.expand_as(counts)[..., : n - 1]).all() or n == 1
    assert (counts <= torch.minimum(ladder.max(-1, keepdim=True).values, sizes)).all()
    # Within a block, every kept token outranks every dropped one (by pooled importance).
    ranked_by = pool_importance(sel.importance, config.pool_kernel)[..., :global_len]
    s = torch.nn.functional.pad(ranked_by, (0, n * b - global_len), value=-1.0)
    s = s.view(*keep.shape[:2], n, b)
    lowest_kept = torch.where(per_block, s, float("inf")).amin(-1)
    real = torch.arange(n * b).view(n, b) < global_len
    highest_dropped = torch.where(~per_block & real, s, -float("inf")).amax(-1)
    assert (lowest_kept >= highest_dropped).all()


@given(shapes, st.floats(0.0, 1.0))
def test_larger_budget_keeps_a_superset(p, other):
    # Quantile ladders only: an anchored ladder spends a larger total on its top ranks
    # first, so a low-ranked block can keep fewer tokens than under a smaller budget.
    q, k, config = draw_inputs({**p, "anchor": 0})
    lo, hi = sorted([p["frac"], other])
    small = run_select(q, k, config, HeadBudgets.uniform(1, p["hkv"], lo, config)).keep_mask(q.shape[2])
    large = run_select(q, k, config, HeadBudgets.uniform(1, p["hkv"], hi, config)).keep_mask(q.shape[2])
    assert not (small & ~large).any()


def test_full_budget_keeps_the_whole_global_region():
    q, k, config = draw_inputs({"bsz": 2, "hkv": 2, "group": 2, "block": 16, "win_blocks": 2, "extra": 77,
                                "frac": 1.0, "alpha": 0.5, "normalize": False, "m": 1, "agg": "mean",
                                "seed": 7})
    sel = run_select(q, k, config, HeadBudgets.dense(1, 2, config))
    assert (sel.counts == q.shape[2] - config.window).all()


def test_importance_rows_are_distributions():
    torch.manual_seed(3)
    q, k = torch.randn(2, 6, 50, 16), torch.randn(2, 3, 50, 16)
    s = importance(q, k, 0.25, num_queries=3, aggregation="mean")
    torch.testing.assert_close(s.sum(-1), torch.ones(2, 3))


def test_redundancy_score_extremes():
    peaked = torch.zeros(1, 1, 1, 8)
    peaked[..., 0] = 0.5
    flat = torch.full((1, 1, 1, 8), 0.5 / 8)
    both = torch.cat([peaked, flat], dim=2)
    h = redundancy_score(both, alpha=1.0)
    torch.testing.assert_close(h[0, 0], torch.tensor([0.0, 1 - 1 / 8]))
    h = redundancy_score(both, alpha=0.0)
    torch.testing.assert_close(h[0, 0], torch.tensor([0.5, 0.5]))


@given(shapes)
def test_span_keeps_whole_neighbourhoods_inside_the_global_region(p):
    p = {**p, "span": 2}
    q, k, config = draw_inputs(p)
    length = q.shape[2]
    global_len = length - config.window
    budgets = HeadBudgets.uniform(1, p["hkv"], p["frac"], config)
    wide = run_select(q, k, config, budgets).keep_mask(length)
    narrow = run_select(q, k, config.replace(span=0), budgets).keep_mask(length)
    assert not (narrow & ~wide).any() and not wide[..., global_len:].any()
    near = torch.zeros_like(narrow)
    for shift in range(-2, 3):
        near |= torch.roll(narrow, shift, -1) & ~_wrapped(length, shift)
    assert torch.equal(wide, near & (torch.arange(length) < global_len))


def _wrapped(length, shift):
    """Positions that torch.roll filled from the other end."""
    idx = torch.arange(length)
    return idx < shift if shift > 0 else idx >= length + shift


@given(n=st.integers(1, 60), anchor=st.integers(0, 200), b=st.sampled_from([4, 16, 64]), hkv=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1))
def test_anchored_ladder_moves_the_same_tokens_to_the_top_ranks(n, anchor, b, hkv, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(hkv, b + 1, generator=g, dtype=torch.float64) ** 4
    cdf = (probs / probs.sum(-1, keepdim=True)).cumsum(-1)
    plain = budget_ladder(cdf, n)
    ladder = budget_ladder(cdf, n, anchor)
    if anchor <= n:
        assert torch.equal(ladder, plain)
        return
    caps = budget_ladder(cdf, anchor)[:, :n]
    assert (ladder[:, 1:] <= ladder[:, :-1]).all() and (ladder >= 0).all() and (ladder <= caps).all()
    assert torch.equal(ladder.sum(-1), torch.minimum(plain.sum(-1), caps.sum(-1)))
    assert (ladder[:, 0] >= plain[:, 0]).all()  # the top-ranked block never keeps less
    # A prefix of ranks keeps its anchored budget in full, then one partial rank, then nothing.
    full = ladder == caps
    partial = (ladder > 0) & ~full
    assert (partial.sum(-1) <= 1).all()
    for h in range(hkv):
        first_short = int((~full[h]).nonzero()[0]) if (~full[h]).any() else n
        assert (ladder[h, first_short + 1:] == 0).all()


@given(extra=st.integers(1, 300), m=st.integers(1, 40), spread=st.sampled_from([0, 0, 1, 5]),
       window=st.integers(0, 64), seed=st.integers(0, 2**31 - 1))
def test_observed_queries_are_the_observation_rows(extra, m, spread, window, seed):
    """The fast slice for last-query observation equals gathering ``observation_queries``' rows
    (prompts longer than the window, as the selection requires)."""
    length = window + extra
    q = torch.randn(2, 3, length, 4, generator=torch.Generator().manual_seed(seed))
    got = observed_queries(q, m, spread, window)
    want = q.index_select(2, observation_queries(length, m, spread, window)[0])
    assert got.is_contiguous() and torch.equal(got, want)


@given(n=st.integers(1, 700), density=st.floats(0.0, 1.0), slack=st.integers(0, 200),
       seed=st.integers(0, 2**31 - 1))
def test_pack_positions_lists_the_kept_positions_in_order(n, density, slack, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(2, 3, n, generator=g) < density
    capacity = int(keep.sum(-1).max()) + slack
    positions, counts = pack_positions(keep, capacity)
    assert positions.dtype == counts.dtype == torch.int64 and positions.shape == (2, 3, capacity)
    for b in range(2):
        for h in range(3):
            kept = keep[b, h].nonzero().flatten().tolist()
            assert counts[b, h] == len(kept)
            assert positions[b, h].tolist() == kept + [PAD_POSITION] * (capacity - len(kept))
