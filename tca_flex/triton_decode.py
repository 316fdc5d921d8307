"""Triton kernels: one decode step of attention over the head-packed TCA cache.

Why a kernel of our own (measurements in ``BENCHMARKS.md``): FlexAttention
over the flat buffer viewed as one KV head reads every kept byte once but
makes every query head score every head's slots (``H_kv`` times the needed
FLOPs and exponentials), which cost as much as a dense decode at 128K; a
per-head BlockMask with GQA falls off the flex-decoding kernel. Here each
program owns one (row, KV head, split) and reads only that head's segment,
scoring it with the head's ``g`` query heads at once (one ``tl.dot`` of
``[g, D] x [D, N]``), so bytes and FLOPs follow what the head keeps.

Flash-decoding in two passes: ``_split_kernel`` reduces each split of a
segment to (max, sum, un-normalised output); ``_combine_kernel`` merges the
splits of a (row, query head) and writes the output and the log-sum-exp that
compression needs. Splits are sized from the layout's segment capacities
(Python ints), so the grid is fixed between layout growths and the launch
can be captured in a CUDA graph. The split size and count are runtime
arguments, not compile-time constants: every request has its own layout, and
a constant would JIT-compile the kernels again for each (docs/serving.md).
Each split's loop stops at the head's live
length, read on the device (ring fill and packed tokens), so the free
headroom of a segment costs a program that exits, not a read.

This module holds the kernels and a plain launcher only; ``decode.py``
registers the op. Without a GPU the tests run the same kernels on CPU
tensors in Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Measured on an H200 (scripts/gpu_decode_sweep.py, BENCHMARKS.md 2026-12-02): at 128K with
# 39% kept, 256 programs of 128-slot blocks took 67 us; 1024 programs 83-95 us, 2048 106-139 us
# (more splits cost more partial writes and a longer combine than they add in parallelism).
BLOCK_N = 128
TARGET_PROGRAMS = 256
NUM_WARPS = 4
NUM_STAGES = 3
COMBINE_CHUNK = 32


@triton.jit
def _attend_blocks(q, m_i, l_i, acc, k_row, v_row, own_row, seg_start, lo, hi, h, stride_ks, stride_vs, scale,
                   D: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr):
    """Online-softmax update of (m, l, acc) over segment offsets ``[lo, hi)``."""
    d = tl.arange(0, D)
    for n0 in range(lo, hi, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        # int64: slot * stride passes 2**31 elements at large batch x long context.
        slot = (seg_start + n).to(tl.int64)
        inside = n < hi
        # Free slots (ring not yet filled, freed by a compression) are -1 and masked out
        # of the scores; K/V loads do not wait on ``owner`` so they can be pipelined.
        live = tl.load(own_row + slot, mask=inside, other=-1) == h
        k = tl.load(k_row + slot[:, None] * stride_ks + d[None, :], mask=inside[:, None], other=0.0)
        # float32 caches get full-precision dots (Triton would use TF32 on the GPU).
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A split with no live slot so far keeps m = -inf; shift by 0 there to avoid inf - inf.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - shift)
        p = tl.exp(s - shift[:, None])
        v = tl.load(v_row + slot[:, None] * stride_vs + d[None, :], mask=inside[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, owner_ptr, start_ptr, length_ptr, var_len_ptr, next_pos_ptr, base_ptr,
                  o_ptr, m_ptr, l_ptr, stride_qb, stride_qh, stride_kb, stride_ks, stride_vb, stride_vs,
                  stride_ownb, stride_base, scale, ring, HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                  D: tl.constexpr, SPLIT, NUM_SPLITS, BLOCK: tl.constexpr,
                  LIVE: tl.constexpr, IEEE: tl.constexpr):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    seg_start = tl.load(start_ptr + bh)
    seg_len = tl.load(length_ptr + bh)
    lo = split * SPLIT
    hi = tl.minimum(lo + SPLIT, seg_len)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
                mask=g[:, None] < G, other=0.0)
    k_row = k_ptr + b.to(tl.int64) * stride_kb
    v_row = v_ptr + b.to(tl.int64) * stride_vb
    own_row = owner_ptr + b.to(tl.int64) * stride_ownb
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    if LIVE:
        # Live slots of a TCA segment: the ring's filled prefix and the packed prefix
        # (``cache.py``); the headroom after the packed tokens is never read.
        fill = tl.minimum(tl.load(next_pos_ptr) - tl.load(base_ptr + b * stride_base), ring).to(tl.int32)
        packed_end = (ring + tl.load(var_len_ptr + bh)).to(tl.int32)
        m_i, l_i, acc = _attend_blocks(q, m_i, l_i, acc, k_row, v_row, own_row, seg_start, lo,
                                       tl.minimum(hi, fill), h, stride_ks, stride_vs, scale, D, BLOCK, IEEE)
        m_i, l_i, acc = _attend_blocks(q, m_i, l_i, acc, k_row, v_row, own_row, seg_start,
                                       tl.maximum(lo, ring), tl.minimum(hi, packed_end), h, stride_ks,
                                       stride_vs, scale, D, BLOCK, IEEE)
    else:
        m_i, l_i, acc = _attend_blocks(q, m_i, l_i, acc, k_row, v_row, own_row, seg_start, lo, hi, h,
                                       stride_ks, stride_vs, scale, D, BLOCK, IEEE)
    # Only the G real query rows go out: the partials are a few percent of the K/V bytes.
    row = (bh * NUM_SPLITS + split) * G + g
    real = g < G
    tl.store(m_ptr + row, m_i, mask=real)
    tl.store(l_ptr + row, l_i, mask=real)
    tl.store(o_ptr + row[:, None] * D + d[None, :], acc, mask=real[:, None])


@triton.jit
def _combine_kernel(o_ptr, m_ptr, l_ptr, out_ptr, lse_ptr, stride_outb, stride_outh,
                    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, NUM_SPLITS,
                    CHUNK: tl.constexpr):
    bh = tl.program_id(0)
    gi = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    d = tl.arange(0, D)
    m_run = tl.full([1], float("-inf"), tl.float32)
    l_run = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for c0 in range(0, NUM_SPLITS, CHUNK):
        s = c0 + tl.arange(0, CHUNK)
        inside = s < NUM_SPLITS
        row = (bh * NUM_SPLITS + s) * G + gi
        m = tl.load(m_ptr + row, mask=inside, other=float("-inf"))
        l_s = tl.load(l_ptr + row, mask=inside, other=0.0)
        o = tl.load(o_ptr + row[:, None] * D + d[None, :], mask=inside[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, 0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp(m - shift)  # empty splits have m = -inf: weight 0
        alpha = tl.exp(m_run - shift)
        l_run = l_run * alpha + tl.sum(l_s * w, 0)
        acc = acc * alpha + tl.sum(o * w[:, None], 0)
        m_run = m_new
    head = h * G + gi
    tl.store(out_ptr + b * stride_outb + head * stride_outh + d, (acc / l_run).to(out_ptr.dtype.element_ty))
    tl.store(lse_ptr + b * (HKV * G) + head + tl.arange(0, 1), m_run + tl.log(l_run))


def split_size(total_slots: int, block: int = BLOCK_N, programs: int = TARGET_PROGRAMS) -> int:
    """Slots per program: about ``programs`` programs over all segments together.

    Decode reads each kept byte once, so the kernel is bound by how many loads
    are in flight: enough programs to fill every SM several times over, each
    streaming a few blocks, whatever the heads' (very unequal) lengths.
    """
    per = max(block, -(-total_slots // programs))
    return -(-per // block) * block


def launch(q_bhd: torch.Tensor, k_bsd: torch.Tensor, v_bsd: torch.Tensor, owner_bs: torch.Tensor,
           seg_start: torch.Tensor, seg_len: torch.Tensor, max_segment: int, scale: float,
           total_slots: int | None = None, live: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
           block: int | None = None, programs: int | None = None, num_warps: int | None = None,
           num_stages: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run both kernels.

    Args:
        q_bhd: ``[B, H_q, D]`` (stride 1 over ``D``).
        k_bsd, v_bsd: ``[B, S, D]`` contiguous flat buffers.
        owner_bs: int32 ``[B, S]`` contiguous: KV head of each live slot, ``-1`` if free.
        seg_start, seg_len: int32 ``[B, H_kv]`` contiguous: each head's segment (slots).
        max_segment: Python int >= every ``seg_len`` (sizes the grid).
        scale: softmax scale.
        total_slots: Python int, the segments' total length (sizes the
            splits; default ``max_segment`` times the number of segments).
        live: ``(var_len, next_pos, base, ring)`` of a TCA cache: int64
            ``[B, H_kv]`` packed tokens per head, int64 0-d next position,
            int64 ``[B]`` (or 0-d: shared) base position of each row's ring,
            and the ring size (Python int). Only offsets
            ``[0, min(next_pos - base, ring))`` and ``[ring, ring + var_len)`` of
            each segment are read (the live lengths, read on the device each
            step); ``None``: the whole segment.
        block, programs, num_warps, num_stages: tuning knobs; ``None`` takes
            the module's ``BLOCK_N``, ``TARGET_PROGRAMS``, ``NUM_WARPS`` and
            ``NUM_STAGES`` (measured on an H200, ``scripts/gpu_decode_sweep.py``).

    Returns:
        (``[B, H_q, D]`` output in q's dtype, float32 ``[B, H_q]`` log-sum-exp).
    """
    bsz, hq, d = q_bhd.shape
    hkv = seg_start.shape[1]
    group = hq // hkv
    g_pad = max(16, triton.next_power_of_2(group))  # tl.dot needs >= 16 rows
    block, programs = block or BLOCK_N, programs or TARGET_PROGRAMS
    num_warps, num_stages = num_warps or NUM_WARPS, num_stages or NUM_STAGES
    if total_slots is None:
        total_slots = max_segment * seg_start.numel()
    split = split_size(total_slots, block, programs)
    num_splits = max(1, -(-max_segment // split))
    dev = q_bhd.device
    # Unused pointers when the whole segment is read (LIVE=False): any valid tensor will do.
    var_len, next_pos, base, ring = live if live is not None else (seg_len, seg_len, seg_len, 0)
    o_part = torch.empty(bsz * hkv * num_splits * group, d, dtype=torch.float32, device=dev)
    m_part = torch.empty(bsz * hkv * num_splits * group, dtype=torch.float32, device=dev)
    l_part = torch.empty_like(m_part)
    out = torch.empty(bsz, hq, d, dtype=q_bhd.dtype, device=dev)
    lse = torch.empty(bsz, hq, dtype=torch.float32, device=dev)
    _split_kernel[(num_splits, bsz * hkv)](
        q_bhd, k_bsd, v_bsd, owner_bs, seg_start, seg_len, var_len, next_pos, base, o_part, m_part, l_part,
        q_bhd.stride(0), q_bhd.stride(1), k_bsd.stride(0), k_bsd.stride(1), v_bsd.stride(0), v_bsd.stride(1),
        owner_bs.stride(0), base.stride(0) if live is not None and base.dim() else 0, scale, ring, HKV=hkv, G=group, G_PAD=g_pad, D=d, SPLIT=split, NUM_SPLITS=num_splits,
        BLOCK=block, LIVE=live is not None, IEEE=q_bhd.dtype == torch.float32, num_warps=num_warps,
        num_stages=num_stages)
    _combine_kernel[(bsz * hkv, group)](
        o_part, m_part, l_part, out, lse, out.stride(0), out.stride(1), HKV=hkv, G=group, D=d,
        NUM_SPLITS=num_splits, CHUNK=COMBINE_CHUNK)
    return out, lse
