"""Theorem 1: dropping softmax mass gamma moves each output coordinate by at most 2*gamma*max|V|."""

import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

from tca_flex import HeadBudgets, TCAConfig
from tca_flex.attention import tca_prefill_attention
from tca_flex.cache import TCACacheLayer
from tca_flex.config import SelectionConfig
from tca_flex.mass import retained_mass
from tca_flex.reference import causal_mask, reference_attention, reference_mask
from tca_flex.selection import select

from .oracles import reference_selection, selection_is_ambiguous


def dense_probs(q, k, scaling):
    g = q.shape[1] // k.shape[1]
    logits = q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) * scaling
    mask = causal_mask(q.shape[2], k.shape[2])
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), -1), mask


@given(st.integers(0, 2**31 - 1), st.integers(2, 40), st.integers(1, 16), st.floats(0.05, 1.0),
       st.floats(0.1, 5.0))
@example(seed=0, length=28, d=1, keep_prob=0.25, scale_v=1.0)  # gamma near 1: rounding
@example(seed=0, length=11, d=2, keep_prob=0.25, scale_v=1.0)
def test_bound_on_random_kept_sets(seed, length, d, keep_prob, scale_v):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 2, length, d, generator=g, dtype=torch.float64) * 2, \
        torch.randn(1, 2, length, d, generator=g, dtype=torch.float64) * 2
    v = torch.randn(1, 2, length, d, generator=g, dtype=torch.float64) * scale_v
    p, causal = dense_probs(q, k, d ** -0.5)
    kept = (torch.rand(1, 2, length, length, generator=g, dtype=torch.float64) < keep_prob) & causal
    kept |= torch.eye(length, dtype=torch.bool)  # every query keeps at least itself
    gamma = (p * ~kept).sum(-1)
    dense = reference_attention(q, k, v, causal.expand_as(kept), d ** -0.5)
    sparse = reference_attention(q, k, v, kept, d ** -0.5)
    bound = 2 * gamma * v.abs().max()
    assert ((dense - sparse).abs() <= bound.unsqueeze(-1) + 1e-12).all()
    # The renormalised sparse row differs from the dense row by exactly 2*gamma in L1.
    # (normalise by the kept sum itself: 1 - gamma loses every digit when gamma is near 1)
    kept_p = torch.where(kept, p, 0.0)
    p_sparse = kept_p / kept_p.sum(-1, keepdim=True)
    torch.testing.assert_close((p - p_sparse).abs().sum(-1), 2 * gamma, atol=1e-9, rtol=1e-9)


@given(st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.1, 0.4, 0.9]))
def test_bound_holds_for_tca_selection(seed, frac):
    """On TCA's own kept sets, the compiled flex output obeys the bound, gamma from the LSE path."""
    g = torch.Generator().manual_seed(seed)
    length, d, window = 320, 16, 64
    q = torch.randn(1, 4, length, d, generator=g) * 2
    k = torch.randn(1, 2, length, d, generator=g) * 2
    v = torch.randn(1, 2, length, d, generator=g)
    config = TCAConfig(block_size=32, window=window)
    budgets = HeadBudgets.uniform(1, 2, frac, config)
    scale = d ** -0.5
    out = tca_prefill_attention(q, k, v, budgets.cdf(0), config, scale).double()
    s_ref, keep = reference_selection(q, k, budgets.probs[0], config)  # the oracle's own selection
    assume(not selection_is_ambiguous(s_ref, keep, config))  # float32 ties at a cut may go either way
    p, causal = dense_probs(q, k, scale)
    mask = reference_mask(keep, window, 4)
    gamma = (p * ~mask).sum(-1)
    # The chunked LSE path reports the same dropped mass as the float64 softmax.
    gamma_lse = 1 - retained_mass(q, k, keep, window, scale, chunk=100).double()
    torch.testing.assert_close(gamma_lse, gamma, atol=2e-5, rtol=0)
    dense = reference_attention(q, k, v, causal.expand_as(mask), scale)
    tol = 1e-5  # float32 kernel rounding
    assert ((out - dense).abs() <= (2 * gamma * v.abs().max()).unsqueeze(-1) + tol).all()
    if frac == 0.0:
        assert gamma[..., window:].max() > 0  # the test exercises real dropping


@given(st.integers(0, 2**31 - 1), st.integers(100, 220), st.floats(0.05, 0.6), st.integers(20, 60),
       st.sampled_from(["math", "flex"]))
def test_bound_holds_for_pruned_cache_decode(seed, length, frac, steps, backend):
    """Decode over ``TCACache``'s pruned layer (a real prefill selection, then steps that compress
    blocks leaving the window): each step's output is attention over exactly the tokens the cache
    holds, so against dense attention over every token so far it obeys the bound with gamma = the
    dense mass on the tokens the cache dropped."""
    g = torch.Generator().manual_seed(seed)
    hkv, group, d, block, window = 2, 2, 16, 16, 32
    config = TCAConfig(block_size=block, window=window)
    scale = d ** -0.5
    q = torch.randn(1, hkv * group, length, d, generator=g) * 2
    keys = torch.randn(1, hkv, length, d, generator=g) * 2
    values = torch.randn(1, hkv, length, d, generator=g)
    budgets = HeadBudgets.uniform(1, hkv, frac, config)
    sel = select(q, keys, budgets.cdf(0), SelectionConfig(block_size=block, window=window, alpha=config.alpha),
                 scaling=scale)
    layer = TCACacheLayer(config, budgets.keep_per_block()[0].tolist(), backend=backend)
    layer.update(keys, values)
    layer.finish_prefill(keys, values, sel)
    dropped_any = False
    for _ in range(steps):
        k_new, v_new = torch.randn(1, hkv, 1, d, generator=g) * 2, torch.randn(1, hkv, 1, d, generator=g)
        keys, values = torch.cat([keys, k_new], 2), torch.cat([values, v_new], 2)
        layer.update(k_new, v_new)
        n = keys.shape[2]
        kept = torch.zeros(1, hkv, 1, n, dtype=torch.bool)
        for h in range(hkv):
            kept[0, h, 0, layer.kept_positions(0, h)] = True
        mask = kept.repeat_interleave(group, 1)
        query = torch.randn(1, hkv * group, 1, d, generator=g) * 2
        out = layer.decode_step(query, scale).double()
        dense = reference_attention(query, keys, values, torch.ones_like(mask), scale)
        p, _ = dense_probs(query, keys, scale)
        gamma = (p * ~mask).sum(-1)
        dropped_any |= bool(gamma.max() > 1e-3)
        torch.testing.assert_close(out, reference_attention(query, keys, values, mask, scale), atol=1e-5, rtol=1e-5)
        assert ((out - dense).abs() <= (2 * gamma * values.abs().max()).unsqueeze(-1) + 1e-5).all()
    assert layer.get_seq_length() == length + steps
    assert dropped_any or frac > 0.5  # sparse budgets really drop mass
