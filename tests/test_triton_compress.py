"""The Triton block-compression kernel against the tensor form it replaces (``TCACacheLayer.compress``).

Fresh random caches, built by a real prefill selection and driven by eager
decode steps to a step where a block leaves the window or one where none does;
then both forms compress copies of the same cache and must leave identical
buffers. Without a GPU the kernel runs in Triton's interpreter (``conftest.py``).
"""

import copy
import os

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

import tca_flex.decode as decode
from tca_flex import HeadBudgets, TCAConfig
from tca_flex.cache import TCACacheLayer
from tca_flex.config import SelectionConfig
from tca_flex.decode import decode_attention
from tca_flex.selection import Selection, select

from .layout_checks import assert_slot_layout

pytestmark = pytest.mark.skipif(
    decode.triton_compress is None or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs Triton (compiled on a GPU, or its CPU interpreter)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STATE = ("k_buf", "v_buf", "owner", "pos", "var_len", "ncs", "next_pos")


def new_kv(bsz, hkv, d, gen, dup):
    """Random keys/values; ``dup``: drawn from 3 fixed vectors, so blocks hold equal keys (exact ties)."""
    if dup:
        pool = torch.randn(3, d, generator=torch.Generator().manual_seed(0))
        return pool[torch.randint(3, (bsz, hkv, 1), generator=gen)]
    return torch.randn(bsz, hkv, 1, d, generator=gen)


def fresh_cache(bsz, hkv, group, d, block, window, keep, length, dtype, aggregation, gen, dup=False):
    """A layer after a real prefill selection of random K/V (tight headroom: it grows while decoding)."""
    cfg = TCAConfig(block_size=block, window=window, gqa_aggregation=aggregation)
    q = torch.randn(bsz, hkv * group, length, d, generator=gen)
    k = torch.cat([new_kv(bsz, hkv, d, gen, dup) for _ in range(length)], dim=2)
    v = torch.randn(bsz, hkv, length, d, generator=gen)
    sel = None  # a prompt within the window is kept whole (the prefill ran dense)
    if length > window:
        sel = select(q, k, HeadBudgets.uniform(1, hkv, 0.3, cfg).cdf(0),
                     SelectionConfig(block_size=block, window=window, alpha=cfg.alpha), scaling=d**-0.5)
        sel = Selection(positions=sel.positions.to(DEVICE), counts=sel.counts.to(DEVICE))
    layer = TCACacheLayer(cfg, keep, growth=0.0, min_chunk_blocks=1, backend="math")
    k, v = k.to(DEVICE, dtype), v.to(DEVICE, dtype)
    layer.update(k, v)
    layer.finish_prefill(k, v, sel)
    return layer


def step(layer, group, gen, scale, dup=False):
    """One eager decode step with random q/k/v (the host skips compression where no block leaves)."""
    bsz, hkv, d = layer.batch_size, layer.num_heads, layer.head_dim
    kv = new_kv(bsz, hkv, d, gen, dup).to(DEVICE, layer.dtype)
    layer.update(kv, kv.flip(-1))
    layer.decode_step(torch.randn(bsz, hkv * group, 1, d, generator=gen).to(DEVICE, layer.dtype), scale)


def cut_gap(layer, q, lse, scale):
    """Smallest non-zero relative gap between a head's t-th and (t+1)-th most important token of the
    leaving block (float64), where 0 < t < b: below float32 resolution the two forms may order them
    differently. Equal keys tie exactly in both (then the older token must win in both)."""
    bsz, hkv, d, b = layer.batch_size, layer.num_heads, layer.head_dim, layer.block
    g = q.shape[1] // hkv
    offsets = (layer.ncs - layer.base).view(-1, 1, 1) + torch.arange(b, device=DEVICE)
    ring = layer.seg_start.unsqueeze(-1) + offsets % layer.ring
    k_blk = layer.k_buf.gather(1, ring.view(bsz, -1, 1).expand(-1, -1, d)).view(bsz, hkv, b, d).double()
    logits = torch.einsum("bkgd,bktd->bkgt", q[:, :, 0].double().view(bsz, hkv, g, d), k_blk) * scale
    probs = torch.exp(logits - lse.double().view(bsz, hkv, g, 1))
    imp = (probs.mean(2) if layer.aggregation == "mean" else probs.amax(2)).sort(-1, descending=True).values
    gaps = [float((imp[r, h, t - 1] - imp[r, h, t]) / imp[r, h, 0]) for r in range(bsz)
            for h, t in enumerate(layer._keep_list) if 0 < t < b]
    return min([gap for gap in gaps if gap > 0], default=1.0)


@given(bsz=st.integers(1, 2), hkv=st.integers(1, 3), group=st.sampled_from([1, 2, 4, 8]),
       d=st.sampled_from([16, 32]), block=st.sampled_from([4, 8, 16]), window_blocks=st.integers(1, 3),
       keep=st.data(), prefill=st.floats(0.3, 3.0), warm=st.integers(0, 40), leaves=st.booleans(),
       half=st.booleans(), aggregation=st.sampled_from(["mean", "max"]), dup=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
@example(bsz=1, hkv=2, group=4, d=16, block=8, window_blocks=2, keep=[0, 8], prefill=2.0, warm=0, leaves=True,
         half=False, aggregation="mean", dup=False, seed=0)  # t = 0 and t = b side by side
@example(bsz=1, hkv=2, group=2, d=16, block=8, window_blocks=1, keep=[3, 5], prefill=1.5, warm=3, leaves=True,
         half=False, aggregation="max", dup=True, seed=1)  # equal keys: ties broken towards the older token
@torch.no_grad()
def test_kernel_leaves_the_cache_as_the_tensor_form(bsz, hkv, group, d, block, window_blocks, keep, prefill, warm,
                                                    leaves, half, aggregation, dup, seed):
    gen = torch.Generator().manual_seed(seed)
    window = block * window_blocks
    if isinstance(keep, list):  # from an @example
        t = keep
    else:  # t per head over 0..b, with both ends likely
        t = keep.draw(st.lists(st.one_of(st.just(0), st.just(block), st.integers(0, block)), min_size=hkv,
                               max_size=hkv))
    dtype = torch.float16 if half else torch.float32
    scale = d**-0.5
    layer = fresh_cache(bsz, hkv, group, d, block, window, t, max(2, int(prefill * window)), dtype, aggregation, gen,
                        dup)
    for _ in range(warm):
        step(layer, group, gen, scale, dup)
    while layer.block_leaves_at(layer.get_seq_length()) != leaves:
        step(layer, group, gen, scale, dup)
    kv = new_kv(bsz, hkv, d, gen, dup).to(DEVICE, dtype)
    layer.update(kv, -kv)
    q = torch.randn(bsz, hkv * group, 1, d, generator=gen).to(DEVICE, dtype)
    _, lse = decode_attention(q, layer.k_buf, layer.v_buf, layer.owner, group=group, scale=scale, backend="math")
    if leaves:
        assume(cut_gap(layer, q, lse, scale) > 1e-5)
    ref, got = copy.deepcopy(layer), copy.deepcopy(layer)
    ref.compression, got.compression, got.backend = "math", "triton", "triton"
    ref.compress(q, lse, scale)
    got.compress(q, lse, scale)
    for name in STATE:
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert_slot_layout(got)
    changed = not torch.equal(ref.owner, layer.owner)
    assert changed == leaves, "a block is compressed exactly at the steps where one leaves the window"
    # A second call at the same position does nothing, as the tensor form's second call does.
    got.compress(q, lse, scale)
    ref.compress(q, lse, scale)
    for name in STATE:
        assert torch.equal(getattr(got, name), getattr(ref, name)), name


@torch.no_grad()
def test_compress_op_declares_what_it_mutates():
    """opcheck: schema (mutated arguments declared, nothing else written), fake tensor and autograd
    registrations, run on a state where a block leaves."""
    gen = torch.Generator().manual_seed(3)
    group, scale = 2, 0.25
    layer = fresh_cache(1, 2, group, 16, 8, 16, [3, 8], 40, torch.float32, "mean", gen)
    while not layer.block_leaves_at(layer.get_seq_length()):
        step(layer, group, gen, scale)
    kv = torch.randn(1, 2, 1, 16, generator=gen).to(DEVICE)
    layer.update(kv, kv)
    q = torch.randn(1, 4, 1, 16, generator=gen).to(DEVICE)
    _, lse = decode_attention(q, layer.k_buf, layer.v_buf, layer.owner, group=group, scale=scale, backend="math")
    args = (q[:, :, 0], lse, layer.k_buf, layer.v_buf, layer.owner, layer.pos, layer.seg_start, layer.var_len,
            layer.keep, layer.ncs, layer.next_pos, layer.base, layer.window, layer.block, layer.ring, scale, False)
    torch.library.opcheck(torch.ops.tca_flex.compress_block.default, args)
