"""The Triton decode kernels against float64 attention over each head's live slots.

Without a GPU the kernels run in Triton's interpreter (``conftest.py``); on a
GPU the same tests run the compiled kernels through the registered op.
"""

import os
from unittest import mock

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import tca_flex.decode as decode
from tca_flex.decode import LiveRanges, Segments, decode_attention

pytestmark = pytest.mark.skipif(
    decode.triton_decode is None or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs Triton (compiled on a GPU, or its CPU interpreter)")


SCHEDULES = decode.triton_decode.SCHEDULES if decode.triton_decode is not None else ()
# The grid of "balanced", below and above the 1-6 segments drawn (the interpreter runs programs one
# by one: the default, BALANCED_PROGRAMS, would be slow).
PROGRAMS = st.sampled_from([1, 2, 5, 48])
# The merge's tile (partials an iteration, dims a program): the shipped one, and one small enough that
# the merge loops over chunks and splits the head's dims over programs at every size drawn.
MERGE_TILES = st.sampled_from([None, (2, 8)])


def run_kernels(q, k, v, owner, segments, scale, block=64, live=None, schedule="split", programs=None,
                merge_tile=None):
    """``programs``: the grid of "balanced"; "split" keeps its default target. ``merge_tile``:
    ``(COMBINE_CHUNK, COMBINE_DIMS)`` for this call, ``None`` the module's."""
    kernels = decode.triton_decode
    if merge_tile is not None:
        with mock.patch.object(kernels, "COMBINE_CHUNK", merge_tile[0]), \
                mock.patch.object(kernels, "COMBINE_DIMS", merge_tile[1]):
            return run_kernels(q, k, v, owner, segments, scale, block, live, schedule, programs)
    if schedule == "split":
        programs = None
    if block == 64:  # through the op, as the cache calls it: schedule and grid as the module's defaults
        with mock.patch.object(kernels, "SCHEDULE", schedule), \
                mock.patch.object(kernels, "BALANCED_PROGRAMS", programs or kernels.BALANCED_PROGRAMS):
            out, lse = decode_attention(q, k, v, owner, group=q.shape[1] // segments.start.shape[1], scale=scale,
                                        backend="triton", segments=segments, live=live)
    else:
        out, lse = kernels.launch(q[:, :, 0], k, v, owner, segments.start, segments.length, segments.max_length,
                                  scale, total_slots=segments.total_length, live=live, block=block,
                                  schedule=schedule, programs=programs)
        out = out.unsqueeze(2)
    return out, lse


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
            if n:  # every head with a slot holds its newest token
                live[torch.randint(n, (1,), generator=gen)] = True
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
            if not live.any():  # nothing to attend: 0 / 0, as the "math" backend gives
                out[b, h], lse[b, h] = float("nan"), float("-inf")
                continue
            logits = k[b].cpu()[live].double() @ q[b, h, 0].cpu().double() * scale
            lse[b, h] = logits.logsumexp(0)
            out[b, h] = torch.softmax(logits, 0) @ v[b].cpu()[live].double()
    return out, lse


@pytest.mark.parametrize("schedule", SCHEDULES)
@given(bsz=st.integers(1, 2), hkv=st.integers(1, 3), group=st.sampled_from([1, 2, 4, 8]),
       d=st.sampled_from([16, 32]), max_len=st.sampled_from([40, 300, 700]), live=st.floats(0.05, 1.0),
       half=st.booleans(), block=st.sampled_from([16, 64]), programs=PROGRAMS, merge_tile=MERGE_TILES,
       seed=st.integers(0, 2**31 - 1))
@torch.no_grad()
def test_kernels_equal_float64_attention_over_live_slots(schedule, bsz, hkv, group, d, max_len, live, half, block,
                                                         programs, merge_tile, seed):
    gen = torch.Generator().manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if half else torch.float32
    seg_lens = torch.randint(1, max_len + 1, (bsz, hkv), generator=gen).tolist()
    k, v, owner, segments = random_cache(bsz, hkv, d, seg_lens, live, dtype, device, gen)
    q = torch.randn(bsz, hkv * group, 1, d, generator=gen).to(dtype).to(device)
    scale = d ** -0.5
    out, lse = run_kernels(q, k, v, owner, segments, scale, block, schedule=schedule, programs=programs,
                           merge_tile=merge_tile)
    ref_out, ref_lse = reference(q, k, v, owner, group, scale)
    tol = 2e-3 if half else 1e-5
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out[:, :, 0].cpu().double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=tol, rtol=tol)


@pytest.mark.parametrize("schedule", SCHEDULES)
@given(bsz=st.integers(1, 2), hkv=st.integers(1, 3), group=st.sampled_from([1, 4]), ring=st.integers(1, 200),
       fill=st.floats(0.0, 1.5), packed=st.lists(st.integers(0, 300), min_size=6, max_size=6),
       block=st.sampled_from([16, 64]), programs=PROGRAMS, seed=st.integers(0, 2**31 - 1))
@torch.no_grad()
def test_live_lengths_bound_what_the_kernel_reads(schedule, bsz, hkv, group, ring, fill, packed, block, programs,
                                                  seed):
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
    out, lse = run_kernels(q, k, v, owner, segments, scale, block, live, schedule, programs)
    ref_out, ref_lse = reference(q, k, v, owner, group, scale, readable)
    torch.testing.assert_close(out[:, :, 0].cpu().double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=1e-5, rtol=1e-5)


# 0 / 0 and log(0) are the point here.
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("schedule", SCHEDULES)
@given(bsz=st.integers(1, 2), hkv=st.integers(1, 3), counts=st.lists(st.sampled_from([0, 0, 3, 16, 64, 200]),
       min_size=6, max_size=6), ring_filled=st.lists(st.booleans(), min_size=2, max_size=2),
       live_ranges=st.booleans(), block=st.sampled_from([16, 64]), programs=PROGRAMS,
       seed=st.integers(0, 2**31 - 1))
# An empty segment at a share boundary (slot 64 of shares of 16) still has a program that writes it.
@example(bsz=1, hkv=2, counts=[64, 0, 0, 0, 0, 0], ring_filled=[False, False], live_ranges=False, block=16,
         programs=5, seed=0)
@torch.no_grad()
def test_heads_with_nothing_to_read_give_nan_and_minus_inf(schedule, bsz, hkv, counts, ring_filled, live_ranges,
                                                           block, programs, seed):
    """A head with no live slot (an empty segment, or empty live runs: ring not filled, nothing packed)
    gets 0 / 0, a NaN output and lse -inf, as the "math" backend gives; the other heads are unaffected."""
    gen = torch.Generator().manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    d, scale, ring, group = 16, 0.25, 8, 2
    counts = torch.tensor(counts[: bsz * hkv]).view(bsz, hkv)
    k, v, owner, segments = random_cache(bsz, hkv, d, (counts + ring * live_ranges).tolist(), 0.7, torch.float32,
                                         device, gen)
    live = readable = None
    if live_ranges:  # segments [ring | packed], the ring of each row filled or not at all
        fill = [ring * f for f in ring_filled[:bsz]]
        readable = torch.zeros(owner.shape, dtype=torch.bool)
        for b in range(bsz):
            for h in range(hkv):
                s0 = int(segments.start[b, h])
                readable[b, s0: s0 + fill[b]] = True
                readable[b, s0 + ring: s0 + ring + int(counts[b, h])] = True
        live = LiveRanges(counts.to(device), torch.tensor(100, device=device),
                          torch.tensor([100 - f for f in fill], device=device), ring)
    q = torch.randn(bsz, hkv * group, 1, d, generator=gen).to(device)
    out, lse = run_kernels(q, k, v, owner, segments, scale, block, live, schedule, programs)
    ref_out, ref_lse = reference(q, k, v, owner, group, scale, readable)
    torch.testing.assert_close(out[:, :, 0].cpu().double(), ref_out, atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_launch_refuses_an_unknown_schedule():
    with pytest.raises(ValueError, match="schedule='stream'"):
        decode.triton_decode.launch(torch.zeros(1, 1, 16), torch.zeros(1, 1, 16), torch.zeros(1, 1, 16),
                                    torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
                                    torch.ones(1, 1, dtype=torch.int32), 1, 1.0, schedule="stream")


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


@given(st.integers(1, 1 << 20))
def test_next_pow2_is_the_smallest_power_of_two_at_least_n(n):
    """The launchers' plain-Python rounding agrees with Triton's for every size they pass (>= 1)."""
    import triton

    p = decode.triton_decode.next_pow2(n)
    assert p == triton.next_power_of_2(n)
    assert p >= n and p & (p - 1) == 0 and (p == 1 or p // 2 < n)


@pytest.mark.parametrize("schedule", SCHEDULES)
@given(bsz=st.integers(1, 2), hkv=st.integers(1, 3), group=st.sampled_from([1, 4]), ring=st.integers(1, 60),
       ahead=st.lists(st.integers(0, 150), min_size=2, max_size=2), packed=st.lists(st.integers(0, 200), min_size=6,
                                                                                    max_size=6),
       half=st.booleans(), block=st.sampled_from([16, 64]), programs=PROGRAMS, merge_tile=MERGE_TILES,
       seed=st.integers(0, 2**31 - 1))
@torch.no_grad()
def test_the_merge_appends_the_token_as_an_append_before_the_attention(schedule, bsz, hkv, group, ring, ahead,
                                                                       packed, half, block, programs, merge_tile,
                                                                       seed):
    """``token=``: the attention over the cache as it is, the new token folded in by the merge and then
    written. The output and log-sum-exp equal float64 attention over the cache after a tensor-form
    append (``append_token_math``), and every buffer equals that append's, bit for bit. Each row has its
    own ring base and fill (``ahead`` tokens since it: filling, or wrapped, where the slot the token
    takes was freed by a compression, as the cache guarantees)."""
    gen = torch.Generator().manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if half else torch.float32  # (Triton's interpreter mis-reads bfloat16 in tl.dot)
    d, scale = 16, 0.25
    var_len = torch.tensor(packed[: bsz * hkv]).view(bsz, hkv)
    seg_lens = (ring + var_len + torch.randint(0, 40, (bsz, hkv), generator=gen)).tolist()
    k, v, owner, segments = random_cache(bsz, hkv, d, seg_lens, 0.7, dtype, device, gen)
    next_pos = 500
    base = torch.tensor([next_pos - a for a in ahead[:bsz]])
    for b in range(bsz):
        for h in range(hkv):
            s0 = int(segments.start[b, h])
            owner[b, s0 + (next_pos - int(base[b])) % ring] = -1  # the token's slot: free (or past the fill)
            owner[b, s0 + ring: s0 + ring + int(var_len[b, h])] = h  # the packed run is dense
    pos = torch.randint(0, next_pos, owner.shape, generator=gen, dtype=torch.int32).to(device)
    key, value = (torch.randn(bsz, hkv, 1, d, generator=gen).to(device, dtype) for _ in range(2))
    q = torch.randn(bsz, hkv * group, 1, d, generator=gen).to(device, dtype)
    state = dict(k=k, v=v, owner=owner, pos=pos, next_pos=torch.tensor(next_pos, device=device))
    want = {name: t.clone() for name, t in state.items()}
    decode.append_token_math(key, value, want["k"], want["v"], want["owner"], want["pos"],
                             segments.start.long(), want["next_pos"], base.to(device), ring=ring)
    live = LiveRanges(var_len.to(device), state["next_pos"], base.to(device), ring)
    kernels = decode.triton_decode
    tile = merge_tile or (kernels.COMBINE_CHUNK, kernels.COMBINE_DIMS)
    with mock.patch.object(kernels, "COMBINE_CHUNK", tile[0]), mock.patch.object(kernels, "COMBINE_DIMS", tile[1]):
        out, lse = kernels.launch(q[:, :, 0], k, v, owner, segments.start, segments.length, segments.max_length,
                                  scale, total_slots=segments.total_length, live=live, block=block,
                                  schedule=schedule, programs=programs, token=(key[:, :, 0], value[:, :, 0], pos))
    for name in state:
        assert torch.equal(state[name], want[name]), name
    readable = torch.zeros(owner.shape, dtype=torch.bool)
    for b in range(bsz):
        fill = min(ahead[b] + 1, ring)
        for h in range(hkv):
            s0 = int(segments.start[b, h])
            readable[b, s0: s0 + fill] = True
            readable[b, s0 + ring: s0 + ring + int(var_len[b, h])] = True
    ref_out, ref_lse = reference(q, want["k"], want["v"], want["owner"], group, scale, readable)
    tol = 2e-3 if half else 1e-5
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=tol, rtol=tol)


def test_a_token_needs_the_live_ranges():
    """The token's ring slot comes from the live ranges: without them the launch refuses."""
    gen = torch.Generator().manual_seed(2)
    k, v, owner, segments = random_cache(1, 1, 16, [[8]], 1.0, torch.float32, "cpu", gen)
    q = torch.randn(1, 1, 16)
    with pytest.raises(ValueError, match="live ranges"):
        decode.triton_decode.launch(q, k, v, owner, segments.start, segments.length, 8, 0.25,
                                    token=(q, q, owner))


@torch.no_grad()
def test_decode_append_op_declares_what_it_mutates():
    """opcheck of the op a compiled step runs (``tca_flex::decode_append``): schema (every buffer the
    merge writes declared as mutated, nothing else written), fake tensor and autograd registrations."""
    gen = torch.Generator().manual_seed(4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bsz, hkv, d, ring = 2, 2, 16, 8
    k, v, owner, segments = random_cache(bsz, hkv, d, [[ring + 5, ring + 9], [ring + 3, ring + 7]], 0.8,
                                         torch.float32, device, gen)
    pos = torch.randint(0, 40, owner.shape, generator=gen, dtype=torch.int32).to(device)
    key, value = (torch.randn(bsz, hkv, d, generator=gen).to(device) for _ in range(2))
    q = torch.randn(bsz, 2 * hkv, d, generator=gen).to(device)
    var_len = torch.tensor([[3, 5], [2, 4]], device=device)
    args = (q, key, value, k, v, owner, pos, segments.start, segments.length, var_len,
            torch.tensor(40, device=device), torch.tensor([35, 30], device=device), ring, segments.max_length,
            segments.total_length, 0.25)
    torch.library.opcheck(torch.ops.tca_flex.decode_append.default, args)


def test_decode_attention_refuses_a_token_it_cannot_append():
    """Only the "triton" backend's merge appends a token: the others would drop it, so they refuse it."""
    gen = torch.Generator().manual_seed(6)
    k, v, owner, segments = random_cache(1, 1, 16, [[8]], 1.0, torch.float32, "cpu", gen)
    q = torch.randn(1, 1, 1, 16, generator=gen)
    token = decode.NewToken(q, q, torch.zeros_like(owner))
    with pytest.raises(ValueError, match="appends a token only on the 'triton' backend"):
        decode_attention(q, k, v, owner, group=1, scale=0.25, backend="math", segments=segments, token=token)
