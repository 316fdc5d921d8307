"""Mixed-length batches: left padding plus ``attention_mask``, as ``generate`` gives them.

The reference for every row is that row run alone (unpadded, batch size 1) through the same
model, itself tested against the float64 references elsewhere (test_cache_decode.py,
test_serving.py): a padded batch must give each row the prefill logits, the kept sets (shifted
by the row's padding) and the greedy tokens of its solo run. Masks the pruned cache cannot
honour (right padding, holes) must raise, eagerly and under torch.compile.
"""

import random

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

import tca_flex
from tca_flex import HeadBudgets, TCACache, TCAConfig
from tca_flex.attention import check_left_padded
from tca_flex.hfcompat import cache_kwargs

from .conftest import tiny_llama_config
from .layout_checks import assert_slot_layout

# Window 16, block 8: rows of 3-60 tokens lie below and above the window, and a few dozen new
# tokens cross several compressions. dense_up_to = 16: rows of 17+ tokens run TCA.
SMALL = TCAConfig(block_size=8, window=16)
HEADS = [(4, 2), (4, 1), (2, 2)]  # (query heads, KV heads): GQA 2, MQA, MHA


def fresh_seed():
    return random.SystemRandom().randrange(1, 10**6)


def tiny_model(heads, seed, config=SMALL, fraction=0.4):
    hq, hkv = heads
    torch.manual_seed(seed)
    # std 0.2: greedy tokens vary (the default init repeats one token); no EOS, so every row
    # generates the same number of tokens alone and in the batch.
    model = LlamaForCausalLM(tiny_llama_config(num_attention_heads=hq, num_key_value_heads=hkv,
                                               initializer_range=0.2)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return tca_flex.apply(model, budgets=HeadBudgets.uniform(2, hkv, fraction, config))


def left_padded(lengths, seed):
    """Random rows of ``lengths`` tokens, left-padded to the longest: (rows, ids, mask)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, 256, (1, n), generator=gen) for n in lengths]
    width = max(lengths)
    ids = torch.randint(1, 256, (len(lengths), width), generator=gen)  # padding ids: never read
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for r, x in enumerate(rows):
        ids[r, width - x.shape[1]:] = x[0]
        mask[r, width - x.shape[1]:] = 1
    return rows, ids, mask


def kept_sets(cache, row):
    return [[layer.kept_positions(row, h) for h in range(layer.num_heads)] for layer in cache.layers]


lengths_st = st.lists(st.integers(3, 60), min_size=1, max_size=4)


@given(seed=st.integers(0, 10**6), lengths=lengths_st, heads=st.sampled_from(HEADS))
@example(seed=1, lengths=[45, 10, 29, 17], heads=(4, 2))  # below, at, above the window; one row unpadded
@example(seed=2, lengths=[5, 3], heads=(2, 2))  # every row below the window: the dense path
@torch.no_grad()
def test_padded_prefill_gives_each_row_its_solo_logits_and_kept_set(seed, lengths, heads):
    model = tiny_model(heads, seed)
    rows, ids, mask = left_padded(lengths, seed)
    cache = TCACache(model)
    logits = model(ids, attention_mask=mask, **cache_kwargs(model, cache)).logits
    width = ids.shape[1]
    for r, x in enumerate(rows):
        pad = width - x.shape[1]
        alone_cache = TCACache(model)
        alone = model(x, **cache_kwargs(model, alone_cache)).logits
        # packed and solo matrix products round differently in float32 (~1e-5); a wrong row is of order one
        torch.testing.assert_close(logits[r:r + 1, pad:], alone, atol=1e-4, rtol=1e-4)
        for got, want in zip(kept_sets(cache, r), kept_sets(alone_cache, 0), strict=True):
            for g, w in zip(got, want, strict=True):
                assert torch.equal(g, w + pad), (r, pad)
        for layer in cache.layers:  # no padding slot is ever stored
            live = layer.owner[r] >= 0
            assert (layer.pos[r][live] >= pad).all()
    assert torch.isfinite(logits).all()


@settings(max_examples=6)
@given(seed=st.integers(0, 10**6), lengths=lengths_st, heads=st.sampled_from(HEADS),
       backend=st.sampled_from(["math", "flex"]))
@example(seed=3, lengths=[40, 4, 23, 17], heads=(4, 1), backend="math")
@torch.no_grad()
def test_padded_greedy_generation_equals_each_row_alone(seed, lengths, heads, backend):
    """At least 3 block compressions in every row (the short rows' schedules start later)."""
    model = tiny_model(heads, seed)
    rows, ids, mask = left_padded(lengths, seed)
    new = 3 * SMALL.block_size + SMALL.window + 8  # >= 3 compressions even for a 3-token row
    cache = TCACache(model, backend=backend)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **cache_kwargs(model, cache))
    width = ids.shape[1]
    for r, x in enumerate(rows):
        alone_cache = TCACache(model, backend=backend)
        want = model.generate(x, max_new_tokens=new, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **cache_kwargs(model, alone_cache))
        assert got.sequences[r, width:].tolist() == want.sequences[0, x.shape[1]:].tolist(), r
        torch.testing.assert_close(torch.stack(got.logits)[:, r], torch.stack(want.logits)[:, 0],
                                   atol=1e-4, rtol=1e-4)
        pad = width - x.shape[1]
        for g_layer, w_layer in zip(cache.layers, alone_cache.layers, strict=True):
            assert_slot_layout(g_layer)
            assert g_layer._done(g_layer.get_seq_length())[r] >= 3
            for h in range(g_layer.num_heads):
                assert torch.equal(g_layer.kept_positions(r, h), w_layer.kept_positions(0, h) + pad)


@torch.no_grad()
def test_padded_decode_with_the_triton_kernels_equals_math():
    """The Triton decode and compression kernels (Triton's interpreter on the CPU) read each row's
    own ring base and compression schedule."""
    pytest.importorskip("triton")
    from tca_flex.decode import triton_supported

    model = tiny_model((4, 2), fresh_seed(), config=TCAConfig(block_size=16, window=16))
    if not triton_supported(torch.zeros(1, 1, 1, model.config.head_dim)):
        pytest.skip("the Triton kernels cannot run here (no GPU and no TRITON_INTERPRET=1)")
    _, ids, mask = left_padded([40, 9, 21], fresh_seed())
    outs, caches = [], []
    for backend in ("math", "triton"):
        cache = TCACache(model, backend=backend)
        if backend == "triton":
            cache.set_compression("triton")
        outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                                   **cache_kwargs(model, cache)))
        caches.append(cache)
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*(c.layers for c in caches), strict=True):
        for name in ("owner", "pos", "var_len", "ncs"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


@torch.no_grad()
def test_padded_beam_search_follows_each_row_alone():
    model = tiny_model((4, 2), fresh_seed())
    rows, ids, mask = left_padded([33, 12, 20], fresh_seed())
    kw = dict(max_new_tokens=30, do_sample=False, num_beams=3, num_return_sequences=3)
    got = model.generate(ids, attention_mask=mask, **kw, **cache_kwargs(model, TCACache(model)))
    width = ids.shape[1]
    for r, x in enumerate(rows):
        want = model.generate(x, **kw, **cache_kwargs(model, TCACache(model)))
        assert got[3 * r: 3 * r + 3, width:].tolist() == want[:, x.shape[1]:].tolist(), r


@torch.no_grad()
def test_compiled_padded_generation_equals_eager():
    """torch.compile of the whole model: the padded prefill runs through the custom ops (the left
    padding is checked inside ``tca_flex::left_pads``), the decode step is traced."""
    torch._dynamo.reset()
    model = tiny_model((4, 2), fresh_seed())
    _, ids, mask = left_padded([37, 8, 22], fresh_seed())
    kw = dict(attention_mask=mask, max_new_tokens=30, do_sample=False)
    want = model.generate(ids, **kw, **cache_kwargs(model, TCACache(model)))
    model.forward = torch.compile(model.forward, backend="aot_eager")  # what generate calls
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    got = model.generate(ids, **kw, **cache_kwargs(model, TCACache(model)))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > frames, "nothing was compiled"
    assert torch.equal(got, want)


@pytest.mark.parametrize("reserve", [0, 1])
@torch.no_grad()
def test_generate_decode_steps_get_no_mask_and_equal_each_row_alone(reserve):
    """For a compileable (reserved) cache ``generate`` builds each step's 4-D mask before the step,
    for another it hands the step the 2-D mask; a ``TCACache``'s decode does not read either, so its
    decode steps get none (the cache holds no padding), and each row's greedy tokens still equal its
    solo run. The first step of a call over a cache kept from an earlier call still gets its mask,
    and a mask hiding a real token is refused."""
    model = tiny_model((4, 2), fresh_seed())
    rows, ids, mask = left_padded([37, 8, 22], fresh_seed())
    masks = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: masks.append(kwargs.get("attention_mask")),
                                           with_kwargs=True)
    new = 3 * SMALL.block_size + SMALL.window
    try:
        cache = TCACache(model, reserve_tokens=reserve * (new + 8))
        got = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             **cache_kwargs(model, cache))
    finally:
        hook.remove()
    assert len(masks) == new and torch.equal(masks[0], mask)
    for layer in cache.layers:
        assert_slot_layout(layer)
    assert all(m is None for m in masks[1:]), [type(m) for m in masks[1:4]]
    width = ids.shape[1]
    for r, x in enumerate(rows):
        want = model.generate(x, max_new_tokens=new, do_sample=False,
                              **cache_kwargs(model, TCACache(model, reserve_tokens=reserve * (new + 8))))
        assert got[r, width:].tolist() == want[0, x.shape[1]:].tolist(), r
    # One more token through generate over the same cache, its mask hiding a real token of row 0.
    bad = torch.ones_like(got)
    bad[:, :width] = mask
    bad[0, width] = 0
    with pytest.raises(ValueError, match="left-padded batches only"):
        model.generate(got, attention_mask=bad, max_new_tokens=1, do_sample=False, **cache_kwargs(model, cache))


def holes_and_right_padding(width):
    right = torch.ones(2, width, dtype=torch.long)
    right[1, -5:] = 0
    hole = torch.ones(2, width, dtype=torch.long)
    hole[0, 10:13] = 0
    return {"right padding": right, "a hole": hole}


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("length", [12, 40])  # dense prefill, sparse prefill
@torch.no_grad()
def test_masks_the_cache_cannot_honour_raise(compiled, length):
    torch._dynamo.reset()
    model = tiny_model((4, 2), fresh_seed())
    run = torch.compile(model, backend="aot_eager") if compiled else model
    ids = torch.randint(1, 256, (2, length))
    for mask in holes_and_right_padding(length).values():
        with pytest.raises(ValueError, match="left padding only"):
            run(ids, attention_mask=mask, **cache_kwargs(model, TCACache(model)))
        if length > SMALL.dense_up_to:  # the sparse prefill refuses it without a cache too
            with pytest.raises(ValueError, match="left padding only"):
                run(ids, attention_mask=mask)


@torch.no_grad()
def test_decode_and_chunk_masks_are_read_once_a_forward_not_once_a_layer(monkeypatch):
    """Every layer of a forward gets the same mask: the first layer checks it (reading its values,
    a host-device sync on a GPU), the others do not; each new step's (or chunk's) mask is checked again."""
    import tca_flex.attention as attention
    import tca_flex.chunks as chunks

    model = tiny_model((4, 2), fresh_seed())
    assert model.config.num_hidden_layers > 1
    _, ids, mask = left_padded([30, 24], fresh_seed())
    cache = TCACache(model)
    model(ids, attention_mask=mask, **cache_kwargs(model, cache))
    reads, real = [], attention.is_causal_left_padded
    counted = lambda *args: reads.append(1) or real(*args)  # noqa: E731
    monkeypatch.setattr(attention, "is_causal_left_padded", counted)  # decode steps
    monkeypatch.setattr(chunks, "is_causal_left_padded", counted)  # chunks of new tokens
    for new in (1, 1, 4, 1):
        mask = torch.cat([mask, torch.ones(2, new, dtype=torch.long)], 1)
        model(torch.randint(1, 256, (2, new)), attention_mask=mask, **cache_kwargs(model, cache))
    assert len(reads) == 4


@torch.no_grad()
def test_decode_and_chunk_masks_must_hide_exactly_the_padding():
    model = tiny_model((4, 2), fresh_seed())
    _, ids, mask = left_padded([30, 24], fresh_seed())
    cache = TCACache(model)
    model(ids, attention_mask=mask, **cache_kwargs(model, cache))
    bad = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    bad[0, 0] = 0  # hides a real token of row 0
    step = torch.randint(1, 256, (2, 1))
    with pytest.raises(ValueError, match="left-padded batches only"):
        model(step, attention_mask=bad, **cache_kwargs(model, cache))
    with pytest.raises(ValueError, match="left padding of the prefill"):
        model(torch.randint(1, 256, (2, 4)), attention_mask=torch.cat([bad, torch.ones(2, 3, dtype=torch.long)], 1),
              **cache_kwargs(model, cache))
    # A refused decode step has already appended its token (update runs before the attention): start again.
    cache = TCACache(model)
    model(ids, attention_mask=mask, **cache_kwargs(model, cache))
    good = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    assert torch.isfinite(model(step, attention_mask=good, **cache_kwargs(model, cache)).logits).all()


@torch.no_grad()
def test_next_turn_of_a_padded_batch_equals_each_row_alone():
    """A chunk of new tokens on a padded cache whose rows all fill the window (same schedule);
    with a row shorter than the window the chunk is refused with a message."""
    model = tiny_model((4, 2), fresh_seed())
    rows, ids, mask = left_padded([41, 26], fresh_seed())
    turn = torch.randint(1, 256, (2, 13))
    cache = TCACache(model)
    model(ids, attention_mask=mask, **cache_kwargs(model, cache))
    full_mask = torch.cat([mask, torch.ones_like(turn)], 1)
    got = model(turn, attention_mask=full_mask, **cache_kwargs(model, cache)).logits
    width = ids.shape[1]
    for r, x in enumerate(rows):
        alone_cache = TCACache(model)
        model(x, **cache_kwargs(model, alone_cache))
        want = model(turn[r:r + 1], **cache_kwargs(model, alone_cache)).logits
        torch.testing.assert_close(got[r:r + 1], want, atol=1e-4, rtol=1e-4)
        for g, w in zip(kept_sets(cache, r), kept_sets(alone_cache, 0), strict=True):
            for a, b in zip(g, w, strict=True):
                assert torch.equal(a, b + width - x.shape[1])
    _, ids, mask = left_padded([41, 9], fresh_seed())
    cache = TCACache(model)
    model(ids, attention_mask=mask, **cache_kwargs(model, cache))
    with pytest.raises(ValueError, match="at least as long as the window"):
        model(turn, attention_mask=torch.cat([mask, torch.ones_like(turn)], 1), **cache_kwargs(model, cache))


def test_left_padding_check_reads_2d_bool_and_additive_masks():
    pads = [0, 3, 6]
    width = 9
    idx = torch.arange(width)
    two_d = idx[None, :] >= torch.tensor(pads)[:, None]
    assert check_left_padded(two_d) == pads
    four_d = (idx[None, :] <= idx[:, None]) & two_d[:, None, :]
    four_d = four_d[:, None]
    assert check_left_padded(four_d) == pads
    additive = torch.where(four_d, 0.0, torch.finfo(torch.float32).min)
    from tca_flex.attention import visible_keys
    assert check_left_padded(visible_keys(additive)) == pads
    # padding query rows may hold anything (transformers may unmask them for SDPA)
    four_d_unmasked = four_d.clone()
    four_d_unmasked[1, 0, :3] = True
    assert check_left_padded(four_d_unmasked) == pads
    for bad in (two_d.flip(-1), torch.ones(3, 1, width, width, dtype=torch.bool)):
        with pytest.raises(ValueError, match="left padding only"):
            check_left_padded(bad)
    with pytest.raises(ValueError, match="no token"):
        check_left_padded(torch.zeros(1, width, dtype=torch.bool))


@settings(max_examples=10, deadline=None)
@given(pads=st.lists(st.integers(0, 5), min_size=1, max_size=4), hidden=st.integers(0, 8))
def test_decode_mask_check_refuses_holes_eagerly_and_stays_off_the_host_under_capture(pads, hidden):
    """A decode mask hiding a token past a row's padding is refused eagerly; inside a CUDA-graph
    capture (where a host read is a sync the capture refuses) the check stands aside, as in a
    compiled step: the eager warm-up before the capture has checked the step's mask."""
    from tca_flex.attention import check_decode_mask

    width = 10
    visible = torch.arange(width)[None, :] >= torch.tensor(pads)[:, None]
    check_decode_mask(visible, pads, width)  # exactly the prefill's padding: accepted
    row = hidden % len(pads)
    holed = visible.clone()
    holed[row, pads[row] + hidden % (width - pads[row])] = False
    with pytest.raises(ValueError, match="left-padded batches only"):
        check_decode_mask(holed, pads, width)
    # An accepted mask is not read again, unless it changed in place or comes with other pads.
    check_decode_mask(visible, pads, width)
    visible[row, pads[row] + hidden % (width - pads[row])] = False
    with pytest.raises(ValueError, match="left-padded batches only"):
        check_decode_mask(visible, pads, width)
    nothing_hidden = torch.ones_like(holed)
    check_decode_mask(nothing_hidden, [0] * len(pads), width)
    with pytest.raises(ValueError, match="left-padded batches only"):
        check_decode_mask(nothing_hidden, [1] * len(pads), width)
    with pytest.raises(ValueError, match="spans 10 positions, but the sequence is 11 tokens long"):
        check_decode_mask(nothing_hidden, [0] * len(pads), width + 1)  # a mask one step behind
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_initialized", lambda: True)
        patch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        check_decode_mask(holed, pads, width)  # no host read while capturing


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10**6), lengths=st.lists(st.integers(3, 60), min_size=2, max_size=4),
       heads=st.sampled_from(HEADS))
@torch.no_grad()
def test_padded_prefill_runs_projections_and_mlps_on_real_tokens_only(seed, lengths, heads):
    """The per-token modules of a padded prefill see the real tokens only (padding costs them
    nothing), decode steps and unpadded calls see their inputs unchanged, and ``remove`` takes the
    hooks off: the padded batch then runs its projections on every position again."""
    model = tiny_model(heads, seed)
    seen = []
    layer = model.model.layers[1]
    attn = layer.self_attn
    pointers = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append((type(mod).__name__, args[0].shape[:2])))
             for m in (layer.mlp, attn.q_proj, attn.o_proj)]
    hooks += [m.register_forward_pre_hook(lambda mod, args: pointers.append(args[0].data_ptr()))
              for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    _, ids, mask = left_padded(lengths, seed)
    real = sum(lengths)
    padded = real < ids.numel()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                         **cache_kwargs(model, TCACache(model)))
    assert len(set(pointers[:3])) == 1  # q, k and v read one packed copy of their shared input
    prefill, decode = seen[:3], seen[3:]
    assert all(shape == ((1, real) if padded else tuple(ids.shape)) for _, shape in prefill), prefill
    assert all(shape == (len(lengths), 1) for _, shape in decode), decode
    seen.clear()
    tca_flex.remove(model)
    model(ids, attention_mask=mask)
    assert all(shape == tuple(ids.shape) for _, shape in seen)
    for hook in hooks:
        hook.remove()
    assert out.shape == (len(lengths), ids.shape[1] + 2)


def module_hooks(model):
    """How many forward hooks and pre-hooks sit on the model and its submodules."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@torch.no_grad()
def test_packing_hooks_are_on_only_during_a_padded_prefill():
    """The per-module hooks that pack a padded prefill are put on for that call only (a compiled
    decode step guards on every hook of every module it runs), and none sits on the model itself
    (under ``torch.compile(model)`` each would run as a frame of its own at every call): none
    between calls, none during a decode step or an unpadded call, on during the padded prefill, off
    again when a packed call raised, and none after ``remove``."""
    seed = fresh_seed()
    model = tiny_model(HEADS[0], seed)
    assert module_hooks(model) == 0
    during = []
    probe = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda mod, args: during.append(module_hooks(model)))
    _, ids, mask = left_padded([random.Random(seed).randrange(3, 30), 40], seed)
    cache = TCACache(model)
    model(ids, attention_mask=mask, **cache_kwargs(model, cache))
    assert during[-1] > 1 and module_hooks(model) == 1  # on during the call; only the probe after it
    model(ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1), **cache_kwargs(model, cache))
    model(ids[:1, -20:])
    assert during[-2:] == [1, 1] and module_hooks(model) == 1

    def raising_prefill():
        boom = model.model.norm.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            model(ids, attention_mask=mask, **cache_kwargs(model, TCACache(model)))
        boom.remove()

    raising_prefill()
    assert during[-1] > 1 and module_hooks(model) == 1  # on during the raising call, off after it
    model(ids[:1, -20:])
    assert during[-1] == 1 and module_hooks(model) == 1
    tca_flex.remove(model)
    assert module_hooks(model) == 1
    probe.remove()


@torch.no_grad()
def test_the_forward_wrapper_keeps_the_signature_follows_copies_and_wraps_another_librarys():
    """``apply`` wraps the model's forward on the instance: ``inspect.signature`` (which transformers
    reads to pick the kwargs it passes) sees the class's; a deep copy packs its own padded prefill
    (its wrapper is bound to the copy); a forward another library put on the instance before
    ``apply`` runs inside ours and is back after ``remove``; a forward put there after ``apply`` is
    left alone by ``remove``."""
    import copy
    import inspect

    seed = fresh_seed()
    model = tiny_model(HEADS[0], seed)
    assert inspect.signature(model.forward) == inspect.signature(LlamaForCausalLM.forward.__get__(model))
    _, ids, mask = left_padded([random.Random(seed).randrange(3, 30), 40], seed)
    clone = copy.deepcopy(model)
    assert clone.forward.__self__ is clone
    rows = []
    probe = clone.model.layers[0].mlp.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[:2]))
    clone(ids, attention_mask=mask, **cache_kwargs(clone, TCACache(clone)))
    model(ids, attention_mask=mask, **cache_kwargs(model, TCACache(model)))
    assert rows == [(1, int(mask.sum()))]  # the copy packed its prefill; the original's call touched no copy
    probe.remove()

    calls = []
    tca_flex.remove(model)
    dense = model(ids, attention_mask=mask).logits

    def theirs(*args, **kwargs):
        calls.append(len(args) + len(kwargs))
        return LlamaForCausalLM.forward(model, *args, **kwargs)

    model.forward = theirs
    tca_flex.apply(model, budgets=HeadBudgets.uniform(2, 2, 1.0, SMALL))  # keeps every token: dense logits
    out = model(ids, attention_mask=mask).logits
    assert calls and model.__dict__["forward"] is not theirs
    assert inspect.signature(model.forward) == inspect.signature(theirs)
    real = mask.bool()
    torch.testing.assert_close(out[real], dense[real], atol=1e-5, rtol=1e-5)
    tca_flex.remove(model)
    assert model.__dict__["forward"] is theirs
    tca_flex.apply(model, budgets=HeadBudgets.uniform(2, 2, 0.4, SMALL))
    model.forward = later = theirs.__get__(model)
    tca_flex.remove(model)
    assert model.__dict__["forward"] is later
    model.forward = bound = LlamaForCausalLM.forward.__get__(model)  # an instance forward with the class's parameters
    tca_flex.apply(model, budgets=HeadBudgets.uniform(2, 2, 0.4, SMALL))
    assert inspect.signature(model.forward) == inspect.signature(bound)
    tca_flex.remove(model)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10**6), lengths=st.lists(st.integers(3, 60), min_size=2, max_size=4),
       heads=st.sampled_from(HEADS), cache=st.sampled_from(["tca", "none", "dynamic", "hidden_states"]))
@torch.no_grad()
def test_whole_layers_run_packed_only_where_no_cache_stores_packed_tokens(seed, lengths, heads, cache):
    """With a ``TCACache`` (or no cache at all) the whole decoder, norms included, runs on the packed
    real tokens; with a cache that stores what the layer gives it (transformers' ``DynamicCache``)
    or per-layer hidden states asked for, only projections and MLPs do. Either way each row's
    logits are its solo run's, and the cache and hidden states keep the padded layout."""
    from transformers import DynamicCache

    model = tiny_model(heads, seed)
    rows, ids, mask = left_padded(lengths, seed)
    width, real = ids.shape[1], sum(lengths)
    norms = []
    hook = model.model.layers[1].input_layernorm.register_forward_pre_hook(
        lambda mod, args: norms.append(tuple(args[0].shape[:2])))
    made = {"tca": TCACache(model), "dynamic": DynamicCache(config=model.config)}
    kwargs = {"tca": cache_kwargs(model, made["tca"]), "none": {"use_cache": False},
              "dynamic": cache_kwargs(model, made["dynamic"]),
              "hidden_states": {**cache_kwargs(model, TCACache(model)), "output_hidden_states": True}}[cache]
    out = model(ids, attention_mask=mask, **kwargs)
    hook.remove()
    whole = cache in ("tca", "none")
    assert norms == [(1, real) if whole and real < ids.numel() else tuple(ids.shape)]
    if cache == "dynamic":  # it stored the padded layout
        assert made["dynamic"].layers[0].keys.shape[:3] == (len(lengths), heads[1], width)
    if cache == "hidden_states":
        assert all(h.shape[:2] == tuple(ids.shape) for h in out.hidden_states)
    for r, x in enumerate(rows):
        alone = model(x, use_cache=False).logits
        torch.testing.assert_close(out.logits[r:r + 1, width - x.shape[1]:], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", sorted(tca_flex.integration.SUPPORTED_MODEL_TYPES))
@torch.no_grad()
def test_every_supported_family_gives_each_padded_row_its_solo_logits(model_type):
    """Whole decoder layers run on the packed real tokens in each family's own layer layout
    (norm placement, multipliers, rotary or not): each row of a padded prefill equals the row alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    seed = fresh_seed()
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=256, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=16, max_position_embeddings=256, initializer_range=0.2, pad_token_id=0)
    if getattr(config, "sliding_window", None) is not None:
        config.sliding_window = None
    model = AutoModelForCausalLM.from_config(config).eval()
    tca_flex.apply(model, budgets=HeadBudgets.uniform(2, 2, 0.4, SMALL))
    rows, ids, mask = left_padded([fresh_seed() % 50 + 5 for _ in range(3)], seed)
    logits = model(ids, attention_mask=mask, **cache_kwargs(model, TCACache(model))).logits
    width = ids.shape[1]
    for r, x in enumerate(rows):
        alone = model(x, **cache_kwargs(model, TCACache(model))).logits
        # float32 rounding of the packed and solo matrix products differs by ~1e-5 (more where a family
        # scales its activations, e.g. Granite's multipliers); a packing error is of order one
        torch.testing.assert_close(logits[r:r + 1, width - x.shape[1]:], alone, atol=1e-4, rtol=1e-4,
                                   msg=lambda m, r=r: f"{model_type} (seed {seed}), row {r}: {m}")
