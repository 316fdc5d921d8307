import contextlib
import copy
import itertools
import math
import os
import random
import warnings
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

import tca_flex
from tca_flex import HeadBudgets, TCACache, TCAConfig
from tca_flex.cache import TCACacheLayer
from tca_flex.config import SelectionConfig
from tca_flex.decode import decode_attention
from tca_flex.hfcompat import cache_kwargs
from tca_flex.layout import bucket_blocks
from tca_flex.selection import select

from .conftest import tiny_llama_config
from .layout_checks import assert_slot_layout
from .oracles import ReferenceModel

SPARSE = TCAConfig(block_size=16, window=64)


def ids(length, bsz=1, seed=0):
    return torch.randint(0, 256, (bsz, length), generator=torch.Generator().manual_seed(seed))


def mixed_budgets(fractions, config, layers=1):
    """Budgets whose KV heads keep different fractions (so segments differ in size)."""
    rows = [HeadBudgets.uniform(layers, 1, f, config).probs for f in fractions]
    return HeadBudgets(probs=torch.cat(rows, dim=1), config=config)


def kept_sets(layer, bsz, hkv):
    return [[layer.kept_positions(b, h) for h in range(hkv)] for b in range(bsz)]


def reference_decode(q, k_hist, v_hist, kept, scale):
    """float64 attention of q ``[B, H_q, D]`` over exactly the kept positions of each KV head."""
    bsz, hq, _ = q.shape
    g = hq // len(kept[0])
    out = torch.empty(bsz, hq, q.shape[-1], dtype=torch.float64)
    for b in range(bsz):
        for h in range(hq):
            pos = kept[b][h // g]
            probs = torch.softmax(k_hist[b, h // g, pos].double() @ q[b, h].double() * scale, 0)
            out[b, h] = probs @ v_hist[b, h // g, pos].double()
    return out


def reference_importance(q, k_hist, kept, block_pos, kvh, b, scale):
    """float64 GQA-mean probability the current query gives each position of a leaving block."""
    g = q.shape[1] // len(kept[0])
    pos = kept[b][kvh]
    rows = [torch.softmax(k_hist[b, kvh, pos].double() @ q[b, h].double() * scale, 0)
            for h in range(kvh * g, (kvh + 1) * g)]
    probs = torch.stack(rows).mean(0)
    return probs[torch.searchsorted(pos, block_pos)]


def interpreted_triton():
    """Skip unless ``backend="triton"`` can run on CPU tensors: Triton's interpreter.

    ``conftest.py`` sets ``TRITON_INTERPRET=1`` on machines without a GPU, so
    the very kernels (decode attention and block compression, through their
    custom ops) that run on the GPU run here.
    """
    import tca_flex.decode as decode

    if decode.triton_decode is None or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton in interpreter mode (a machine without a GPU)")


# "every step": the compression runs on every step, as in a captured or compiled step, so the
# Triton kernel's on-device "no block leaves" exit and the tensor form's no-op are exercised too.
# "grace": blocks wait that many blocks past the window before they are compressed; each backend
# runs with and without.
@pytest.mark.parametrize("backend,every_step,grace", [("math", False, 1), ("triton", False, 0), ("math", True, 0),
                                                      ("triton", True, 2)])
@torch.no_grad()
def test_decode_equals_reference_over_kept_set_and_keeps_invariants(backend, every_step, grace):
    if backend == "triton":
        interpreted_triton()
    torch.manual_seed(7)
    bsz, hq, hkv, d, length, steps = 2, 4, 2, 16, 150, 70
    cfg = TCAConfig(block_size=8, window=32, grace_blocks=grace)
    lag = 32 + 8 * grace  # a block is compressed once it lies this far behind the newest token
    budgets = mixed_budgets([0.25, 0.625], cfg)
    t = budgets.keep_per_block()[0]
    assert t.tolist() == [2, 5]
    scale = d**-0.5
    total = length + steps
    q_hist = torch.randn(bsz, hq, total, d)
    k_hist, v_hist = torch.randn(bsz, hkv, total, d), torch.randn(bsz, hkv, total, d)
    # growth=0 and one block of headroom: the packed region is re-laid out often.
    layer = TCACacheLayer(cfg, t.tolist(), growth=0.0, min_chunk_blocks=1, backend=backend)
    layer.assume_leaves = True if every_step else None
    k0, v0 = k_hist[:, :, :length], v_hist[:, :, :length]
    assert layer.update(k0, v0)[0] is k0
    sel = select(q_hist[:, :, :length], k0, budgets.cdf(0), SelectionConfig(block_size=8, window=32, alpha=cfg.alpha),
                 scaling=scale)
    layer.finish_prefill(k0, v0, sel)
    kept = kept_sets(layer, bsz, hkv)
    for b in range(bsz):
        for h in range(hkv):
            want = torch.cat([sel.positions[b, h, : sel.counts[b, h]], torch.arange(length - 32, length)])
            assert torch.equal(kept[b][h], want)
    assert layer.get_seq_length() == length
    slots_seen, ncs, compressions = {layer.k_buf.shape[1]}, length - 32, 0
    for step in range(steps):
        p = length + step
        layer.update(k_hist[:, :, p: p + 1], v_hist[:, :, p: p + 1])
        # What the step attends: the cache and the new token (on "triton" the attention's merge writes
        # the token after reading the cache; the other backends appended it already).
        before = [[torch.unique(torch.cat([kept, torch.tensor([p])])) for kept in row]
                  for row in kept_sets(layer, bsz, hkv)]
        q = q_hist[:, :, p]
        out = layer.decode_step(q[:, :, None], scale)
        torch.testing.assert_close(out[:, :, 0].double(), reference_decode(q, k_hist, v_hist, before, scale),
                                   atol=1e-5, rtol=1e-5)
        after = kept_sets(layer, bsz, hkv)
        slots_seen.add(layer.k_buf.shape[1])
        assert layer.var_len.tolist() == layer._packed_lengths()[1]
        assert_slot_layout(layer)
        leaving = p - lag + 1 - ncs == 8  # a whole block lies `grace` blocks past the window
        block = torch.arange(ncs, ncs + 8)
        for b in range(bsz):
            for h in range(hkv):
                pos = after[b][h]
                assert pos.unique().numel() == pos.numel(), "a token is kept twice"
                assert torch.isin(torch.arange(max(p - lag + 1, length - 32), p + 1), pos).all(), "window, grace exact"
                # Positions are preserved: the stored key is the key of that position.
                live = (layer.owner[b] == h).nonzero()[:, 0]
                assert torch.equal(layer.k_buf[b, live], k_hist[b, h, layer.pos[b, live].long()])
                if not leaving:
                    assert torch.equal(pos, before[b][h])
                    continue
                imp = reference_importance(q, k_hist, before, block, h, b, scale)
                top = block[imp.argsort(descending=True)[: t[h]]].sort().values
                assert torch.equal(pos[torch.isin(pos, block)], top)
                old = before[b][h]
                assert torch.equal(pos[~torch.isin(pos, block)], old[~torch.isin(old, block)])
        if leaving:
            ncs, compressions = ncs + 8, compressions + 1
        assert layer.ncs.tolist() == [ncs] * layer.batch_size
    assert compressions == (steps + 32 - lag) // 8  # every block that got `lag` tokens behind
    assert layer._fused_compression(q[:, :, None]) == (backend == "triton")
    assert len(slots_seen) > 2, "the packed region should have grown in chunks"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_decode_on_cuda_matches_math():
    torch.manual_seed(3)
    q = torch.randn(2, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 1000, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    owner = torch.randint(-1, 2, (2, 1000), dtype=torch.int32, device="cuda")
    out_f, lse_f = decode_attention(q, k, v, owner, group=4, scale=0.125, backend="flex")
    out_m, lse_m = decode_attention(q, k, v, owner, group=4, scale=0.125, backend="math")
    torch.testing.assert_close(out_f.float(), out_m.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse_f, lse_m, atol=1e-2, rtol=1e-3)


def test_flex_decode_backend_matches_math():
    torch.manual_seed(3)
    bsz, hq, slots, d = 2, 6, 200, 16
    q = torch.randn(bsz, hq, 1, d)
    k, v = torch.randn(bsz, slots, d), torch.randn(bsz, slots, d)
    owner = torch.randint(-1, 3, (bsz, slots), dtype=torch.int32)
    with warnings.catch_warnings():  # torch warns once per process that eager flex is slow
        warnings.simplefilter("ignore")
        out_f, lse_f = decode_attention(q, k, v, owner, group=2, scale=0.3, backend="flex")
    out_m, lse_m = decode_attention(q, k, v, owner, group=2, scale=0.3, backend="math")
    torch.testing.assert_close(out_f, out_m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_f, lse_m, atol=1e-5, rtol=1e-5)
    head1 = owner[0] == 1
    logits = (k[0, head1] @ q[0, 2, 0]) * 0.3
    torch.testing.assert_close(out_m[0, 2, 0], torch.softmax(logits, 0) @ v[0, head1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_window_covering_everything_generates_exactly_dense(tiny_llama):
    x = ids(150, bsz=2)
    dense = tiny_llama.generate(x, max_new_tokens=20, do_sample=False)
    dense_beam = tiny_llama.generate(x[:1], max_new_tokens=8, do_sample=False, num_beams=2)
    tca_flex.apply(tiny_llama, TCAConfig(block_size=32, window=256))
    cache = TCACache(tiny_llama)
    out = tiny_llama.generate(x, max_new_tokens=20, do_sample=False, **cache_kwargs(tiny_llama, cache))
    assert torch.equal(out, dense)
    assert cache.get_seq_length() == 169
    beam = tiny_llama.generate(x[:1], max_new_tokens=8, do_sample=False, num_beams=2,
                               **cache_kwargs(tiny_llama, TCACache(tiny_llama)))
    assert torch.equal(beam, dense_beam)


@torch.no_grad()
def test_full_budget_pruned_cache_decodes_like_a_full_cache(tiny_llama):
    from transformers import DynamicCache

    tca_flex.apply(tiny_llama, budgets=HeadBudgets.dense(2, 2, SPARSE))
    x = ids(200, seed=4)
    steps = ids(40, seed=5)
    pruned, full = TCACache(tiny_llama), DynamicCache(config=tiny_llama.config)
    torch.testing.assert_close(tiny_llama(x, **cache_kwargs(tiny_llama, pruned)).logits,
                               tiny_llama(x, **cache_kwargs(tiny_llama, full)).logits, atol=2e-5, rtol=1e-4)
    for i in range(steps.shape[1]):  # teacher-forced; crosses two block compressions (t = b keeps all)
        tok = steps[:, i: i + 1]
        torch.testing.assert_close(tiny_llama(tok, **cache_kwargs(tiny_llama, pruned)).logits,
                                   tiny_llama(tok, **cache_kwargs(tiny_llama, full)).logits, atol=2e-5, rtol=1e-4)
    assert pruned.memory_report().total.kept_fraction == 1.0


@torch.no_grad()
def test_sparse_generation_rows_have_their_own_selection(tiny_llama):
    budgets = mixed_budgets([0.25, 0.5], SPARSE, layers=2)
    tca_flex.apply(tiny_llama, budgets=budgets)
    x = ids(200, bsz=2, seed=1)
    both = TCACache(tiny_llama)
    logits = tiny_llama(x, **cache_kwargs(tiny_llama, both)).logits
    alone = [TCACache(tiny_llama) for _ in range(2)]
    for row, cache in enumerate(alone):
        single = tiny_llama(x[row: row + 1], **cache_kwargs(tiny_llama, cache)).logits
        torch.testing.assert_close(single, logits[row: row + 1], atol=1e-4, rtol=1e-4)
        for h in range(2):
            assert torch.equal(both.layers[1].kept_positions(row, h), cache.layers[1].kept_positions(0, h))
    assert not torch.equal(both.layers[1].kept_positions(0, 0), both.layers[1].kept_positions(1, 0))
    row1 = both.layers[1].kept_positions(1, 1)
    both.batch_select_indices(torch.tensor([1]))
    assert torch.equal(both.layers[1].kept_positions(0, 1), row1)
    out = tiny_llama.generate(x, max_new_tokens=40, do_sample=False, return_dict_in_generate=True, output_logits=True,
                              **cache_kwargs(tiny_llama, TCACache(tiny_llama)))
    # Every step of both rows (two block compressions each) against the float64 model that prunes by hand.
    reference = ReferenceModel(budgets, pruned=True)
    want = reference.logits(tiny_llama, out.sequences, 200)
    torch.testing.assert_close(torch.stack(out.logits, 1), want.float(), atol=1e-4, rtol=1e-4)
    beam = tiny_llama.generate(x[:1], max_new_tokens=20, do_sample=False, num_beams=3, return_dict_in_generate=True,
                               output_logits=True, **cache_kwargs(tiny_llama, TCACache(tiny_llama)))
    # Each step's logits, on the beam the token came from, equal the reference run on the final
    # beam alone (its pruned cache rebuilt by hand): reorder_cache moved every row's kept set.
    used = torch.stack([step[beam.beam_indices[0, i]] for i, step in enumerate(beam.logits)])
    torch.testing.assert_close(used, reference.logits(tiny_llama, beam.sequences, 200)[0].float(), atol=1e-4,
                               rtol=1e-4)


@torch.no_grad()
def test_repeated_rows_keep_their_own_selection_and_reset_empties_the_cache(tiny_llama):
    """``batch_repeat_interleave`` (generate's expansion of a filled cache) copies each row's kept set
    and buffers to its copies, which then decode as the original row; after ``reset`` the same cache
    serves a new prompt as a fresh one does."""
    seed = random.randint(1, 10**6)
    tca_flex.apply(tiny_llama, budgets=mixed_budgets([0.25, 0.5], SPARSE, layers=2))
    x = ids(200, bsz=2, seed=seed)
    cache = TCACache(tiny_llama)
    tiny_llama(x, **cache_kwargs(tiny_llama, cache))
    before = [[layer.kept_positions(row, h) for row in range(2) for h in range(2)] for layer in cache.layers]
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 4
    for layer, kept in zip(cache.layers, before, strict=True):
        for row in range(4):
            for h in range(2):
                assert torch.equal(layer.kept_positions(row, h), kept[(row // 2) * 2 + h])
    step = ids(1, bsz=2, seed=seed + 1).repeat_interleave(2, 0)
    logits = tiny_llama(step, position_ids=torch.full((4, 1), 200), **cache_kwargs(tiny_llama, cache)).logits
    torch.testing.assert_close(logits[0::2], logits[1::2], atol=0, rtol=0)
    cache.reset()
    assert cache.get_seq_length() == 0
    y = ids(180, seed=seed + 2)
    fresh = TCACache(tiny_llama)
    want = tiny_llama(y, **cache_kwargs(tiny_llama, fresh)).logits
    torch.testing.assert_close(tiny_llama(y, **cache_kwargs(tiny_llama, cache)).logits, want, atol=0, rtol=0)
    for layer, other in zip(cache.layers, fresh.layers, strict=True):
        assert torch.equal(layer.kept_positions(0, 1), other.kept_positions(0, 1))


@pytest.mark.parametrize("backend", ["math", "flex", "triton"])
@torch.no_grad()
def test_a_refused_step_leaves_the_cache_as_before(tiny_llama, backend):
    """A decode step the attention refuses (a mask with a hole; attention dropout in training mode)
    undoes its layer's append (written by the update, or held for the Triton merge): the retry gives
    the logits and buffers of a cache that never saw it."""
    if backend == "triton" and not tca_flex.decode.triton_supported(torch.zeros(1, 1, 1, 16)):
        pytest.skip("the Triton kernels cannot run here (no GPU and no TRITON_INTERPRET=1)")
    seed = random.randint(1, 10**6)
    tca_flex.apply(tiny_llama, budgets=mixed_budgets([0.25, 0.5], SPARSE, layers=2))
    # Triton's interpreter is slow: there, four steps and one refusal (the held token's case is simple).
    x, steps = ids(200, bsz=2, seed=seed), ids(5 if backend == "triton" else 17, bsz=2, seed=seed + 1)
    refused, clean = TCACache(tiny_llama, backend=backend), TCACache(tiny_llama, backend=backend)
    for cache in (refused, clean):
        tiny_llama(x, **cache_kwargs(tiny_llama, cache))
    for i in range(steps.shape[1]):  # step 15 (position 215) compresses the first block past the window
        tok, n = steps[:, i: i + 1], 201 + i
        if i in (3, 15):
            holed = torch.ones(2, n, dtype=torch.long)
            holed[1, 50] = 0
            with pytest.raises(ValueError, match="left-padded batches only"):
                tiny_llama(tok, attention_mask=holed, **cache_kwargs(tiny_llama, refused))
            for layer in tiny_llama.model.layers:
                layer.self_attn.attention_dropout = 0.1
            tiny_llama.train()
            with pytest.raises(ValueError, match="inference-only"):
                tiny_llama(tok, **cache_kwargs(tiny_llama, refused))
            tiny_llama.eval()
            for layer in tiny_llama.model.layers:
                layer.self_attn.attention_dropout = 0.0
        got = tiny_llama(tok, **cache_kwargs(tiny_llama, refused)).logits
        want = tiny_llama(tok, **cache_kwargs(tiny_llama, clean)).logits
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    for layer, other in zip(refused.layers, clean.layers, strict=True):
        assert layer.get_seq_length() == other.get_seq_length() == 200 + steps.shape[1]
        assert backend == "triton" or int(layer.ncs.min()) > 136  # a block was compressed on the way
        for name in ("owner", "pos", "var_len", "ncs", "next_pos"):
            assert torch.equal(getattr(layer, name), getattr(other, name)), name
        live = layer.owner >= 0
        assert torch.equal(layer.k_buf[live], other.k_buf[live])


@torch.no_grad()
def test_a_cache_the_model_cannot_use_is_refused(tiny_llama):
    """A cache after remove (or re-apply), made for another model, for another batch or dtype: clear
    errors, never attention over another model's buffers."""
    tca_flex.apply(tiny_llama, budgets=mixed_budgets([0.25, 0.5], SPARSE, layers=2))
    x = ids(200, bsz=2, seed=random.randint(1, 10**6))

    def prefilled(rows=x):
        cache = TCACache(tiny_llama)
        tiny_llama(rows, **cache_kwargs(tiny_llama, cache))
        return cache

    TCACache(tiny_llama).batch_repeat_interleave(2)  # an empty cache: nothing to repeat
    cache = prefilled()
    with pytest.raises(ValueError, match="holds 2 rows but this call brings 1"):
        tiny_llama(x[:1, :1], **cache_kwargs(tiny_llama, cache))
    with pytest.raises(TypeError, match="holds torch.float32 K/V but the model now gives torch.bfloat16"):
        tiny_llama.to(torch.bfloat16)(x[:, :1], **cache_kwargs(tiny_llama, cache))
    tiny_llama.float()
    step = tiny_llama(x[:, :1], **cache_kwargs(tiny_llama, cache))  # both refused before any change
    assert cache.get_seq_length() == 201 and torch.isfinite(step.logits).all()
    # Another applied model (or a deep copy): refused before its call runs, whether the cache is
    # empty (a prefill), holds a prompt (a step, a chunk) or goes through generate; the cache is
    # left as it was. The attention's own check, for a model whose wrappers were bypassed, too.
    small = LlamaForCausalLM(tiny_llama_config()).eval()
    tca_flex.apply(small, budgets=mixed_budgets([0.25, 0.5], SPARSE, layers=2))
    held = prefilled()
    for other in (small, copy.deepcopy(tiny_llama)):
        for tokens, generate in ((x, False), (x[:, :1], False), (x[:, :5], False), (x[:, :5], True)):
            for cache in (TCACache(tiny_llama), held):
                with pytest.raises(ValueError, match="TCACache was made for another model"):
                    if generate:
                        other.generate(tokens, max_new_tokens=2, **cache_kwargs(other, cache))
                    else:
                        other(tokens, **cache_kwargs(other, cache))
    assert held.get_seq_length() == 200 and TCACache(tiny_llama).get_seq_length() == 0
    with pytest.raises(ValueError, match="TCACache made for another model"):
        type(small).forward(small, x[:, :1], **cache_kwargs(small, prefilled()))
    # A plain model (SDPA, eager): its attention cannot use the flat buffers a decode update
    # returns (with one row SDPA would broadcast 3-D ones silently), and the cache says why at
    # the next use.
    for implementation in ("sdpa", "eager"):
        plain = LlamaForCausalLM(tiny_llama_config(attn_implementation=implementation)).eval()
        spoiled = prefilled(x[:1])
        with pytest.raises(RuntimeError):
            plain(x[:1, :1], **cache_kwargs(plain, spoiled))
        with pytest.raises(RuntimeError, match="never reached the TCA attention"):
            tiny_llama(x[:1, :1], **cache_kwargs(tiny_llama, spoiled))
        spoiled = prefilled(x[:1])  # a chunk: the mask spans the cache, the keys only the chunk
        with pytest.raises(RuntimeError):
            plain(x[:1, :5], **cache_kwargs(plain, spoiled))
        with pytest.raises(RuntimeError, match="chunk of new tokens never reached"):
            tiny_llama(x[:1, :1], **cache_kwargs(tiny_llama, spoiled))
    # use_cache=False: generate would feed the whole sequence on top of the cache at every step.
    # Refused in the prefill and in a step, each leaving the cache as before the call.
    cache = TCACache(tiny_llama)
    with pytest.raises(ValueError, match="use_cache=False"):
        tiny_llama.generate(x, max_new_tokens=3, do_sample=False, use_cache=False,
                            **cache_kwargs(tiny_llama, cache))
    assert cache.get_seq_length() == 0
    tiny_llama(x, **cache_kwargs(tiny_llama, cache))
    with pytest.raises(ValueError, match="use_cache=False"):
        tiny_llama(x[:, :1], use_cache=False, **cache_kwargs(tiny_llama, cache))
    step = tiny_llama(x[:, :1], **cache_kwargs(tiny_llama, cache)).logits
    torch.testing.assert_close(step, tiny_llama(x[:, :1], **cache_kwargs(tiny_llama, prefilled())).logits,
                               atol=0, rtol=0)
    # A model with more layers: the cache has none for its third.
    k = torch.randn(2, 2, 1, 16)
    with pytest.raises(ValueError, match="made for a model of 2 TCA layers"):
        prefilled().update(k, k, 2)
    cache = prefilled()
    tca_flex.remove(tiny_llama)
    with pytest.raises(RuntimeError, match="tca_flex.remove run on it"):
        tiny_llama(x[:, :1], **cache_kwargs(tiny_llama, cache))


@torch.no_grad()
def test_grace_blocks_is_a_run_time_knob_of_the_cache(tiny_llama):
    """A config that differs from the budgets' only in ``grace_blocks`` applies without a conflict
    (calibration never sees it), and the cache then keeps the grace blocks exact during decode:
    the same generation as the float64 reference that compresses that late."""
    grace = random.randint(1, 3)
    budgets = mixed_budgets([0.25, 0.5], SPARSE, layers=2)
    config = SPARSE.replace(grace_blocks=grace)
    tca_flex.apply(tiny_llama, config=config, budgets=budgets)
    x = ids(200, seed=random.randint(0, 10**6))
    cache = TCACache(tiny_llama)
    out = tiny_llama.generate(x, max_new_tokens=80, do_sample=False, return_dict_in_generate=True,
                              output_logits=True, eos_token_id=None, **cache_kwargs(tiny_llama, cache))
    layer = cache.layers[1]
    assert (layer.compress_window, layer.ring) == (64 + 16 * grace, 64 + 16 * (grace + 1))
    n = layer.get_seq_length()
    assert layer.ncs.tolist() == [136 + 16 * ((n - 136 - layer.compress_window) // 16)]
    for h in range(2):
        assert torch.isin(torch.arange(n - layer.compress_window, n), layer.kept_positions(0, h)).all()
    want = ReferenceModel(budgets.with_config(config), pruned=True).logits(tiny_llama, out.sequences, 200)
    torch.testing.assert_close(torch.stack(out.logits, 1), want.float(), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_memory_report_shows_the_kept_fraction(tiny_llama):
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 2, 0.25, SPARSE))
    cache = TCACache(tiny_llama)
    tiny_llama.generate(ids(200), max_new_tokens=50, do_sample=False, **cache_kwargs(tiny_llama, cache))
    report = cache.memory_report()
    seen = 249
    for i, m in enumerate(report.layers):
        kept = sum(cache.layers[i].kept_positions(0, h).numel() for h in range(2))
        assert m.kept_tokens == kept and m.dense_tokens == 2 * seen
    # Per head: t = 4 of each prefill block (the short last one too), t of each block compressed since,
    # and every position from the first not yet compressed one on (the window and the pending block).
    t, b, w, base = 4, 16, 64, 200 - 64
    done = (seen - w - base) // b
    per_head = sum(min(t, b, base - j) for j in range(0, base, b)) + done * t + seen - (base + done * b)
    assert report.total.kept_fraction == pytest.approx(per_head / seen, rel=1e-12)
    assert report.total.bytes_fraction < 0.7
    assert "total" in report.format()


@torch.no_grad()
def test_storage_stays_within_ten_percent_of_what_is_kept():
    torch.manual_seed(5)
    cfg = TCAConfig(block_size=32, window=256)
    budgets = mixed_budgets([0.1, 0.3, 0.6, 0.9], cfg)
    length, d = 3000, 128
    q, k, v = (torch.randn(1, 4, length, d) for _ in range(3))
    t = budgets.keep_per_block()[0].tolist()
    layer = TCACacheLayer(cfg, t, backend="math")
    layer.update(k, v)
    knobs = SelectionConfig(block_size=32, window=256, alpha=0.5)
    layer.finish_prefill(k, v, select(q, k, budgets.cdf(0), knobs, scaling=d**-0.5))
    reserved = TCACacheLayer(cfg, t, reserve_tokens=100, backend="math")
    reserved.update(k, k)
    reserved.finish_prefill(k, k, select(q, k, budgets.cdf(0), knobs, scaling=d**-0.5))
    slots = reserved.k_buf.shape[1]
    for _ in range(100):  # three blocks leave the window
        step = torch.randn(1, 4, 1, d)
        for cache_layer in (layer, reserved):
            cache_layer.update(step, step)
            cache_layer.decode_step(torch.randn(1, 4, 1, d), d**-0.5)
    assert reserved.k_buf.shape[1] == slots, "reserve_tokens must cover the generation without growing"
    mem = layer.memory()
    counts = [layer.kept_positions(0, h).numel() for h in range(4)]
    assert max(counts) > 3 * min(counts), "heads should keep very different amounts"
    assert mem.kept_tokens == sum(counts)
    assert 0 < mem.overhead < 0.10
    assert mem.bytes_fraction < 0.6


@given(blocks=st.integers(0, 1 << 16), per_octave=st.integers(0, 64))
def test_bucket_blocks_is_the_smallest_grid_size_not_below(blocks, per_octave):
    """``bucket_blocks`` against a scan of the grid ``ceil(2^(j / n))`` from ``j = 0``: the smallest size
    not below ``blocks``, less than ``2^(1/n)`` times it plus one (the price of a bucket)."""
    got = bucket_blocks(blocks, per_octave)
    if per_octave == 0 or blocks <= 1:
        assert got == blocks
        return
    want = next(size for j in itertools.count() if (size := math.ceil(2 ** (j / per_octave))) >= blocks)
    assert got == want
    assert blocks <= got < blocks * 2 ** (1 / per_octave) + 1


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), length=st.integers(200, 1400), offset=st.integers(-40, 40),
       buckets=st.sampled_from([0, 4, 8]))
@torch.no_grad()
def test_buffer_sizes_follow_the_length_bucket_not_the_prompt(seed, length, offset, buckets):
    """With the budgets' cdf a layer sizes its buffers for what the budget ladder keeps over the prompt's
    bucket: two prompts whose global regions round to one size get one layout (slots and the kernel's
    sizes) whatever they say, though their counts differ (partial last blocks under a ladder of unequal
    budgets); every head's room covers its count; and the extra room is at most the extra blocks' tokens."""
    torch.manual_seed(seed)
    cfg = TCAConfig(block_size=32, window=128)
    probs = torch.distributions.Dirichlet(torch.full((33,), 0.3, dtype=torch.float64)).sample((1, 3))
    budgets = HeadBudgets(probs=probs / probs.sum(-1, keepdim=True), config=cfg)
    knobs = SelectionConfig(block_size=32, window=128)
    keep, d = budgets.keep_per_block()[0].tolist(), 16
    sizes, blocks = [], []
    for n in (length, length, length + offset):
        q, k = torch.randn(1, 6, n, d), torch.randn(1, 3, n, d)
        selection = select(q, k, budgets.cdf(0), knobs, scaling=d**-0.5)
        layer = TCACacheLayer(cfg, keep, backend="math", cdf=budgets.cdf(0), size_buckets=buckets, min_chunk_blocks=1,
                              growth=0.0)
        layer.update(k, k)
        layer.finish_prefill(k, k, selection)
        exact = TCACacheLayer(cfg, keep, backend="math", min_chunk_blocks=1, growth=0.0)
        exact.update(k, k)
        exact.finish_prefill(k, k, selection)
        counts, room, own = selection.counts[0].tolist(), layer.layout.var_cap[0], exact.layout.var_cap[0]
        assert all(c + t <= r for c, r, t in zip(counts, room, keep, strict=True)), (counts, room)
        n_blocks = -(-(n - 128) // 32)
        extra = (bucket_blocks(n_blocks, buckets) - n_blocks) * 32
        assert all(r - o <= extra + 32 for r, o in zip(room, own, strict=True)), (room, own, extra)
        sizes.append((layer.layout.slots, layer.segments.max_length, layer.segments.total_length, room))
        blocks.append(bucket_blocks(n_blocks, buckets))
    assert sizes[0] == sizes[1], "one length, two prompts: the layout should not depend on what they say"
    if blocks[2] == blocks[0]:
        assert sizes[2] == sizes[0], "one bucket, two lengths: the layout should be the same"


def test_compiled_decode_step_does_not_recompile():
    from transformers import LlamaForCausalLM

    torch.manual_seed(1234)
    tiny_llama = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1)).eval()  # one layer: faster tracing
    tca_flex.apply(tiny_llama, budgets=mixed_budgets([0.25, 0.5], SPARSE, layers=1))
    x = ids(200, seed=2)
    # Two blocks of headroom: the packed region grows (inside the compiled step) at position 247.
    caches = [TCACache(tiny_llama, growth=0.0, min_chunk_blocks=2) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            first = tiny_llama(x, **cache_kwargs(tiny_llama, cache)).logits[:, -1:].argmax(-1)
    torch._dynamo.reset()
    # aot_eager: recompiles and graph breaks are dynamo's business; inductor's C++ codegen
    # would triple the time on a CPU runner (the same test passed with inductor).
    step = torch.compile(tiny_llama, fullgraph=True, backend="aot_eager")

    @torch.no_grad()
    def run(fn, cache, tok, pos):
        return fn(input_ids=tok, position_ids=torch.tensor([[pos]]), **cache_kwargs(tiny_llama, cache)).logits[:, -1]

    def both(tok, pos):
        eager, compiled = run(tiny_llama, caches[0], tok, pos), run(step, caches[1], tok, pos)
        torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
        return eager.argmax(-1, keepdim=True)

    tok = first
    slots = caches[1].layers[0].k_buf.shape[1]
    for pos in range(200, 253):  # warm-up: sizes become dynamic; one growth, traced in full graph
        tok = both(tok, pos)
    assert caches[1].layers[0].k_buf.shape[1] > slots
    assert min(layer._grow_at for layer in caches[1].layers) == 279
    with torch._dynamo.config.patch(error_on_recompile=True):
        for pos in range(253, 273):  # includes the compression at 263, in the same graph
            tok = both(tok, pos)
    for h in range(2):
        assert torch.equal(caches[0].layers[0].kept_positions(0, h), caches[1].layers[0].kept_positions(0, h))


# Inductor's freezing (weights as constants; q/k/v and gate/up fused into one matmul each) is an option
# users set for dense decode: the TCA step must compile once and stay exact under it too.
@pytest.mark.parametrize("backend, inductor_options", [
    ("aot_eager", {}), ("inductor", {"freezing": True, "cpp.enable_concat_linear": True})])
def test_tca_compile_compiles_the_decode_step_once(tca_compile_settings, backend, inductor_options):
    """``tca_flex.compile``: the first decode step's graph serves every later length (the cache's
    token count is a dynamic source), where plain ``torch.compile`` compiles the second step again;
    its logits equal eager's through the steps, compressions included."""
    import torch._inductor.config as inductor_config
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1)).eval()
    tca_flex.apply(model, budgets=mixed_budgets([0.25, 0.5], SPARSE, layers=1))
    eager_cache, cache = TCACache(model, reserve_tokens=64), TCACache(model, reserve_tokens=64)
    x = ids(200, seed=random.randrange(2**31))  # fresh prompt each run
    torch._dynamo.reset()
    try:
        with torch.no_grad(), inductor_config.patch(inductor_options):
            tok = model(x, **cache_kwargs(model, eager_cache)).logits[:, -1:].argmax(-1)
            model(x, **cache_kwargs(model, cache))
            step = tca_flex.compile(model, fullgraph=True, backend=backend)
            leaves = []
            for i, pos in enumerate(range(200, 240)):
                leaves.append(cache.block_leaves_next())
                with torch._dynamo.config.patch(error_on_recompile=i > 0):
                    got = step(input_ids=tok, position_ids=torch.tensor([[pos]]), **cache_kwargs(model, cache))
                want = model(input_ids=tok, position_ids=torch.tensor([[pos]]), **cache_kwargs(model, eager_cache))
                torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
                tok = want.logits[:, -1:].argmax(-1)
        assert any(leaves[1:]), "no block was compressed in the compiled steps"
    finally:
        torch._dynamo.reset()


@contextlib.contextmanager
def recorded_static_marks():
    """Every ``mark_static_address(t, guard)`` call as ``(t, guard)``, still marking."""
    marked = []
    mark = torch._dynamo.mark_static_address

    def record(t, guard=False):
        marked.append((t, guard))
        mark(t, guard=guard)

    with mock.patch.object(torch._dynamo, "mark_static_address", side_effect=record):
        yield marked


def test_generate_compiles_the_decode_of_a_cache_with_reserved_room():
    """``reserve_tokens`` makes the cache compileable for transformers: ``generate`` compiles the decode
    step (on CUDA with CUDA graphs; here forced on the CPU) over buffers marked static each time they are
    made, and greedy tokens equal eager ``generate``'s; a cache without reserved room is not compiled."""
    from transformers import CompileConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1)).eval()
    tca_flex.apply(model, budgets=mixed_budgets([0.25, 0.5], SPARSE, layers=1))
    x = ids(200, seed=random.randrange(2**31))  # fresh prompt each run
    gen = dict(attention_mask=torch.ones_like(x), max_new_tokens=40, min_new_tokens=40, do_sample=False,
               pad_token_id=0)
    plain = TCACache(model)
    assert not plain.is_compileable
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            want = model.generate(x, **gen, **cache_kwargs(model, plain))
            assert not hasattr(model, "_compiled_call"), "a cache without reserved room was compiled"
            cache = TCACache(model, reserve_tokens=48)
            assert cache.is_compileable
            # aot_eager: what is compiled and how often is dynamo's business, as in the tests above.
            config = CompileConfig(backend="aot_eager", mode=None)
            config._compile_all_devices = True
            with recorded_static_marks() as marked:
                got = model.generate(x, **gen, compile_config=config, **cache_kwargs(model, cache))
        assert hasattr(model, "_compiled_call"), "generate did not compile the decode step"
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        layer = cache.layers[0]
        assert any(t is layer.k_buf for t, _ in marked) and any(t is layer.next_pos for t, _ in marked)
    finally:
        torch._dynamo.reset()


def int_input_recorder(addresses: list | None = None):
    """A torch.compile backend that runs the graph as traced and records, at each call, the tuple of
    its int inputs (what CUDA-graph trees key their graphs by), and the list it records into. With
    ``addresses``, also the addresses of its inputs marked static there (a graph replays only over
    the addresses it was recorded with)."""
    keys: list[tuple] = []

    def backend(gm, example_inputs):
        def run(*args):
            keys.append(tuple(a for a in args if isinstance(a, int)))
            if addresses is not None:
                addresses.append(tuple(a.data_ptr() for a in args if isinstance(a, torch.Tensor)
                                       and getattr(a, "_dynamo_static_input_type", None) is not None))
            return gm(*args)
        return run

    return backend, keys


def test_generate_compiled_step_takes_no_int_input_that_changes_per_step():
    """CUDA-graph trees (``generate``'s ``reduce-overhead``) record a graph per distinct tuple of the
    compiled graph's int inputs: every decode step of ``generate`` must hand the compiled step the same
    ints (the cache's per-step count is kept outside it, ``TCACache.prepare_decode_step``), over a
    generation that compresses blocks, and its greedy tokens equal eager ``generate``'s. ``remove``
    gives the model its own ``prepare_inputs_for_generation`` back."""
    from transformers import CompileConfig

    torch.manual_seed(random.randrange(2**31))
    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=2)).eval()
    tca_flex.apply(model, budgets=mixed_budgets([0.25, 0.5], SPARSE, layers=2))
    x = ids(200, seed=random.randrange(2**31))
    gen = dict(attention_mask=torch.ones_like(x), max_new_tokens=40, min_new_tokens=40, do_sample=False,
               pad_token_id=0)
    recording_backend, keys = int_input_recorder()
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            want = model.generate(x, **gen, disable_compile=True, **cache_kwargs(model, TCACache(model,
                                                                                                 reserve_tokens=48)))
            config = CompileConfig(backend=recording_backend, mode=None)
            config._compile_all_devices = True
            cache = TCACache(model, reserve_tokens=48)
            got = model.generate(x, **gen, compile_config=config, **cache_kwargs(model, cache))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert cache.get_seq_length() == 200 + 39 and not cache.regrew
    assert len(keys) == 39, f"every decode step should run the compiled forward, got {len(keys)} calls"
    assert len(set(keys)) == 1, f"the compiled step's int inputs changed between steps: {sorted(set(keys))[:4]}"
    assert "prepare_inputs_for_generation" in model.__dict__
    clone = copy.deepcopy(model)  # the wrapper is bound to the model it is on
    assert clone.prepare_inputs_for_generation.__self__ is clone
    tca_flex.remove(model)
    assert "prepare_inputs_for_generation" not in model.__dict__


def test_a_reset_cache_replays_the_steps_of_the_last_request_of_its_sizes():
    """A cache reset between two requests of one prompt length, or of two lengths in one size bucket,
    hands the compiled step the same ints and the same static buffers (a new cache brings new ones:
    CUDA-graph trees would record the step again), and each request's greedy tokens equal eager
    ``generate``'s with a new cache; a request of a length in another bucket after a reset is right too."""
    from transformers import CompileConfig

    torch.manual_seed(random.randrange(2**31))
    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=2)).eval()
    tca_flex.apply(model, budgets=mixed_budgets([0.25, 0.5], SPARSE, layers=2))
    gen = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    # Global regions (length - window 64) of 17, 17, 17, 18 and 9 blocks of 16: with 8 sizes a doubling
    # (the default with reserve_tokens) 17 and 18 share the size 18.
    prompts = [ids(n, seed=random.randrange(2**31)) for n in (330, 330, 330, 345, 200)]
    addresses: list[tuple] = []
    recording_backend, keys = int_input_recorder(addresses)
    config = CompileConfig(backend=recording_backend, mode=None)
    config._compile_all_devices = True
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            want = [model.generate(x, attention_mask=torch.ones_like(x), **gen, disable_compile=True,
                                   **cache_kwargs(model, TCACache(model, reserve_tokens=32))) for x in prompts]
            cache = TCACache(model, reserve_tokens=32)
            got, seen, kept = [], [], []
            for i, x in enumerate(prompts):
                if i == 2:
                    # A new cache, the old one kept alive so that the allocator cannot hand its buffers'
                    # addresses back (on the GPU it often does: then a new cache's graphs replay too).
                    kept.append(cache)
                    cache = TCACache(model, reserve_tokens=32)
                elif i:
                    held = cache.memory_report().total.bytes_used
                    cache.reset()
                    assert cache.get_seq_length() == 0 and cache.memory_report().total.bytes_used >= held > 0
                got.append(model.generate(x, attention_mask=torch.ones_like(x), **gen, compile_config=config,
                                          **cache_kwargs(model, cache)))
                seen.append(set(zip(keys, addresses, strict=True)))
                keys.clear()
                addresses.clear()
    finally:
        torch._dynamo.reset()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    assert all(len(s) == 1 for s in seen), "a request's steps should share one key and one set of addresses"
    assert seen[1] == seen[0], "the reset cache should have kept its buffers (and ints) for the same length"
    assert seen[2] != seen[1], "a new cache should bring new buffers (else this test cannot fail)"
    assert seen[3] == seen[2], "a length of the same size bucket should have reused the buffers"
    assert seen[4] != seen[3] and not cache.layers[0]._spare


@torch.no_grad()
def test_an_instance_level_prepare_inputs_wrapper_is_kept(tiny_llama):
    """A ``prepare_inputs_for_generation`` someone already put on the instance runs under ``apply``'s
    wrapper (with its signature: generate inspects it) and is the model's again after ``remove``."""
    calls = []
    theirs = tiny_llama.prepare_inputs_for_generation

    def counting(*args, **kwargs):
        calls.append(1)
        return theirs(*args, **kwargs)

    tiny_llama.prepare_inputs_for_generation = counting
    tca_flex.apply(tiny_llama, budgets=mixed_budgets([0.25, 0.5], SPARSE, layers=2))
    x = ids(150, seed=random.randrange(2**31))
    cache = TCACache(tiny_llama)
    tiny_llama.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                        pad_token_id=0, **cache_kwargs(tiny_llama, cache))
    assert len(calls) == 5 and cache.get_seq_length() == 154
    tca_flex.remove(tiny_llama)
    assert tiny_llama.prepare_inputs_for_generation is counting


@torch.no_grad()
def test_a_compiled_loop_of_ones_own_keeps_its_ints_with_prepared_steps(tiny_llama):
    """A decode loop around a compiled model that calls ``prepare_decode_step`` before each one-token
    forward and passes its positions (docs/cache.md) hands the compiled step the same int inputs at every step, across a
    block compression, and its logits equal an eager loop's over the same tokens."""
    tca_flex.apply(tiny_llama, budgets=mixed_budgets([0.25, 0.5], SPARSE, layers=2))
    seed = random.randrange(2**31)
    prompt, steps = ids(200, seed=seed), ids(24, seed=seed + 1).split(1, 1)  # 24 > a 16-token block
    recording_backend, keys = int_input_recorder()
    eager_cache, cache = TCACache(tiny_llama, reserve_tokens=32), TCACache(tiny_llama, reserve_tokens=32)
    compiled = torch.compile(tiny_llama, backend=recording_backend, fullgraph=True)
    torch._dynamo.reset()
    try:
        tiny_llama(prompt, **cache_kwargs(tiny_llama, eager_cache))
        tiny_llama(prompt, **cache_kwargs(tiny_llama, cache))  # the prefill stays eager
        for i, token in enumerate(steps):
            want = tiny_llama(token, **cache_kwargs(tiny_llama, eager_cache)).logits
            cache.prepare_decode_step()
            # positions as a tensor, as generate passes them (else the model counts them from the cache)
            position = torch.full((1, 1), 200 + i)
            got = compiled(token, position_ids=position, **cache_kwargs(tiny_llama, cache)).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()
    assert cache.get_seq_length() == eager_cache.get_seq_length() == 224
    assert len(keys) == len(steps)
    # The first call compiles with the sizes static, the second with them symbolic; from then on, one key.
    assert len(set(keys[2:])) == 1, f"the compiled step's int inputs changed between steps: {sorted(set(keys))[:4]}"


@torch.no_grad()
def test_a_prepared_step_that_never_ran_is_taken_back(tiny_llama):
    """``prepare_decode_step`` counts the next token before its step runs; a prepared step that does not
    come (a chunk comes instead, or it is prepared twice) is taken back: logits and lengths equal those of
    a cache that was never prepared."""
    tca_flex.apply(tiny_llama, budgets=mixed_budgets([0.25, 0.5], SPARSE, layers=2))
    seed = random.randrange(2**31)
    calls = [ids(200, seed=seed), ids(5, seed=seed + 1), ids(1, seed=seed + 2), ids(1, seed=seed + 3)]
    plain, prepared = TCACache(tiny_llama), TCACache(tiny_llama)
    for i, tokens in enumerate(calls):
        if i > 0:
            prepared.prepare_decode_step()
            assert prepared.get_seq_length() == plain.get_seq_length()
        if i == 3:
            prepared.prepare_decode_step()  # twice: the first is taken back
        want = tiny_llama(tokens, **cache_kwargs(tiny_llama, plain)).logits
        got = tiny_llama(tokens, **cache_kwargs(tiny_llama, prepared)).logits
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert prepared.get_seq_length() == plain.get_seq_length() == sum(c.shape[1] for c in calls[:i + 1])


@torch.no_grad()
def test_a_layer_with_reserved_room_marks_every_buffer_it_makes_static():
    """After the prefill, a re-lay past the reserve and a beam reorder, the buffers the decode step
    updates in place are the ones marked static (CUDA-graph trees skip graphs over unmarked ones)."""
    torch.manual_seed(random.randrange(2**31))
    cfg = TCAConfig(block_size=16, window=64)
    d = 32
    q, k, v = (torch.randn(2, 2, 300, d) for _ in range(3))
    budgets = mixed_budgets([0.25, 0.5], cfg)
    knobs = SelectionConfig(block_size=16, window=64)
    with recorded_static_marks() as marked:
        plain = TCACacheLayer(cfg, budgets.keep_per_block()[0].tolist(), backend="math")
        plain.update(k, v)
        plain.finish_prefill(k, v, select(q, k, budgets.cdf(0), knobs, scaling=d**-0.5))
        assert not plain.is_compileable and marked == []
        layer = TCACacheLayer(cfg, budgets.keep_per_block()[0].tolist(), reserve_tokens=16, backend="math")
        layer.update(k, v)
        layer.finish_prefill(k, v, select(q, k, budgets.cdf(0), knobs, scaling=d**-0.5))

        def buffers():
            return [layer.k_buf, layer.v_buf, layer.owner, layer.pos, layer.var_len, layer.ncs, layer.next_pos,
                    layer.base, layer.segments.start, layer.segments.length]

        def all_marked():
            return all(any(t is m for m, _ in marked) for t in buffers())

        assert layer.is_compileable and all_marked() and not any(guard for _, guard in marked)
        layer.set_prior(torch.rand(2, 2, 300))  # a reconstruction's scores, read by every decode step
        assert any(layer.prior is m for m, _ in marked)
        slots = layer.k_buf.shape[1]
        for _ in range(80):  # five blocks leave the window: past the one block of reserve
            step = torch.randn(2, 2, 1, d)
            layer.update(step, step)
            layer.decode_step(torch.randn(2, 2, 1, d), d**-0.5)
        assert layer.k_buf.shape[1] > slots, "the layer should have re-laid its buffers"
        assert all_marked()
        layer.reorder_cache(torch.tensor([1, 0]))
        assert all_marked()


@torch.no_grad()
def test_unsupported_uses_raise_clear_errors(tiny_llama):
    with pytest.raises(ValueError, match="not prepared by tca_flex.apply"):
        TCACache(tiny_llama)
    dense_short = tiny_llama(ids(50)).logits
    tca_flex.apply(tiny_llama, SPARSE)
    cache = TCACache(tiny_llama)
    tiny_llama(ids(200), **cache_kwargs(tiny_llama, cache))
    tiny_llama(ids(5), **cache_kwargs(tiny_llama, cache))  # a chunk on top of the pruned cache (test_chunks.py)
    assert cache.get_seq_length() == 205
    # A plain forward (DynamicCache) still runs dense.
    torch.testing.assert_close(tiny_llama(ids(50)).logits, dense_short)
    with pytest.raises(NotImplementedError, match="cannot crop"):
        cache.crop(-1)
    padded = torch.ones(2, 201, dtype=torch.long)
    padded[0, :3] = 0
    cache = TCACache(tiny_llama)
    tiny_llama(ids(200, bsz=2), **cache_kwargs(tiny_llama, cache))
    with pytest.raises(ValueError, match="padded"):
        tiny_llama(ids(1, bsz=2), attention_mask=padded, **cache_kwargs(tiny_llama, cache))
    with pytest.raises(ValueError, match="0 <= t <= block_size"):
        TCACacheLayer(SPARSE, [3, 17])
    for bad in (-1, 65, True, 2.0):
        with pytest.raises(ValueError, match="size_buckets must be an int"):
            TCACache(tiny_llama, reserve_tokens=8, size_buckets=bad)
    with pytest.raises(ValueError, match="cdf must be"):
        TCACacheLayer(SPARSE, [4, 4], cdf=torch.rand(2, 5, dtype=torch.float64))
    layer = TCACacheLayer(SPARSE, [4, 4])
    layer.update(torch.randn(1, 2, 80, 16), torch.randn(1, 2, 80, 16))
    with pytest.raises(RuntimeError, match="never pruned"):
        layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TCA_FLEX_SLOW"), reason="real model: set TCA_FLEX_SLOW=1 (1-2 min)")
@torch.no_grad()
def test_real_model_retrieves_the_passkey_with_the_pruned_cache(smollm2):
    from tca_flex.eval.tasks import passkey, score

    model, tok = smollm2
    cfg = model.config
    config = TCAConfig(block_size=64, window=512)
    tca_flex.apply(model, budgets=HeadBudgets.uniform(cfg.num_hidden_layers, cfg.num_key_value_heads, 0.2,
                                                      config))
    try:
        # One prompt only: at this budget a second one (seed=1) fails with the pruned cache although
        # decoding over the full cache retrieves it: decode sees only the kept set (lossy by design).
        sample = passkey(tok, 2000, seed=0)
        prompt = tok(sample.prompt, return_tensors="pt").input_ids
        cache = TCACache(model)
        out = model.generate(prompt, max_new_tokens=8, do_sample=False, **cache_kwargs(model, cache),
                             pad_token_id=tok.eos_token_id)
        assert score(tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True), sample)
        total = cache.memory_report().total
        seen = prompt.shape[1] + 7
        left = seen - 512
        assert total.kept_fraction == pytest.approx((0.2 * left + 512) / seen, abs=0.03)
        assert total.bytes_fraction < 0.5
    finally:
        tca_flex.remove(model)


@pytest.mark.parametrize("reserve", [0, 48])
def test_a_cache_filled_under_inference_mode_goes_on_under_no_grad(tiny_llama, reserve):
    """Buffers made in ``torch.inference_mode`` may not be updated in place outside it: the cache copies
    them when a call first runs outside it. A chat whose first turn ran under inference_mode, and a
    reset cache reused under no_grad, give the tokens of the same calls all under no_grad."""
    tca_flex.apply(tiny_llama, budgets=mixed_budgets([0.25, 0.5], SPARSE, layers=2))
    seed = random.randint(1, 10**6)
    first, second = ids(150, seed=seed), ids(7, seed=seed + 1)

    def chat(first_mode, cache):
        kwargs = dict(do_sample=False, **cache_kwargs(tiny_llama, cache))
        with first_mode():
            turn = tiny_llama.generate(first, max_new_tokens=20, **kwargs)
        with torch.no_grad():  # crosses compressions: the ring's blocks leave, buffers update in place
            return tiny_llama.generate(torch.cat([turn, second], 1), max_new_tokens=40, **kwargs)

    expected = chat(torch.no_grad, TCACache(tiny_llama, reserve_tokens=reserve))
    cache = TCACache(tiny_llama, reserve_tokens=reserve)
    assert torch.equal(chat(torch.inference_mode, cache), expected)
    cache.reset()
    with torch.inference_mode():
        tiny_llama(first, **cache_kwargs(tiny_llama, cache))
    cache.reset()  # its spare buffers are inference tensors now
    assert torch.equal(chat(torch.no_grad, cache), expected)


@torch.no_grad()
def test_a_new_request_on_a_cache_not_reset_is_refused_with_what_to_do(tiny_llama):
    """generate over a cache continues what it holds; a new prompt no longer than that would reach the
    model as zero tokens. Refused before any change, naming reset(); after it, a fresh cache's tokens."""
    tca_flex.apply(tiny_llama, budgets=mixed_budgets([0.25, 0.5], SPARSE, layers=2))
    seed = random.randint(1, 10**6)
    first, second = ids(150, seed=seed), ids(random.randint(20, 150), seed=seed + 1)
    cache = TCACache(tiny_llama)
    tiny_llama.generate(first, max_new_tokens=5, do_sample=False, **cache_kwargs(tiny_llama, cache))
    held = cache.get_seq_length()
    with pytest.raises(ValueError, match=f"holds {held} tokens and generate got a sequence of {second.shape[1]}.*"
                                         "cache.reset"):
        tiny_llama.generate(second, max_new_tokens=5, do_sample=False, **cache_kwargs(tiny_llama, cache))
    assert cache.get_seq_length() == held
    cache.reset()
    again, fresh = (tiny_llama.generate(second, max_new_tokens=5, do_sample=False, **cache_kwargs(tiny_llama, c))
                    for c in (cache, TCACache(tiny_llama)))
    assert torch.equal(again, fresh)
