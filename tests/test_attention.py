import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_mask

from tca_flex import HeadBudgets, TCAConfig
from tca_flex.attention import tca_prefill_attention
from tca_flex.config import SelectionConfig
from tca_flex.masks import capacity_mask_mod, count_at_most, tca_block_mask, tca_mask_mod
from tca_flex.reference import reference_attention, reference_importance, reference_keep, reference_mask
from tca_flex.selection import select

from .oracles import reference_selection, selection_is_ambiguous

# (bsz, H_q, H_kv, L, D, window, block, keep fraction): GQA and MHA, lengths
# that are not multiples of any block, windows that are and are not multiples
# of the 128-wide kernel tile.
CASES = [
    (1, 4, 2, 700, 32, 256, 64, 0.3),
    (2, 4, 4, 333, 16, 128, 32, 0.5),
    (1, 6, 2, 1000, 64, 192, 128, 0.1),
    (2, 4, 2, 100, 16, 32, 16, 0.4),  # one query tile of the 128-wide kernel: lo/hi counted by comparison
]


def make(case, dtype, seed):
    bsz, hq, hkv, length, d, window, block, frac = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(bsz, h, length, d, generator=g).to(dtype) for h in (hq, hkv, hkv))
    config = TCAConfig(block_size=block, window=window)
    return q, k, v, config, HeadBudgets.uniform(1, hkv, frac, config)


def expected(q, k, v, config, budgets):
    """float64 output and kept set, from the reference's own importance and selection; draws where
    float32 rounding may legitimately choose other tokens are skipped (``selection_is_ambiguous``)."""
    s_ref, keep = reference_selection(q, k, budgets.probs[0], config)
    assume(not selection_is_ambiguous(s_ref, keep, config))
    return reference_attention(q, k, v, reference_mask(keep, config.window, q.shape[1]), q.shape[-1] ** -0.5), keep


seeds = st.integers(0, 2**31 - 1)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, None)])
@settings(max_examples=3)  # the shapes stay the case's: fresh inputs, no new compile
@given(seed=seeds)
def test_prefill_matches_reference(case, dtype, tol, seed):
    q, k, v, config, budgets = make(case, dtype, seed)
    out = tca_prefill_attention(q, k, v, budgets.cdf(0), config, q.shape[-1] ** -0.5)
    ref, keep = expected(q, k, v, config, budgets)
    assert out.dtype == dtype and torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    if dtype != torch.float32:
        # Within twice the error of the same masked attention done by SDPA in this dtype.
        mask = reference_mask(keep, config.window, q.shape[1])
        g = q.shape[1] // k.shape[1]
        eager = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)
        tol = 2 * (eager.double() - ref).abs().max().item() + 1e-3
    assert err < tol, f"max abs error {err} > {tol} (seed {seed})"


@given(rows=st.integers(1, 4), width=st.integers(1, 40), values=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_count_at_most_is_searchsorted_right(rows, width, values, seed):
    """Both of its forms (one value per row: by comparison; more: searchsorted) against torch.searchsorted
    on sorted rows with repeats and a large padding value, values below, inside and past the rows."""
    g = torch.Generator().manual_seed(seed)
    sorted_rows = torch.randint(0, 30, (rows, 2, width), generator=g).sort(-1).values
    sorted_rows[..., width // 2:] = torch.where(torch.rand(rows, 2, width - width // 2, generator=g) < 0.3,
                                                2**40, sorted_rows[..., width // 2:]).sort(-1).values
    v = torch.randint(-3, 35, (rows, 2, values), generator=g)
    assert torch.equal(count_at_most(sorted_rows, v), torch.searchsorted(sorted_rows, v, right=True))


@pytest.mark.parametrize("case", CASES)
@settings(max_examples=3)
@given(seed=seeds)
def test_block_mask_is_exact(case, seed):
    """Every visible key is in a listed block; full blocks are entirely visible."""
    q, k, v, config, budgets = make(case, torch.float32, seed)
    sel = select(q, k, budgets.cdf(0), SelectionConfig(block_size=config.block_size, window=config.window,
                                                        alpha=config.alpha), scaling=q.shape[-1] ** -0.5)
    bsz, hq, length = q.shape[0], q.shape[1], q.shape[2]
    bm = tca_block_mask(sel.positions, length, config.window, hq)
    kv_len = sel.positions.shape[-1] + length
    dense = create_mask(bm.mask_mod, bsz, hq, length, kv_len, device="cpu")
    listed = torch.zeros(bsz, hq, -(-length // 128), -(-kv_len // 128), dtype=torch.bool)
    full = torch.zeros_like(listed)
    for target, num, idx in ((listed, bm.kv_num_blocks, bm.kv_indices),
                             (full, bm.full_kv_num_blocks, bm.full_kv_indices)):
        for b in range(bsz):
            for h in range(hq):
                for qb in range(listed.shape[2]):
                    target[b, h, qb, idx[b, h, qb, : num[b, h, qb]].long()] = True
    assert not (listed & full).any()
    # Out-of-range rows and columns (past L or KV_LEN) are never read by the
    # kernel: count them as visible for "all" and invisible for "any".
    def tiles(fill):
        pad = (0, full.shape[-1] * 128 - kv_len, 0, full.shape[-2] * 128 - length)
        return torch.nn.functional.pad(dense, pad, value=fill).view(bsz, hq, full.shape[2], 128, full.shape[3], 128)

    any_visible = tiles(False).any(-1).any(-2)
    all_visible = tiles(True).all(-1).all(-2)
    assert not (any_visible & ~(listed | full)).any(), "a visible key sits in an unlisted block"
    assert (all_visible | ~full).all(), "a block marked full hides a key"


@pytest.mark.parametrize("case", CASES)
@settings(max_examples=3)
@given(seed=seeds)
def test_packed_mask_function_gives_the_reference_mask(case, seed):
    """Both packed mask functions (key-position table; capacity split), evaluated on every
    (query, packed or local key), see exactly the keys of the explicit reference mask, each once."""
    q, k, v, config, budgets = make(case, torch.float32, seed)
    sel = select(q, k, budgets.cdf(0), SelectionConfig(block_size=config.block_size, window=config.window,
                                                        alpha=config.alpha), scaling=q.shape[-1] ** -0.5)
    bsz, hq, length = q.shape[0], q.shape[1], q.shape[2]
    hkv = k.shape[1]
    capacity = sel.positions.shape[-1]
    ref = reference_mask(sel.keep_mask(length), config.window, hq, torch.arange(length))  # [B, H_q, L, L]
    pos = sel.positions.repeat_interleave(hq // hkv, 1)[:, :, None, :].expand(-1, -1, length, -1)
    for mod in (tca_mask_mod(sel.positions, length, config.window, hq // hkv),
                capacity_mask_mod(sel.positions, config.window, hq // hkv)):
        dense = create_mask(mod, bsz, hq, length, capacity + length, device="cpu")
        # Fold the packed keys back onto their positions: each position is seen at most once.
        packed = dense[..., :capacity]
        assert not (packed & (pos >= length)).any(), "a padding slot of the packed prefix is visible"
        folded = dense[..., capacity:].to(torch.int32)
        folded.scatter_add_(-1, pos.clamp(max=length - 1), packed.to(torch.int32))
        assert folded.max() <= 1, "a key is visible twice (packed and local)"
        assert torch.equal(folded.bool(), ref.expand_as(folded))


@settings(max_examples=4)
@given(seed=seeds)
def test_prefill_with_spread_observers_matches_reference_end_to_end(seed):
    """The accuracy knobs (last-m + spread observers, pooling, normalised score) end to end vs float64."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv, length, d, window, block = CASES[0][1:7]  # a compiled shape: no extra compile
    q, k, v = (torch.randn(1, h, length, d, generator=g) for h in (hq, hkv, hkv))
    config = TCAConfig(block_size=block, window=window, num_observation_queries=8, pool_kernel=5,
                       spread_observation_queries=6, normalize_redundancy=True)
    budgets = HeadBudgets.uniform(1, hkv, 0.3, config)
    scale = d ** -0.5
    out = tca_prefill_attention(q, k, v, budgets.cdf(0), config, scale)
    s_ref = reference_importance(q, k, scale, 8, "mean", 6, window)
    keep = reference_keep(s_ref, budgets.probs[0], SelectionConfig(block_size=block, window=window,
                                                                    alpha=config.alpha, normalize=True, pool_kernel=5))
    assume(not selection_is_ambiguous(s_ref, keep, config))
    ref = reference_attention(q, k, v, reference_mask(keep, window, hq), scale)
    err = (out.double() - ref).abs().max().item()
    assert err < 2e-5, f"max abs error {err} (seed {seed})"
