"""The Triton decode kernels against float64 attention over each head's live slots.

Without a GPU the kernels run in Triton's interpreter (``conftest.py``); on a
GPU the same tests run the compiled kernels through the registered op.
"""

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tca_flex.decode as decode
from tca_flex.decode import LiveRanges, Segments, decode_attention

pytestmark = pytest.mark.skipif(
    decode.triton_decode is None or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs Triton (compiled on a GPU, or its CPU interpreter)")


def run_kernels(q, k, v, owner, segments, scale, block=64, live=None):
    if block == 64:  # through the op, as the cache calls it
        return decode_attention(q, k, v, owner, group=q.shape[1] // segments.start.shape[1], scale=scale,
                                backend="triton", segments=segments, live=live)
    out, lse = decode.triton_decode.launch(q[:, :, 0], k, v, owner, segments.start, segments.length,
                                           segments.max_length, scale, total_slots=segments.total_length,
                                           live=live, block=block)
    return out.unsqueeze(2), lse


def random_cache(bsz, hkv, d, seg_lens, live_frac, dtype, device, gen):
    """Flat buffers with one segment per (row, head), a fraction of each segment live."""
    starts, lengths, slots = [], [], 0
    for row in seg_lens:
        offs = [sum(row[:h]) for h in range(hkv)]
        starts.append(offs)
        lengths.append(list(row))
        slots = max(slots, sum(row))
    k = torch.randn(bsz, slots, d, generator=gen).to(dtype)
    v = torch.randn(bsz, slots, d, generator=gen).to(dtype)
    owner = torch.full((bsz, slots), -1, dtype=torch.int32)
    for b in range(bsz):
        for h in range(hkv):
            s0, n = starts[b][h], lengths[b][h]
            live = torch.rand(n, generator=gen) < live_frac
            live[torch.randint(n, (1,), generator=gen)] = True  # every head holds its newest token
            owner[b, s0:s0 + n][live] = h
    segments = Segments(torch.tensor(starts, dtype=torch.int32, device=device),
                        torch.tensor(lengths, dtype=torch.int32, device=device), max(map(max, lengths)),
                        sum(map(sum, lengths)))
    return k.to(device), v.to(device), owner.to(device), segments


def reference(q, k, v, owner, group, scale, readable=None):
    """float64 attention of each query head over the slots its KV head owns (and ``readable[b, slot]``)."""
    bsz, hq, _, _ = q.shape
    out = torch.empty(bsz, hq, q.shape[-1], dtype=torch.float64)
    lse = torch.empty(bsz, hq, dtype=torch.float64)
    for b in range(bsz):
        for h in range(hq):
            live = (owner[b] == h // group).cpu()
            if readable is not None:
                live &= readable[b]
            logits = k[b].cpu()[live].double() @ q[b, h, 0].cpu().double() * scale
            lse[b, h] = logits.logsumexp(0)
            out[b, h] = torch.softmax(logits, 0) @ v[b].cpu()[live].double()
    return out, lse


@given(bsz=st.integers(1, 2), hkv=st.integers(1, 3), group=st.sampled_from([1, 2, 4, 8]),
       d=st.sampled_from([16, 32]), max_len=st.sampled_from([40, 300, 700]), live=st.floats(0.05, 1.0),
       half=st.booleans(), block=st.sampled_from([16, 64]), seed=st.integers(0, 2**31 - 1))
@torch.no_grad()
def test_kernels_equal_float64_attention_over_live_slots(bsz, hkv, group, d, max_len, live, half, block, seed):
    # block 16 over 700 slots gives > COMBINE_CHUNK splits: the combine loops over chunks.
    gen = torch.Generator().manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if half else torch.float32
    seg_lens = torch.randint(1, max_len + 1, (bsz, hkv), generator=gen).tolist()
    k, v, owner, segments = random_cache(bsz, hkv, d, seg_lens, live, dtype, device, gen)
    q = torch.randn(bsz, hkv * group, 1, d, generator=gen).to(dtype).to(device)
    scale = d ** -0.5
    out, lse = run_kernels(q, k, v, owner, segments, scale, block)
    ref_out, ref_lse = reference(q, k, v, owner, group, scale)
    tol = 2e-3 if half else 1e-5
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out[:, :, 0].cpu().double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=tol, rtol=tol)


@given(bsz=st.integers(1, 2), hkv=st.integers(1, 3), group=st.sampled_from([1, 4]), ring=st.integers(1, 200),
       fill=st.floats(0.0, 1.5), packed=st.lists(st.integers(0, 300), min_size=6, max_size=6),
       block=st.sampled_from([16, 64]), seed=st.integers(0, 2**31 - 1))
@torch.no_grad()
def test_live_lengths_bound_what_the_kernel_reads(bsz, hkv, group, ring, fill, packed, block, seed):
    """A TCA segment is [ring | packed | headroom]: only the ring's filled prefix and the packed prefix
    count, even where ``owner`` claims other slots (stale owners past the live lengths must not be read)."""
    gen = torch.Generator().manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    d, scale = 16, 0.25
    var_len = torch.tensor(packed[: bsz * hkv]).view(bsz, hkv)
    headroom = torch.randint(0, 40, (bsz, hkv), generator=gen)
    seg_lens = (ring + var_len + headroom).tolist()
    k, v, owner, segments = random_cache(bsz, hkv, d, seg_lens, 0.7, torch.float32, device, gen)
    filled = min(ring, max(1, int(fill * ring)))  # the newest token is always in the ring
    readable = torch.zeros(owner.shape, dtype=torch.bool)
    for b in range(bsz):
        for h in range(hkv):
            s0 = int(segments.start[b, h])
            owner[b, s0] = h  # every head holds at least one readable token
            readable[b, s0: s0 + filled] = True
            readable[b, s0 + ring: s0 + ring + int(var_len[b, h])] = True
    next_pos = torch.tensor(1000 + filled, device=device)
    live = LiveRanges(var_len.to(device), next_pos, torch.tensor(1000, device=device), ring)
    q = torch.randn(bsz, hkv * group, 1, d, generator=gen).to(device)
    out, lse = run_kernels(q, k, v, owner, segments, scale, block, live)
    ref_out, ref_lse = reference(q, k, v, owner, group, scale, readable)
    torch.testing.assert_close(out[:, :, 0].cpu().double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=1e-5, rtol=1e-5)


@given(total=st.integers(1, 10**6), block=st.sampled_from([16, 64, 128]), programs=st.integers(1, 4096))
def test_split_size_bounds_the_grid(total, block, programs):
    split = decode.triton_decode.split_size(total, block, programs)
    assert split % block == 0 and split >= block
    assert -(-total // split) <= programs or split == block


def test_triton_backend_refuses_what_it_cannot_run():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1, 16, generator=g)
    k = v = torch.randn(1, 8, 16, generator=g)
    owner = torch.zeros(1, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="backend 'triton' needs"):
        decode_attention(q, k, v, owner, group=4, scale=0.25, backend="triton")
