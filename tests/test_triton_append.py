"""The Triton append kernel against the tensor form it replaces (``decode.append_token_math``).

Fresh random buffers (never zeros) with one segment per (row, KV head) at random places, random
rings, positions and ring bases (per row or one for all): both forms append to copies of the
same state and must leave every buffer bit for bit identical. Then whole decodes of a tiny
random Llama with the fused append and with the tensor form must give identical tokens, logits
and caches while several blocks leave the window. Without a GPU the kernel runs in Triton's
interpreter (``conftest.py``).
"""

import os
import random

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

import tca_flex
import tca_flex.decode as decode
from tca_flex import HeadBudgets, TCACache, TCAConfig
from tca_flex.cache import TCACacheLayer
from tca_flex.decode import append_token, append_token_math
from tca_flex.hfcompat import cache_kwargs

from .conftest import tiny_llama_config

pytestmark = pytest.mark.skipif(
    decode.triton_append is None or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs Triton (compiled on a GPU, or its CPU interpreter)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BUFFERS = ("k_buf", "v_buf", "owner", "pos", "next_pos")
# The model-level tests decode eagerly on purpose (the kernels under test are eager decode's); on a GPU
# generate says so once per cache (generate_hook._hint_eager_decode).
EAGER_HINT = "ignore:tca_flex. generate decodes this TCACache eagerly:UserWarning"


def random_state(bsz, hkv, d, ring, next_pos, bases, dtype, gen):
    """Flat buffers full of random data; each (row, head) owns ``ring`` or more slots at a random
    offset of its row (rows laid out differently), with random gaps and headroom around them."""
    starts, slots = [], 0
    for _ in range(bsz):
        at, row = int(torch.randint(0, 5, (1,), generator=gen)), []
        for _ in range(hkv):
            row.append(at)
            at += ring + int(torch.randint(0, 2 * ring, (1,), generator=gen))
        starts.append(row)
        slots = max(slots, at + int(torch.randint(0, 7, (1,), generator=gen)))
    state = dict(k_buf=torch.randn(bsz, slots, d, generator=gen).to(dtype),
                 v_buf=torch.randn(bsz, slots, d, generator=gen).to(dtype),
                 owner=torch.randint(-1, hkv, (bsz, slots), generator=gen, dtype=torch.int32),
                 pos=torch.randint(0, next_pos + 1, (bsz, slots), generator=gen, dtype=torch.int32),
                 seg_start=torch.tensor(starts), next_pos=torch.tensor(next_pos), base=torch.tensor(bases))
    return {name: t.to(DEVICE) for name, t in state.items()}


def new_token(bsz, hkv, d, dtype, strided, gen):
    """The step's key and value ``[B, H_kv, 1, D]``; ``strided``: laid out as transformers' value
    (``[B, 1, H_kv, D]`` transposed), a view whose strides the kernel must follow."""
    key = torch.randn(bsz, hkv, 1, d, generator=gen).to(DEVICE, dtype)
    if strided:
        return key, torch.randn(bsz, 1, hkv, d, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    return key, torch.randn(bsz, hkv, 1, d, generator=gen).to(DEVICE, dtype)


def append_with(fn, state, key, value, ring):
    out = {name: t.clone() for name, t in state.items()}
    fn(key, value, out["k_buf"], out["v_buf"], out["owner"], out["pos"], out["seg_start"], out["next_pos"],
       out["base"], ring=ring)
    return out


@given(bsz=st.integers(1, 3), hkv=st.integers(1, 4), d=st.sampled_from([8, 16, 32]), ring=st.integers(1, 40),
       next_pos=st.integers(0, 2**20), base=st.data(), per_row=st.booleans(), bf16=st.booleans(),
       strided=st.booleans(), seed=st.integers(0, 2**31 - 1))
@example(bsz=2, hkv=3, d=16, ring=24, next_pos=37, base=[5, 40], per_row=True, bf16=False, strided=True,
         seed=0)  # one row's base past next_pos: torch's % floors, the kernel must too
@torch.no_grad()
def test_kernel_leaves_every_buffer_as_the_tensor_form(bsz, hkv, d, ring, next_pos, base, per_row, bf16, strided,
                                                       seed):
    gen = torch.Generator().manual_seed(seed)
    if isinstance(base, list):  # from an @example
        bases = base
    else:  # mostly the cache's case (base <= next_pos), sometimes past it
        draw = st.integers(max(0, next_pos - 3 * ring), next_pos + ring)
        bases = base.draw(st.lists(draw, min_size=bsz, max_size=bsz)) if per_row else base.draw(draw)
    dtype = torch.bfloat16 if bf16 else torch.float32
    state = random_state(bsz, hkv, d, ring, next_pos, bases, dtype, gen)
    key, value = new_token(bsz, hkv, d, dtype, strided, gen)
    want = append_with(append_token_math, state, key, value, ring)
    got = append_with(append_token, state, key, value, ring)
    for name in BUFFERS:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert torch.equal(got[name], want[name]), name
    assert int(got["next_pos"]) == next_pos + 1
    assert not torch.equal(got["k_buf"], state["k_buf"]), "the append must have written something"


@torch.no_grad()
def test_append_op_declares_what_it_mutates():
    """opcheck: schema (mutated arguments declared, nothing else written), fake tensor and autograd
    registrations, with per-row and shared bases."""
    gen = torch.Generator().manual_seed(5)
    for bases in ([3, 11], 7):
        state = random_state(2, 3, 16, 12, 30, bases, torch.float32, gen)
        key, value = new_token(2, 3, 16, torch.float32, True, gen)
        args = (key[:, :, 0], value[:, :, 0], state["k_buf"], state["v_buf"], state["owner"], state["pos"],
                state["seg_start"], state["next_pos"], state["base"], 12)
        torch.library.opcheck(torch.ops.tca_flex.append_token.default, args)


def test_append_kernel_follows_the_decode_backend():
    """"auto" takes the kernel exactly where the decode runs the "triton" backend; "triton" refuses
    what the kernel cannot run, as the decode backend does."""
    cfg = TCAConfig(block_size=4, window=8)
    key = torch.randn(1, 2, 20, 16)
    for backend, fused in (("triton", True), ("math", False), ("auto", DEVICE == "cuda")):
        layer = TCACacheLayer(cfg, [1, 2], backend=backend)
        layer.update(key.to(DEVICE), key.to(DEVICE))
        layer.finish_prefill(key.to(DEVICE), key.to(DEVICE), None)
        assert layer._fused(layer.append_kernel, key[:, :, :1].to(DEVICE)) == fused
    layer.append_kernel = "triton"
    with pytest.raises(ValueError, match="backend 'triton' needs"):
        layer._fused(layer.append_kernel, torch.randn(1, 2, 1, 12, device=DEVICE))  # head dim not a power of 2


def count_launches(monkeypatch, merged=False):
    """The calls of the append kernel's launcher from now on (the cache must not fall back to tensor ops
    unseen); ``merged``: of the decode launcher with a token to append (``append_kernel`` "auto")."""
    calls = []
    module = decode.triton_decode if merged else decode.triton_append
    launch = module.launch

    def counted(*args, **kwargs):
        if not merged or kwargs.get("token") is not None:
            calls.append(1)
        return launch(*args, **kwargs)

    monkeypatch.setattr(module, "launch", counted)
    return calls


def tiny_model(seed):
    """A random 2-layer Llama (4 query / 2 KV heads, head dim 16) whose greedy tokens vary."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(initializer_range=0.2)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    budgets = torch.cat([HeadBudgets.uniform(2, 1, f, TCAConfig(block_size=8, window=16)).probs
                         for f in (0.25, 0.625)], dim=1)
    return tca_flex.apply(model, budgets=HeadBudgets(probs=budgets, config=TCAConfig(block_size=8, window=16)))


def generate_with_appends(padded, kernels, launches):
    """40 greedy tokens of a fresh random tiny model through ``TCACache`` on the "triton" backend (kernels
    in Triton's interpreter on the CPU), once per append kernel; growth=0 re-lays the buffers on the
    way. ``padded``: two left-padded rows, the short one's window (ring base) starting later.
    Returns (seed, prompt lengths, [(generate's output, cache)] in ``kernels``' order, and the length
    of ``launches`` (a ``count_launches`` list) after each run)."""
    if not decode.triton_supported(torch.zeros(1, 1, 1, 16, device=DEVICE)):
        pytest.skip("the Triton kernels cannot run here (no GPU and no TRITON_INTERPRET=1)")
    seed = random.SystemRandom().randrange(1, 10**6)
    model = tiny_model(seed).to(DEVICE)
    gen = torch.Generator().manual_seed(seed)
    lengths = [45, 10] if padded else [45]
    ids = torch.randint(1, 256, (len(lengths), max(lengths)), generator=gen)
    mask = (torch.arange(max(lengths)) >= max(lengths) - torch.tensor(lengths)[:, None]).long()
    runs, counted = [], []
    for kernel in kernels:
        cache = TCACache(model, backend="triton", growth=0.0, min_chunk_blocks=1)
        cache.set_append(kernel)
        out = model.generate(ids.to(DEVICE), attention_mask=mask.to(DEVICE), max_new_tokens=40, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, **cache_kwargs(model, cache))
        runs.append((out, cache))
        counted.append(len(launches))
    return seed, lengths, runs, counted


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.filterwarnings(EAGER_HINT)
@torch.no_grad()
def test_decode_with_the_fused_append_equals_the_tensor_form(padded, monkeypatch):
    """Greedy decoding with the "triton" backend (kernels in Triton's interpreter on the CPU), once with
    the fused append and once with the tensor form: identical tokens, logits and caches after 39
    decode steps (four blocks of 8 leave the window of 16 in every row; growth=0 re-lays the
    buffers on the way). In the left-padded batch the rows have different ring bases."""
    seed, lengths, runs, counted = generate_with_appends(padded, ("math", "triton"), count_launches(monkeypatch))
    assert counted == [0, 39 * 2], "one launch per decode step and layer, none with the tensor form"
    with pytest.raises(ValueError, match="append"):
        runs[1][1].set_append("fast")
    (want, ref_cache), (got, fused_cache) = runs
    assert torch.equal(got.sequences, want.sequences), f"seed {seed}"
    assert torch.equal(torch.stack(got.logits), torch.stack(want.logits)), f"seed {seed}"
    for ref, fused in zip(ref_cache.layers, fused_cache.layers, strict=True):
        assert ref.get_seq_length() == fused.get_seq_length() == max(lengths) + 39
        assert (fused.ncs - fused.base >= 4 * 8).all(), "several blocks must have left the window"
        for name in (*BUFFERS, "var_len", "ncs"):
            assert torch.equal(getattr(fused, name), getattr(ref, name)), f"{name}, seed {seed}"


@pytest.mark.parametrize("kernel", ["triton", "auto"])
@torch.no_grad()
def test_compiled_step_with_the_fused_append_equals_eager(kernel, monkeypatch):
    """The op inside a torch.compile'd decode step (update + attention + compression, fullgraph): the
    same outputs and buffers as eager steps, across a compression; with the append's own kernel
    ("triton") and with the attention's merge appending ("auto")."""
    gen = torch.Generator().manual_seed(8)
    cfg = TCAConfig(block_size=4, window=8)
    bsz, hkv, group, d, length = 2, 2, 2, 16, 20
    k, v = torch.randn(bsz, hkv, length, d, generator=gen), torch.randn(bsz, hkv, length, d, generator=gen)
    layers = []
    for _ in range(2):
        layer = TCACacheLayer(cfg, [1, 3], backend="triton", reserve_tokens=32)
        layer.append_kernel = kernel
        layer.update(k.to(DEVICE), v.to(DEVICE))
        layer.finish_prefill(k.to(DEVICE), v.to(DEVICE), None, pads=[0, 15])  # ring bases 12 and 15
        layers.append(layer)

    def step(layer, key, value, query):
        layer.update(key, value)
        return layer.decode_step(query, d**-0.5)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    launches = count_launches(monkeypatch, merged=kernel == "auto")
    for _ in range(10):  # a block leaves each row's window on the way
        key, value = (torch.randn(bsz, hkv, 1, d, generator=gen).to(DEVICE) for _ in range(2))
        query = torch.randn(bsz, hkv * group, 1, d, generator=gen).to(DEVICE)
        want, got = step(layers[0], key, value, query), compiled(layers[1], key, value, query)
        assert torch.equal(got, want)
    assert (layers[0].ncs > layers[0].base).all(), "a block must have left every row's window"
    assert len(launches) == 2 * 10, "the kernel ran in the eager and in the compiled steps"
    for name in (*BUFFERS, "var_len", "ncs"):
        assert torch.equal(getattr(layers[1], name), getattr(layers[0], name)), name


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.filterwarnings(EAGER_HINT)
@torch.no_grad()
def test_decode_with_the_merge_appending_matches_the_tensor_form(padded, monkeypatch):
    """Attention first, the token appended by the merge (``append_kernel`` "auto" on the "triton"
    backend) against the tensor-form append before the attention: the same greedy tokens, logits
    within float32 rounding (the merge scores the new token on its own, in another order), and the
    same caches after 39 decode steps while blocks leave the window (which also checks that the slot
    the merge writes was free when the attention read the ring): the same slots, positions and
    counts, and keys and values bit for bit in the first layer, within rounding after it (their
    inputs went through the attention above)."""
    separate = count_launches(monkeypatch)
    seed, lengths, runs, counted = generate_with_appends(padded, ("math", "auto"),
                                                         count_launches(monkeypatch, merged=True))
    assert counted == [0, 39 * 2] and not separate, "the merge appends at every decode step and layer"
    (want, ref_cache), (got, merged_cache) = runs
    assert torch.equal(got.sequences, want.sequences), f"seed {seed}"
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-4, rtol=1e-4)
    for i, (ref, fused) in enumerate(zip(ref_cache.layers, merged_cache.layers, strict=True)):
        assert fused._token is None, "every deferred token was appended"
        assert (fused.ncs - fused.base >= 4 * 8).all(), "several blocks must have left the window"
        for name in ("owner", "pos", "next_pos", "var_len", "ncs"):
            assert torch.equal(getattr(fused, name), getattr(ref, name)), f"layer {i}: {name}, seed {seed}"
        for name in ("k_buf", "v_buf"):  # bit for bit where the inputs are (the first layer: embeddings only)
            check = torch.equal if i == 0 else lambda a, b: torch.allclose(a, b, atol=1e-4, rtol=1e-4)
            assert check(getattr(fused, name), getattr(ref, name)), f"layer {i}: {name}, seed {seed}"


def test_a_token_left_unattended_is_refused():
    """An update whose token no decode_step appended (a forward that did not reach the TCA attention)
    must not be silently dropped by the next update."""
    if not decode.triton_supported(torch.zeros(1, 1, 1, 16, device=DEVICE)):
        pytest.skip("the Triton kernels cannot run here (no GPU and no TRITON_INTERPRET=1)")
    gen = torch.Generator().manual_seed(3)
    key = torch.randn(1, 2, 20, 16, generator=gen).to(DEVICE)
    layer = TCACacheLayer(TCAConfig(block_size=4, window=8), [1, 2], backend="triton")
    layer.update(key, key)
    layer.finish_prefill(key, key, None)
    layer.update(key[:, :, :1], key[:, :, :1])
    with pytest.raises(RuntimeError, match="never reached the TCA attention"):
        layer.update(key[:, :, :1], key[:, :, :1])
