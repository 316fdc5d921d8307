"""The FlexAttention chunk attention against the tensor-op reference (``chunks.chunk_attention``)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tca_flex.chunk_flex import chunk_block_indices, flex_chunk_attention
from tca_flex.chunks import chunk_attention
from tca_flex.masks import KERNEL_BLOCK


def _live(gen: torch.Generator, bsz: int, hkv: int, past: int, density: float) -> torch.Tensor:
    live = torch.rand(bsz, hkv, past, generator=gen) < density
    tiles = past // KERNEL_BLOCK
    if tiles >= 2:  # a fully live tile and a dead one, so every kind of past tile occurs
        live[..., :KERNEL_BLOCK] = True
        live[..., KERNEL_BLOCK:2 * KERNEL_BLOCK] = False
    return live


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bsz=st.integers(1, 2), heads=st.sampled_from([(4, 2), (4, 1), (2, 2)]),
       past=st.integers(1, 700), chunk=st.integers(1, 300), density=st.floats(0.05, 1.0))
def test_flex_chunk_attention_matches_reference(seed, bsz, heads, past, chunk, density):
    gen = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    d = 16
    q = torch.randn(bsz, hq, chunk, d, generator=gen)
    k_past, v_past = (torch.randn(bsz, hkv, past, d, generator=gen) for _ in range(2))
    k_new, v_new = (torch.randn(bsz, hkv, chunk, d, generator=gen) for _ in range(2))
    live = _live(gen, bsz, hkv, past, density)
    out, lse = flex_chunk_attention(q, k_past, v_past, live, k_new, v_new, 0.3)
    ref_out, ref_lse = chunk_attention(q.double(), k_past.double(), v_past.double(), live, k_new.double(),
                                       v_new.double(), 0.3)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), past_tiles=st.integers(1, 6), chunk_tiles=st.integers(1, 5),
       density=st.floats(0.0, 1.0), group=st.sampled_from([1, 2]))
def test_chunk_block_indices_cover_exactly_the_visible_tiles(seed, past_tiles, chunk_tiles, density, group):
    gen = torch.Generator().manual_seed(seed)
    past = past_tiles * KERNEL_BLOCK
    live = torch.rand(2, 2, past, generator=gen) < density
    live[0, 0, :KERNEL_BLOCK] = True
    kv_num, kv_idx, full_num, full_idx = chunk_block_indices(live, chunk_tiles, group)
    c = chunk_tiles * KERNEL_BLOCK
    q = torch.arange(c).view(c, 1)
    j = torch.arange(c).view(1, c)
    for b in range(2):
        for h in range(2 * group):
            visible = torch.cat([live[b, h // group].view(1, past).expand(c, past), j <= q], dim=1)
            tiles = visible.view(chunk_tiles, KERNEL_BLOCK, -1, KERNEL_BLOCK)
            any_t, all_t = tiles.any(3).any(1), tiles.all(3).all(1)
            for i in range(chunk_tiles):
                partial = set(kv_idx[b, h, i, :kv_num[b, h, i]].tolist())
                full = set(full_idx[b, h, i, :full_num[b, h, i]].tolist())
                assert not partial & full
                assert full == set(torch.nonzero(all_t[i]).flatten().tolist())
                assert partial == set(torch.nonzero(any_t[i] & ~all_t[i]).flatten().tolist())


def test_compiled_chunk_attention_serves_every_past_and_chunk_length(monkeypatch):
    """The CUDA route (compiled, ``compile.length_generic``) taken on the CPU, compiled by aot_eager
    (Inductor's CPU FlexAttention has no log-sum-exp; dynamo's guards are what is tested): after the
    first call no past or chunk length compiles again, with the queries laid out as a model hands
    them over, and the results equal the float64 reference."""
    import random

    import tca_flex.chunk_flex as chunk_flex
    from tca_flex.compile import _length_generic

    monkeypatch.setattr(chunk_flex, "compiles_chunk", lambda q: not torch.compiler.is_compiling())
    torch._dynamo.reset()
    monkeypatch.setitem(_length_generic, chunk_flex._chunk_flex,
                        torch.compile(chunk_flex._chunk_flex, fullgraph=True, dynamic=False, backend="aot_eager"))
    from torch._dynamo.utils import counters

    gen = torch.Generator().manual_seed(random.randrange(2**31))  # fresh inputs each run
    hq, hkv, d = 4, 2, 16
    before = counters["stats"]["unique_graphs"]
    for i, (past, chunk) in enumerate([(300, 150), (513, 200), (700, 129), (260, 300)]):
        q = torch.randn(1, chunk, hq, d, generator=gen).transpose(1, 2)
        k_past, v_past = (torch.randn(1, hkv, past, d, generator=gen) for _ in range(2))
        k_new, v_new = (torch.randn(1, chunk, hkv, d, generator=gen).transpose(1, 2) for _ in range(2))
        live = _live(gen, 1, hkv, past, 0.4)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out, lse = flex_chunk_attention(q, k_past, v_past, live, k_new, v_new, 0.3)
        ref_out, ref_lse = chunk_attention(q.double(), k_past.double(), v_past.double(), live, k_new.double(),
                                           v_new.double(), 0.3)
        torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5, msg=lambda m, p=past: f"{p}: {m}")
        torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)
    assert counters["stats"]["unique_graphs"] - before == 1  # the compiled route ran: one graph for all
