"""Selection by reconstruction (tca_flex/reconstruct.py): scores, selection and the pruned cache."""

import os
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from transformers import DynamicCache

import tca_flex
from tca_flex import HeadBudgets, TCACache, TCAConfig
from tca_flex.hfcompat import cache_kwargs
from tca_flex.masks import KERNEL_BLOCK, tiled
from tca_flex.reconstruct import (
    head_top_keep,
    prefill_by_reconstruction,
    reconstruction_importance,
    score_rows,
    triton_reconstruct,
)
from tca_flex.reference import reference_keep
from tca_flex.selection import budget_ladder, keep_from_importance, pool_importance, select

from .layout_checks import assert_slot_layout
from .oracles import ReferenceModel, selection_is_ambiguous

SPARSE = TCAConfig(block_size=16, window=64, pool_kernel=3)


def fresh_seed():
    return random.SystemRandom().randrange(1, 10**6)


def ids(length, bsz=1, seed=0):
    return torch.randint(0, 256, (bsz, length), generator=torch.Generator().manual_seed(seed))


def reference_rows(query, key, value, scaling, context, scored_from, reduce):
    """float64, one query at a time: softmax over keys ``<= context + i``."""
    q, k, v = query.double(), key.double(), value.double()
    bsz, hq, lq, _ = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    out = torch.zeros_like(q)
    rows = [[[] for _ in range(hkv)] for _ in range(bsz)]
    for b in range(bsz):
        for h in range(hq):
            for i in range(lq):
                vis = context + i + 1
                p = torch.softmax((k[b, h // g, :vis] @ q[b, h, i]) * scaling, -1)
                out[b, h, i] = p @ v[b, h // g, :vis]
                if i >= scored_from:
                    rows[b][h // g].append(p[:context])
    score = torch.zeros(bsz, hkv, context, dtype=torch.float64)
    for b in range(bsz):
        for h in range(hkv):
            if rows[b][h]:
                stack = torch.stack(rows[b][h])
                score[b, h] = stack.amax(0) if reduce == "max" else stack.mean(0)
    return out, score


@given(seed=st.integers(0, 10**6), bsz=st.integers(1, 2), g=st.sampled_from([1, 2, 3]), context=st.integers(1, 40),
       lq=st.integers(1, 30), scored_from=st.integers(0, 10), chunk=st.integers(1, 17),
       reduce=st.sampled_from(["max", "mean"]))
def test_score_rows_match_a_float64_reference(seed, bsz, g, context, lq, scored_from, chunk, reduce):
    gen = torch.Generator().manual_seed(seed)
    hkv, d = 2, 8
    q = torch.randn(bsz, hkv * g, lq, d, generator=gen)
    k = torch.randn(bsz, hkv, context + lq, d, generator=gen)
    v = torch.randn(bsz, hkv, context + lq, d, generator=gen)
    out, score = score_rows(q, k, v, d ** -0.5, context, scored_from, reduce, query_chunk=chunk)
    want_out, want_score = reference_rows(q, k, v, d ** -0.5, context, scored_from, reduce)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score.double(), want_score, atol=1e-6, rtol=1e-5)


needs_triton = pytest.mark.skipif(
    triton_reconstruct is None or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs Triton (compiled on a GPU, or its CPU interpreter: TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@needs_triton
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), bsz=st.integers(1, 2), g=st.sampled_from([1, 2, 3]), context=st.integers(1, 70),
       lq=st.integers(1, 40), scored_from=st.integers(0, 10), d=st.sampled_from([16, 32]),
       reduce=st.sampled_from(["max", "mean"]))
def test_triton_score_rows_match_a_float64_reference(seed, bsz, g, context, lq, scored_from, d, reduce):
    """FlexAttention's output and lse, then the score kernel (Triton's interpreter without a GPU)."""
    gen = torch.Generator().manual_seed(seed)
    hkv = 2
    q = torch.randn(bsz, hkv * g, lq, d, generator=gen)
    k = torch.randn(bsz, hkv, context + lq, d, generator=gen)
    v = torch.randn(bsz, hkv, context + lq, d, generator=gen)
    args = (d ** -0.5, context, scored_from, reduce)
    out, score = score_rows(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), *args, backend="triton")
    want_out, want_score = reference_rows(q, k, v, *args)
    assert out.dtype == q.dtype and score.shape == (bsz, hkv, context)
    torch.testing.assert_close(out.cpu().double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score.cpu().double(), want_score, atol=1e-6, rtol=1e-5)


@needs_triton
def test_triton_score_kernel_reads_strided_views():
    """A transposed query (as a model's attention hands it over) and a key inside a larger buffer."""
    gen = torch.Generator().manual_seed(fresh_seed())
    context, lq, d = 50, 20, 16
    q = torch.randn(1, lq, 4, d, generator=gen).transpose(1, 2)
    k = torch.randn(1, 2, context + lq + 9, 2 * d, generator=gen)[:, :, :context + lq, ::2]
    v = torch.randn(1, 2, context + lq, d, generator=gen)
    _, want = score_rows(q, k, v, 0.3, context, 3, "max", backend="math")
    _, lse = triton_reconstruct.attention_with_lse(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), 0.3, context)
    got = triton_reconstruct.launch_score(q.to(DEVICE), k.to(DEVICE), lse.transpose(1, 2).contiguous().transpose(1, 2),
                                          0.3, context, 3, "max")
    torch.testing.assert_close(got.cpu(), want, atol=1e-6, rtol=1e-5)


@needs_triton
@given(context=st.integers(0, 400), q_tiles=st.integers(1, 3), extra_tiles=st.integers(0, 1))
def test_block_indices_are_create_block_masks(context, q_tiles, extra_tiles):
    """The tile indices of the pass's BlockMask: the same partial and full tiles as ``create_block_mask``
    (which evaluates the mask everywhere; eager FlexAttention ignores the tiles, so this is their check),
    over padded lengths with or without a tile of key padding past the last visible key."""
    lq = q_tiles * KERNEL_BLOCK
    lk = (-(-(context + lq) // KERNEL_BLOCK) + extra_tiles) * KERNEL_BLOCK
    kv_num, kv_idx, full_num, full_idx = triton_reconstruct.offset_causal_block_indices(context, lq, lk,
                                                                                        torch.device("cpu"))
    got = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=KERNEL_BLOCK,
                                   seq_lengths=(lq, lk), compute_q_blocks=False)
    want = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + context, None, None, lq, lk,
                             device="cpu")

    def tiles(num, idx):
        dense = torch.zeros(idx.shape[-2], idx.shape[-1], dtype=torch.bool)
        for m in range(idx.shape[-2]):
            dense[m, idx[0, 0, m, :num[0, 0, m]].long()] = True
        return dense

    assert torch.equal(tiles(got.kv_num_blocks, got.kv_indices), tiles(want.kv_num_blocks, want.kv_indices))
    assert torch.equal(tiles(got.full_kv_num_blocks, got.full_kv_indices),
                       tiles(want.full_kv_num_blocks, want.full_kv_indices))


@needs_triton
def test_pass_on_tiles_split_as_on_cuda_is_the_flat_pass():
    """On CUDA the padded pass reaches FlexAttention split into tiles (``masks.tiled``); here, eagerly,
    the split layout gives the flat layout's output and log-sum-exp."""
    gen = torch.Generator().manual_seed(fresh_seed())
    context, lq, d = 150, 70, 16
    q = torch.randn(1, 4, lq, d, generator=gen)
    k, v = torch.randn(2, 1, 2, context + lq, d, generator=gen).unbind(0)
    lq_pad, lk_pad = 128, 256
    indices = triton_reconstruct.offset_causal_block_indices(context, lq_pad, lk_pad, torch.device("cpu"))
    results = []
    for split in (False, True):
        args = [tiled(x, n, split) for x, n in ((q, lq_pad), (k, lk_pad), (v, lk_pad))]
        results.append(triton_reconstruct._offset_causal_flex(*args, torch.tensor(context), *indices, 0.25, None))
    for flat, split in zip(*results, strict=True):
        torch.testing.assert_close(split[:, :, :lq], flat[:, :, :lq], atol=0, rtol=0)
    want, _ = score_rows(q, k, v, 0.25, context, 0, "max", backend="math")
    torch.testing.assert_close(results[0][0][:, :, :lq], want, atol=1e-5, rtol=1e-5)


@needs_triton
def test_flex_lse_is_the_natural_log_sum_exp():
    gen = torch.Generator().manual_seed(fresh_seed())
    context, lq, d = 37, 29, 32
    q = torch.randn(2, 6, lq, d, generator=gen)
    k, v = torch.randn(2, 2, 2, context + lq, d, generator=gen).unbind(0)
    _, lse = triton_reconstruct.attention_with_lse(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), 0.2, context)
    logits = (q @ k.repeat_interleave(3, 1).transpose(-1, -2)).double() * 0.2
    visible = torch.arange(context + lq)[None, :] <= torch.arange(lq)[:, None] + context
    want = logits.masked_fill(~visible, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse.cpu().double(), want, atol=1e-5, rtol=1e-5)


def test_triton_backend_refuses_what_it_cannot_run():
    q, k = torch.randn(1, 2, 3, 24), torch.randn(1, 1, 8, 24)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        score_rows(q, k, k, 0.2, 5, 0, backend="triton")
    with pytest.raises(ValueError, match="is not one of"):
        score_rows(q, k, k, 0.2, 5, 0, backend="flash")
    # "auto" falls back to the eager form where the kernel cannot run (and always off CUDA).
    out, score = score_rows(q, k, k, 0.2, 5, 0)
    want_out, want_score = reference_rows(q, k, k, 0.2, 5, 0, "max")
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score.double(), want_score, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_importance_is_the_attention_of_a_dense_repeat_pass(tiny_llama, reduce):
    """The repeat pass on top of the cached context attends as one dense forward of context + pass."""
    seed = fresh_seed()
    context, prompt = ids(90, seed=seed), ids(7, seed=seed + 1)
    out = tiny_llama(context, use_cache=True, **cache_kwargs(tiny_llama, DynamicCache(config=tiny_llama.config)))
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    past = [(layer.keys, layer.values) for layer in cache.layers]
    got = reconstruction_importance(tiny_llama, past, context, prompt, reduce)
    whole = torch.cat([context, prompt, context], 1)
    tiny_llama.set_attn_implementation("eager")
    try:
        attn = tiny_llama(whole, output_attentions=True).attentions
    finally:
        tiny_llama.set_attn_implementation("sdpa")
    for layer, probs in enumerate(attn):  # [1, H_q, 187, 187]
        rows = probs[0, :, 90 + 7:, :90].double()  # the repeated context's queries on the context
        rows = rows.reshape(2, 2 * rows.shape[1], 90)  # KV head h: query heads 2h, 2h + 1
        want = rows.amax(1) if reduce == "max" else rows.mean(1)
        torch.testing.assert_close(got[layer][0].double(), want, atol=1e-5, rtol=1e-4)


@given(seed=st.integers(0, 10**6), length=st.integers(1, 200), kernel=st.sampled_from([1, 3, 7]),
       span=st.sampled_from([0, 0, 1, 3]))
def test_head_top_keep_takes_the_ladders_total_by_pooled_score(seed, length, kernel, span):
    gen = torch.Generator().manual_seed(seed)
    budgets = HeadBudgets.uniform(1, 2, 0.3, SPARSE)
    knobs = SPARSE.replace(pool_kernel=kernel, span=span).selection
    s = torch.rand(1, 2, length + 64, generator=gen)
    keep = head_top_keep(s, budgets.cdf(0), knobs, length)
    n = -(-length // 16)
    ladder = budget_ladder(budgets.cdf(0), n)
    sizes = torch.tensor([min(16, length - 16 * j) for j in range(n)])
    pooled = pool_importance(s, kernel)[..., :length]
    for h in range(2):
        total = int(torch.minimum(ladder[h], sizes).sum())
        top = torch.zeros(length, dtype=torch.bool)
        top[pooled[0, h].argsort(descending=True, stable=True)[:total]] = True
        # Each of the top tokens with its span neighbours on both sides, as the block quota keeps them.
        want = top.clone()
        for i in top.nonzero().flatten().tolist():
            want[max(0, i - span): i + span + 1] = True
        assert torch.equal(keep[0, h], want)


@torch.no_grad()
def test_keep_from_importance_is_selects_own_choice():
    """``select`` = importance, then ``keep_from_importance`` (no guard)."""
    gen = torch.Generator().manual_seed(fresh_seed())
    q, k = torch.randn(1, 4, 150, 8, generator=gen), torch.randn(1, 2, 150, 8, generator=gen)
    budgets = HeadBudgets.uniform(1, 2, 0.3, SPARSE)
    sel = select(q, k, budgets.cdf(0), SPARSE.selection, scaling=8 ** -0.5)
    keep = keep_from_importance(sel.importance, budgets.cdf(0), SPARSE.selection, 150 - 64)
    assert torch.equal(keep[..., :86], sel.keep_mask(86))


def repeat_pass_importance(model, budgets, context, prompt):
    """Per layer, float64 ``[1, H_kv, L]``: the reconstruction score computed without the library's pass.
    TCA's prefill of ``context`` by the float64 ``ReferenceModel`` into a DynamicCache, then ``prompt``
    + ``context`` through eager attention on top of it; each context position's score is the max over the
    repeated context's queries and the KV head's query heads of the probability they give it."""
    reference = ReferenceModel(budgets, pruned=False)
    cache = DynamicCache(config=model.config)
    model.set_attn_implementation(reference.name)
    try:
        model(context, **cache_kwargs(model, cache))
        model.set_attn_implementation("eager")
        attn = model(torch.cat([prompt, context], 1), output_attentions=True, **cache_kwargs(model, cache)).attentions
    finally:
        model.set_attn_implementation("sdpa")
    n, r = context.shape[1], prompt.shape[1]
    out = []
    for probs in attn:  # [1, H_q, r + n, n + r + n]
        rows = probs[0, :, r:, :n].double()
        out.append(rows.reshape(2, -1, n).amax(1)[None])  # KV head h: query heads 2h, 2h + 1
    return out


@torch.no_grad()
def test_prefill_by_reconstruction_keeps_the_selection_and_the_window(tiny_llama):
    """The kept sets are the reference selection (``reference_keep``) of the repeat pass's score, computed
    by hand, plus the final window; the logits are TCA's own prefill's."""
    budgets = HeadBudgets.uniform(2, 2, 0.25, SPARSE)
    for _ in range(5):  # draws whose cut ties within float32 rounding are redrawn
        seed = fresh_seed()
        context, prompt = ids(200, seed=seed), ids(9, seed=seed + 1)
        scores = repeat_pass_importance(tiny_llama, budgets, context, prompt)
        keeps = [reference_keep(s, budgets.probs[i], SPARSE.selection) for i, s in enumerate(scores)]
        # One budget for every rank (uniform): only cuts inside blocks can flip, at float32 rounding.
        ambiguous = any(selection_is_ambiguous(s, k, SPARSE, rtol=1e-5, ranks_matter=False)
                        for s, k in zip(scores, keeps, strict=True))
        if not ambiguous:
            break
    assert not ambiguous, "five draws in a row with a tie at a cut"
    tca_flex.apply(tiny_llama, budgets=budgets)
    cache = TCACache(tiny_llama)
    logits = prefill_by_reconstruction(tiny_llama, context, cache, prompt)
    # The logits are those of TCA's own prefill (the cache only changes what is kept).
    want = tiny_llama(context).logits[:, -1]
    torch.testing.assert_close(logits, want)
    for layer, keep in zip(cache.layers, keeps, strict=True):
        for h in range(2):
            want_pos = torch.cat([keep[0, h].nonzero()[:, 0], torch.arange(136, 200)])
            assert torch.equal(layer.kept_positions(0, h), want_pos)
        assert layer.get_seq_length() == 200
    # The conversation goes on: a decode step and a chunk append to it.
    nxt = logits.argmax(-1, keepdim=True)
    step = tiny_llama(nxt, use_cache=True, position_ids=torch.tensor([[200]]), **cache_kwargs(tiny_llama, cache))
    chunk = tiny_llama(ids(40, seed=seed + 2), use_cache=True, position_ids=torch.arange(201, 241)[None],
                       **cache_kwargs(tiny_llama, cache))
    assert torch.isfinite(step.logits).all() and torch.isfinite(chunk.logits).all()
    assert cache.get_seq_length() == 241


@torch.no_grad()
def test_keep_all_prefill_by_reconstruction_is_dense(tiny_llama):
    """With keep-all budgets nothing is dropped: the conversation continues exactly as dense."""
    seed = fresh_seed()
    context, prompt, more = ids(180, bsz=2, seed=seed), ids(5, seed=seed + 1), ids(30, bsz=2, seed=seed + 2)
    dense_cache = DynamicCache(config=tiny_llama.config)
    tiny_llama(context, use_cache=True, **cache_kwargs(tiny_llama, dense_cache))
    want = tiny_llama(more, use_cache=True, position_ids=torch.arange(180, 210)[None],
                      **cache_kwargs(tiny_llama, dense_cache)).logits
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.dense(2, 2, SPARSE))
    cache = TCACache(tiny_llama)
    prefill_by_reconstruction(tiny_llama, context, cache, prompt)
    got = tiny_llama(more, use_cache=True, position_ids=torch.arange(180, 210)[None],
                     **cache_kwargs(tiny_llama, cache)).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert cache.memory_report().total.kept_fraction == 1.0


def test_prefill_by_reconstruction_refuses_a_used_cache(tiny_llama):
    with pytest.raises(ValueError, match="not prepared"):
        prefill_by_reconstruction(tiny_llama, ids(100), None, ids(3))
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 2, 0.25, SPARSE))
    cache = TCACache(tiny_llama)
    with torch.no_grad():
        tiny_llama(ids(100), use_cache=True, **cache_kwargs(tiny_llama, cache))
    with pytest.raises(ValueError, match="empty TCACache"):
        prefill_by_reconstruction(tiny_llama, ids(100), cache, ids(3))


def test_prefill_by_reconstruction_refuses_what_it_cannot_honour(tiny_llama):
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 2, 0.25, SPARSE))
    # Checked whatever the prompt's length (a prompt that fits the window never scores anything).
    for length in (40, 120):
        for bad, match in (({"quota": "heads"}, "quota="), ({"reduce": "sum"}, "reduce="),
                           ({"context_chunk": 0}, "context_chunk")):
            with pytest.raises(ValueError, match=match):
                prefill_by_reconstruction(tiny_llama, ids(length), TCACache(tiny_llama), ids(3), **bad)
    # The guard measures the prompt's last query, which this selection never sees.
    tca_flex.remove(tiny_llama)
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 2, 0.25, SPARSE.replace(guard_floor=0.9)))
    with pytest.raises(ValueError, match="guard_floor"):
        prefill_by_reconstruction(tiny_llama, ids(120), TCACache(tiny_llama), ids(3))


def top_t_by(scores, start, stop, block, t):
    """Positions of the per-block top-``t`` of ``scores`` over whole blocks in ``[start, stop)`` (older wins ties)."""
    kept = []
    for s in range(start, stop, block):
        seg = scores[s:s + block]
        order = sorted(range(block), key=lambda i: (-float(seg[i]), i))[:t]
        kept += [s + i for i in sorted(order)]
    return torch.tensor(kept, dtype=torch.long)


@torch.no_grad()
@pytest.mark.parametrize("chunked", [True, False])
def test_a_prior_ranks_the_prefill_windows_blocks_when_they_leave(tiny_llama, chunked):
    """Blocks of the prior's range keep their top-t by the prior; everything else is as without it."""
    seed = fresh_seed()
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 2, 0.25, SPARSE))  # t = 4 of 16
    prompt, more = ids(150, seed=seed), ids(100, seed=seed + 1)
    gen = torch.Generator().manual_seed(seed)
    priors = [torch.rand(1, 2, 150, generator=gen) for _ in range(2)]
    caches, logits = [], []
    for use_prior in (False, True):
        cache = TCACache(tiny_llama)
        tiny_llama(prompt, use_cache=True, **cache_kwargs(tiny_llama, cache))
        if use_prior:
            for layer, prior in zip(cache.layers, priors, strict=True):
                layer.set_prior(prior)
        if chunked:
            out = tiny_llama(more, use_cache=True, position_ids=torch.arange(150, 250)[None],
                             **cache_kwargs(tiny_llama, cache)).logits
        else:  # decode steps, one token each: blocks leave one at a time
            out = torch.cat([tiny_llama(more[:, i:i + 1], use_cache=True, position_ids=torch.tensor([[150 + i]]),
                                        **cache_kwargs(tiny_llama, cache)).logits for i in range(100)], 1)
        caches.append(cache)
        logits.append(out)
    # The prior changes what is kept, not the attention before: the whole chunk, or the decode steps
    # up to the one after which the first block leaves (token 165: 86 + 16 - 1 = 165 - 64).
    same = 100 if chunked else 16
    torch.testing.assert_close(logits[0][:, :same], logits[1][:, :same])
    if not chunked:
        assert (logits[0][:, same:] - logits[1][:, same:]).abs().max() > 1e-4
    for plain, primed, prior in zip(caches[0].layers, caches[1].layers, priors, strict=True):
        assert_slot_layout(plain)
        assert_slot_layout(primed)
        assert primed.prior is None  # spent: its four whole blocks [86, 150) have left the window
        for h in range(2):
            a, b = plain.kept_positions(0, h), primed.kept_positions(0, h)
            want = top_t_by(prior[0, h], 86, 150, 16, 4)
            assert torch.equal(b[(b >= 86) & (b < 150)], want)
            # Blocks past the prior follow the usual rule: in a chunk, scored by the same queries; in
            # decode, by queries that attended to other kept sets, so only the prefill's subset is shared.
            outside = (lambda p: (p < 86) | (p >= 150)) if chunked else (lambda p: p < 86)
            assert torch.equal(a[outside(a)], b[outside(b)])
            assert not torch.equal(a, b)  # random priors choose other tokens than the queries did


def test_set_prior_checks_its_shape(tiny_llama):
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 2, 0.25, SPARSE))
    cache = TCACache(tiny_llama)
    with pytest.raises(RuntimeError, match="prefilled"):
        cache.layers[0].set_prior(torch.rand(1, 2, 10))
    with torch.no_grad():
        tiny_llama(ids(100), use_cache=True, **cache_kwargs(tiny_llama, cache))
    for bad in (torch.rand(1, 2, 101), torch.rand(1, 3, 50), torch.rand(2, 50)):
        with pytest.raises(ValueError, match="prior scores"):
            cache.layers[0].set_prior(bad)


@torch.no_grad()
def test_documented_use_with_generate(tiny_llama):
    """docs/chunked_prefill.md: prefill all but the last token, then generate turn after turn.

    With keep-all budgets the conversation equals dense token for token; with sparse ones it runs."""
    seed = fresh_seed()
    turn1, turn2, repeat = ids(160, seed=seed), ids(90, seed=seed + 1), ids(6, seed=seed + 2)

    def talk(cache, reconstruct):
        if reconstruct:
            tca_flex.prefill_by_reconstruction(tiny_llama, turn1[:, :-1], cache, repeat)
        out = tiny_llama.generate(turn1, max_new_tokens=5, do_sample=False, **cache_kwargs(tiny_llama, cache))
        return tiny_llama.generate(torch.cat([out, turn2], 1), max_new_tokens=5, do_sample=False,
                                   **cache_kwargs(tiny_llama, cache))

    dense = talk(DynamicCache(config=tiny_llama.config), False)
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.dense(2, 2, SPARSE))
    assert torch.equal(talk(TCACache(tiny_llama), True), dense)
    tca_flex.remove(tiny_llama)
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 2, 0.25, SPARSE))
    cache = TCACache(tiny_llama)
    out = talk(cache, True)
    assert out.shape == dense.shape and cache.get_seq_length() == out.shape[1] - 1
    assert cache.memory_report().total.kept_fraction < 0.8
