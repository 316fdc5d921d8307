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
compression needs; given the step's new token (``launch``'s ``token``), the
merge also folds it in and writes it to the cache (``_append_token``), so the
attention runs first and no launch of its own appends it. Splits are sized
from the layout's segment capacities (Python ints), so the grid is fixed
between layout growths and the launch
can be captured in a CUDA graph. The split size and count are runtime
arguments, not compile-time constants: every request has its own layout, and
a constant would JIT-compile the kernels again for each (docs/serving.md).
Each split's loop stops at the head's live
length, read on the device (ring fill and packed tokens), so the free
headroom of a segment costs a program that exits, not a read.

That "split" schedule sizes its grid from the longest segment: the programs
of short heads exit at once and the working ones run in uneven waves. The
"balanced" schedule (stream-K style) launches a fixed grid of ``programs``
instead; on the device every program lays all the live slots end to end,
segment after segment, and attends an equal contiguous share of them, one
partial per (program, segment) it meets; ``_combine_kernel`` merges
each segment's partials. The grid depends on Python ints only, so it replays
from a CUDA graph while the live lengths change.

This module holds the kernels and a plain launcher only; ``decode.py``
registers the op. Without a GPU the tests run the same kernels on CPU
tensors in Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from .checks import check_choice

# Measured on an H200 (scripts/gpu_decode_sweep.py, BENCHMARKS.md 2026-12-03): at 128K with 39% kept
# and the live lengths read on the device, "balanced" with 396 programs (three per SM of 132) of
# 64-slot blocks, 4 warps, 2 stages took 62.7 us; the best "split" setting 67.7 us (512 programs),
# "fused" 87 us (balanced with the merge done in the same kernel by the program that completes a
# segment, since removed: its serialised merge costs more than the second launch it saves).
# With "split", more programs only got slower (2026-12-02: 1024 programs 83-95 us, 2048 106-139 us):
# per-program partials and a longer combine, and programs of short heads that exit at once.
# "blocks" (2026-12-04, commit 91f6a4d, since removed): balanced as one pipelined loop over whole
# blocks across segments and live runs: 65.9 us against 63.0 (26.6 against 24.8 at 32K). The merge
# costs ~6 us of the 63 (scripts/gpu_decode_parts.py); launching it as a programmatic dependent of
# the balanced kernel (commit ff15645, since removed) saved nothing measurable. A second "fused"
# (2026-12-04, commit 8963fde): the merge after the attention loop, all heads at once, 103 us
# against 62: one CTA merging a segment's ~50 partials is slower than the 32-program merge kernel,
# and the counter's branch alone cost ~20 us at 396 programs. The append of the step's token done
# by the balanced kernel itself (2026-12-04 night, commit 0a0b500, reverted): the whole step 85 us
# against 64 with the append's own kernel, another data-dependent branch in the segment loop.
# No owner loads on the packed run, which never has a free slot (2026-12-06, commit a794ea7,
# reverted): 79.3 against 79.4 us on an H100 at 128K, 39% kept; the owner bytes are 0.8% of a block's.
# Warp-specialized TMA loads over the packed run (2026-12-06, scripts/ws_probe.py): Triton 3.6 does not
# compile them at 4 warps and they gain nothing at 8; a kernel that only streams the same bytes (no layout,
# ring, owner or merge) is 7% faster than this one on an H100, cuDNN over a compact copy 3-5%.
BLOCK_N = 64
TARGET_PROGRAMS = 256
NUM_WARPS = 4
NUM_STAGES = 2
# The merge: one program per (segment, query head, 64 dims), 128 partials an iteration, 4 warps.
# Measured on an H200 (2026-12-04 (night), BENCHMARKS.md): 2-3 us faster a call than one program
# per (segment, query head) merging 32 partials an iteration (128K 39% kept: 59.2 us against 62.3;
# 32K 25% + window: 16.8 against 18.2); the merge is latency-bound, so more programs with one
# round of loads each beat fewer that loop.
COMBINE_CHUNK = 128
COMBINE_DIMS = 64
COMBINE_WARPS = 4
SCHEDULES = ("split", "balanced")
SCHEDULE = "balanced"
BALANCED_PROGRAMS = 396


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
def _attend_runs(q_ptr, k_ptr, v_ptr, owner_ptr, seg_start, bh, lo0, hi0, lo1, hi1, stride_qb, stride_qh, stride_kb,
                 stride_ks, stride_vb, stride_vs, stride_ownb, scale, HKV: tl.constexpr, G: tl.constexpr,
                 G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr):
    """(m, l, acc) of segment ``bh`` (first slot ``seg_start``)'s ``G`` query heads over its offsets
    ``[lo0, hi0)`` and ``[lo1, hi1)``."""
    b = bh // HKV
    h = bh % HKV
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
    m_i, l_i, acc = _attend_blocks(q, m_i, l_i, acc, k_row, v_row, own_row, seg_start, lo0, hi0, h, stride_ks,
                                   stride_vs, scale, D, BLOCK, IEEE)
    return _attend_blocks(q, m_i, l_i, acc, k_row, v_row, own_row, seg_start, lo1, hi1, h, stride_ks, stride_vs,
                          scale, D, BLOCK, IEEE)


@triton.jit
def _store_partial(o_ptr, m_ptr, l_ptr, entry, m_i, l_i, acc, G: tl.constexpr, G_PAD: tl.constexpr,
                   D: tl.constexpr):
    # Only the G real query rows go out: the partials are a few percent of the K/V bytes.
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    row = entry * G + g
    real = g < G
    tl.store(m_ptr + row, m_i, mask=real)
    tl.store(l_ptr + row, l_i, mask=real)
    tl.store(o_ptr + row[:, None] * D + d[None, :], acc, mask=real[:, None])


@triton.jit
def _merge_partials(o_ptr, m_ptr, l_ptr, first, count, g0, d0, G: tl.constexpr, D: tl.constexpr,
                    DS: tl.constexpr, CHUNK: tl.constexpr):
    """(m, l, acc) of query head ``g0``, dims ``[d0, d0 + DS)``, merged over partial entries
    ``first .. first + count``."""
    c = tl.arange(0, CHUNK)
    d = d0 + tl.arange(0, DS)
    m_run = tl.full([1], float("-inf"), tl.float32)
    l_run = tl.zeros([1], tl.float32)
    acc = tl.zeros([1, DS], tl.float32)
    for c0 in range(0, count, CHUNK):
        inside = (c0 + c) < count
        row = (first + c0 + c) * G + g0
        m = tl.load(m_ptr + row, mask=inside, other=float("-inf"))
        l_s = tl.load(l_ptr + row, mask=inside, other=0.0)
        o = tl.load(o_ptr + row[:, None] * D + d[None, :], mask=inside[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, 0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp(m - shift)  # empty entries have m = -inf: weight 0
        alpha = tl.exp(m_run - shift)
        l_run = l_run * alpha + tl.sum(l_s * w, 0)
        acc = acc * alpha[:, None] + tl.sum(o * w[:, None], 0)[None, :]
        m_run = m_new
    return m_run, l_run, acc


@triton.jit
def _store_output(out_ptr, lse_ptr, bh, g0, d0, m_run, l_run, acc, stride_outb, stride_outh, HKV: tl.constexpr,
                  G: tl.constexpr, DS: tl.constexpr):
    # A head with no live slot gets l = 0: output 0 / 0 (NaN) and lse -inf, as the "math" backend gives.
    b = bh // HKV
    head = (bh % HKV) * G + g0
    d = d0 + tl.arange(0, DS)
    tl.store(out_ptr + b * stride_outb + head * stride_outh + d[None, :],
             (acc / l_run[:, None]).to(out_ptr.dtype.element_ty))
    one = tl.arange(0, 1)
    tl.store(lse_ptr + b * (HKV * G) + head + one, m_run + tl.log(l_run), mask=(one + d0) == 0)


@triton.jit
def _load_token(bh, gi, d0, q_ptr, key_ptr, value_ptr, k_ptr, v_ptr, start_ptr, next_pos_ptr, base_ptr, stride_qb,
                stride_qh, stride_keyb, stride_keyh, stride_valb, stride_valh, stride_base, HKV: tl.constexpr,
                G: tl.constexpr, D: tl.constexpr, DS: tl.constexpr):
    """Every load ``_append_token`` needs, issued first in the merge: nothing uses them before the
    partials are merged, so they wait alongside the merge's own loads, not after them (a reduction or
    a store on them before the merge's loads would hold those back by one round trip). Returns query
    head ``g0``'s query, the token's key (in the cache's dtype), its value's dims ``[d0, d0 + DS)``
    and, for the program that writes it, its whole value; the position, the row's ring base and the
    segment's first slot."""
    b = bh // HKV
    h = bh % HKV
    d = tl.arange(0, D)
    # The row mask as a comparison: Triton's interpreter gives (scalar & block) an int dtype it cannot mask with.
    whole = d < tl.where((gi == 0) & (d0 == 0), D, 0)
    q = tl.load(q_ptr + b * stride_qb + (h * G + gi) * stride_qh + d)
    # The key and value as the cache stores them, so scores match a token read back.
    key = tl.load(key_ptr + b * stride_keyb + h * stride_keyh + d).to(k_ptr.dtype.element_ty)
    value = tl.load(value_ptr + b * stride_valb + h * stride_valh + d0 + tl.arange(0, DS)).to(v_ptr.dtype.element_ty)
    full_value = tl.load(value_ptr + b * stride_valb + h * stride_valh + d, mask=whole, other=0.0)
    return (q, key, value, full_value.to(v_ptr.dtype.element_ty), tl.load(next_pos_ptr),
            tl.load(base_ptr + b * stride_base), tl.load(start_ptr + bh))


@triton.jit
def _append_token(m_run, l_run, acc, bh, gi, d0, q, key, value, full_value, next_pos, base, start, k_ptr, v_ptr,
                  owner_ptr, pos_ptr, advance_ptr, stride_kb, stride_ks, stride_vb, stride_vs, stride_ownb,
                  stride_posb, scale, ring, HKV: tl.constexpr, D: tl.constexpr):
    """Attention first, then the append, in the merge: (m, l, acc) of query head ``g0`` with the step's
    new token folded in (``_load_token``'s loads), and the token written to its ring slot
    (``triton_append.py``'s rule).

    The attention read the cache before the token's slot was written: that slot is free then (the block
    that held it was compressed at the step before, the ring being one block longer than the
    compression window) or past the ring's fill, so no slot is attended twice or stale. The program of
    query head 0 and dims 0 writes the token; the one of segment 0 also advances the cache's position
    (``advance_ptr``). No program of this launch reads that: ``next_pos`` came from the copy the
    attention kernel made of it, as programs of one launch have no order (``triton_append.py``)."""
    s = tl.sum(q.to(tl.float32) * key.to(tl.float32), 0) * scale
    m_new = tl.maximum(m_run, s)
    alpha = tl.exp(m_run - m_new)  # a segment with no live slot has m = -inf: weight 0
    p = tl.exp(s - m_new)
    acc = acc * alpha[:, None] + p[:, None] * value.to(tl.float32)[None, :]
    offset = (next_pos - base) % ring
    offset = tl.where(offset < 0, offset + ring, offset)  # torch's % floors; Triton's truncates
    slot = start.to(tl.int64) + offset
    writer = (gi == 0) & (d0 == 0)
    d = tl.arange(0, D)
    whole = d < tl.where(writer, D, 0)
    row = (bh // HKV).to(tl.int64)
    tl.store(k_ptr + row * stride_kb + slot * stride_ks + d, key, mask=whole)
    tl.store(v_ptr + row * stride_vb + slot * stride_vs + d, full_value, mask=whole)
    tl.store(owner_ptr + row * stride_ownb + slot, (bh % HKV).to(tl.int32), mask=writer)
    tl.store(pos_ptr + row * stride_posb + slot, next_pos.to(tl.int32), mask=writer)
    tl.store(advance_ptr, next_pos + 1, mask=writer & (bh == 0))
    return m_new, l_run * alpha + p, acc


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, owner_ptr, start_ptr, length_ptr, var_len_ptr, next_pos_ptr, base_ptr,
                  o_ptr, m_ptr, l_ptr, stride_qb, stride_qh, stride_kb, stride_ks, stride_vb, stride_vs,
                  stride_ownb, stride_base, scale, ring, HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                  D: tl.constexpr, SPLIT, NUM_SPLITS, BLOCK: tl.constexpr,
                  LIVE: tl.constexpr, IEEE: tl.constexpr, copy_ptr, TOKEN: tl.constexpr):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    if TOKEN:  # the merge appends the token and advances next_pos; it reads this copy (_load_token)
        tl.store(copy_ptr, tl.load(next_pos_ptr), mask=(split == 0) & (bh == 0))
    lo = split * SPLIT
    hi = tl.minimum(lo + SPLIT, tl.load(length_ptr + bh))
    if LIVE:
        # Live slots of a TCA segment: the ring's filled prefix and the packed prefix
        # (``cache.py``); the headroom after the packed tokens is never read.
        fill = tl.minimum(tl.load(next_pos_ptr) - tl.load(base_ptr + (bh // HKV) * stride_base), ring).to(tl.int32)
        packed_end = (ring + tl.load(var_len_ptr + bh)).to(tl.int32)
        lo0, hi0, lo1, hi1 = lo, tl.minimum(hi, fill), tl.maximum(lo, ring), tl.minimum(hi, packed_end)
    else:
        lo0, hi0, lo1, hi1 = lo, hi, hi, hi
    m_i, l_i, acc = _attend_runs(q_ptr, k_ptr, v_ptr, owner_ptr, tl.load(start_ptr + bh), bh, lo0, hi0, lo1, hi1,
                                 stride_qb, stride_qh, stride_kb, stride_ks, stride_vb, stride_vs, stride_ownb, scale,
                                 HKV, G, G_PAD, D, BLOCK, IEEE)
    _store_partial(o_ptr, m_ptr, l_ptr, bh * NUM_SPLITS + split, m_i, l_i, acc, G, G_PAD, D)


@triton.jit
def _stream_layout(length_ptr, var_len_ptr, next_pos_ptr, base_ptr, stride_base, ring, NSEG, P,
                   HKV: tl.constexpr, NSEG_PAD: tl.constexpr, BLOCK: tl.constexpr, LIVE: tl.constexpr):
    """Where each segment's live slots lie in the stream of all of them, segment after segment.

    Over segments ``[NSEG_PAD]``: the ring fill (the live run at offset 0; the whole segment
    when not LIVE), the live length, the first stream slot, and the first and last program
    whose share of the stream meets the segment (an empty segment goes to the program whose
    share holds its stream position: it still needs its output written); then the share,
    whole blocks. Slot counts are int32: all rows' live slots together stay below 2**31
    (their K and V alone would take 1 TiB at D = 128).
    """
    seg = tl.arange(0, NSEG_PAD)
    real = seg < NSEG
    length = tl.load(length_ptr + seg, mask=real, other=0)
    if LIVE:
        # The same live runs as ``_split_kernel`` reads, bounded by the segment.
        base = tl.load(base_ptr + (seg // HKV) * stride_base, mask=real, other=0)
        fill = tl.minimum(tl.maximum(tl.load(next_pos_ptr) - base, 0), ring).to(tl.int32)
        packed = tl.minimum(tl.load(var_len_ptr + seg, mask=real, other=0).to(tl.int32), length - ring)
        n = tl.where(real, fill + packed, 0)
    else:
        fill = length
        n = length
    begin = tl.cumsum(n, 0) - n
    share = tl.maximum(tl.cdiv(tl.cdiv(tl.sum(n, 0), P), BLOCK) * BLOCK, BLOCK)
    first = tl.where(real, tl.minimum(begin // share, P - 1), P)  # padding segments: no program
    last = tl.minimum((begin + tl.maximum(n, 1) - 1) // share, P - 1)
    return fill, n, begin, first, last, share


@triton.jit
def _pick(x, at):
    """The element of the segment vector ``x`` where ``at`` holds (one-hot)."""
    return tl.sum(tl.where(at, x, 0), 0)


@triton.jit
def _balanced_kernel(q_ptr, k_ptr, v_ptr, owner_ptr, start_ptr, length_ptr, var_len_ptr, next_pos_ptr, base_ptr,
                     o_ptr, m_ptr, l_ptr, stride_qb, stride_qh, stride_kb, stride_ks, stride_vb, stride_vs,
                     stride_ownb, stride_base, scale, ring, NSEG, P, HKV: tl.constexpr, G: tl.constexpr,
                     G_PAD: tl.constexpr, D: tl.constexpr, NSEG_PAD: tl.constexpr, BLOCK: tl.constexpr,
                     LIVE: tl.constexpr, IEEE: tl.constexpr, copy_ptr, TOKEN: tl.constexpr):
    pid = tl.program_id(0)
    if TOKEN:  # the merge appends the token and advances next_pos; it reads this copy (_load_token)
        tl.store(copy_ptr, tl.load(next_pos_ptr), mask=pid == 0)
    fill, n, begin, first, last, share = _stream_layout(length_ptr, var_len_ptr, next_pos_ptr, base_ptr,
                                                        stride_base, ring, NSEG, P, HKV, NSEG_PAD, BLOCK, LIVE)
    seg = tl.arange(0, NSEG_PAD)
    # Loaded with the layout, not per segment: the first K/V loads wait on one round trip fewer
    # (no gain above noise on the H200: BENCHMARKS.md, 2026-12-04).
    starts = tl.load(start_ptr + seg, mask=seg < NSEG, other=0)
    mine = (first <= pid) & (pid <= last)
    share_lo = pid * share
    for bh in range(tl.min(tl.where(mine, seg, NSEG_PAD), 0), tl.max(tl.where(mine, seg, -1), 0) + 1):
        at = seg == bh
        seg_fill, seg_begin = _pick(fill, at), _pick(begin, at)
        lo = tl.maximum(share_lo - seg_begin, 0)
        hi = tl.minimum(share_lo + share - seg_begin, _pick(n, at))
        # Live offsets [lo, hi) of the segment: those in the ring fill, then those of the packed
        # run at ``ring`` (without LIVE the fill is the whole segment and the second run is empty).
        m_i, l_i, acc = _attend_runs(q_ptr, k_ptr, v_ptr, owner_ptr, _pick(starts, at), bh, lo,
                                     tl.minimum(hi, seg_fill),
                                     ring + tl.maximum(lo - seg_fill, 0), ring + hi - seg_fill, stride_qb,
                                     stride_qh, stride_kb, stride_ks, stride_vb, stride_vs, stride_ownb, scale, HKV,
                                     G, G_PAD, D, BLOCK, IEEE)
        # Entry pid + bh: unique, as the programs meeting a segment are consecutive and a
        # program's segments are too (the next program starts at or after its last segment).
        _store_partial(o_ptr, m_ptr, l_ptr, pid + bh, m_i, l_i, acc, G, G_PAD, D)


@triton.jit
def _combine_kernel(o_ptr, m_ptr, l_ptr, out_ptr, lse_ptr, length_ptr, var_len_ptr, next_pos_ptr, base_ptr,
                    stride_base, stride_outb, stride_outh, ring, NUM_SPLITS, NSEG, P, HKV: tl.constexpr,
                    G: tl.constexpr, D: tl.constexpr, NSEG_PAD: tl.constexpr, BLOCK: tl.constexpr, DS: tl.constexpr,
                    CHUNK: tl.constexpr, LIVE: tl.constexpr, BALANCED: tl.constexpr, q_ptr, key_ptr, value_ptr, k_ptr,
                    v_ptr, owner_ptr, pos_ptr, start_ptr, advance_ptr, stride_qb, stride_qh, stride_keyb, stride_keyh,
                    stride_valb, stride_valh, stride_kb, stride_ks, stride_vb, stride_vs, stride_ownb, stride_posb,
                    scale, TOKEN: tl.constexpr):
    """The merge of either schedule: (row, KV head) ``bh``'s partials for query head ``gi`` and dims
    ``[d0, d0 + DS)``: ``NUM_SPLITS`` consecutive entries ("split"), or the entries of the programs
    whose share met the segment ("balanced", from ``_stream_layout``); with ``TOKEN``, the step's new
    token folded in and written (``_load_token``, ``_append_token``)."""
    bh = tl.program_id(0)
    gi = tl.program_id(1)
    d0 = tl.program_id(2) * DS
    q, key, value, full_value, next_pos, base, start = 0, 0, 0, 0, 0, 0, 0
    if TOKEN:
        q, key, value, full_value, next_pos, base, start = _load_token(
            bh, gi, d0, q_ptr, key_ptr, value_ptr, k_ptr, v_ptr, start_ptr, next_pos_ptr, base_ptr, stride_qb,
            stride_qh, stride_keyb, stride_keyh, stride_valb, stride_valh, stride_base, HKV, G, D, DS)
    first, count = bh * NUM_SPLITS, NUM_SPLITS
    if BALANCED:
        _, _, _, seg_first, seg_last, _ = _stream_layout(length_ptr, var_len_ptr, next_pos_ptr, base_ptr, stride_base,
                                                         ring, NSEG, P, HKV, NSEG_PAD, BLOCK, LIVE)
        at = tl.arange(0, NSEG_PAD) == bh
        # Entry program + segment (``_balanced_kernel``).
        first, count = _pick(seg_first, at) + bh, _pick(seg_last, at) - _pick(seg_first, at) + 1
    m_run, l_run, acc = _merge_partials(o_ptr, m_ptr, l_ptr, first, count, gi, d0, G, D, DS, CHUNK)
    if TOKEN:
        m_run, l_run, acc = _append_token(m_run, l_run, acc, bh, gi, d0, q, key, value, full_value, next_pos, base,
                                          start, k_ptr, v_ptr, owner_ptr, pos_ptr, advance_ptr, stride_kb, stride_ks,
                                          stride_vb, stride_vs, stride_ownb, stride_posb, scale, ring, HKV, D)
    _store_output(out_ptr, lse_ptr, bh, gi, d0, m_run, l_run, acc, stride_outb, stride_outh, HKV, G, DS)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``), as ``triton.next_power_of_2`` but plain
    Python: launchers call it every eager decode step, and Triton 3.9's is a constexpr function
    costing a few us a call on the host."""
    return 1 << max(n - 1, 0).bit_length()


def split_size(total_slots: int, block: int = BLOCK_N, programs: int = TARGET_PROGRAMS) -> int:
    """Slots per program: about ``programs`` programs over all segments together.

    Decode reads each kept byte once, so the kernel is bound by how many loads
    are in flight: enough programs to fill every SM several times over, each
    streaming a few blocks, whatever the heads' (very unequal) lengths.
    """
    per = max(block, -(-total_slots // programs))
    return -(-per // block) * block


def _merge_dims(d: int) -> int:
    return min(COMBINE_DIMS, d)


def _merge_options(d: int) -> dict[str, int]:
    """The merge kernels' tile: ``COMBINE_CHUNK`` partials x ``COMBINE_DIMS`` dims a program."""
    return dict(DS=_merge_dims(d), CHUNK=COMBINE_CHUNK, num_warps=COMBINE_WARPS)


def _partials(entries: int, group: int, d: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Buffers of the per-(program, segment) partial results (m, l, un-normalised output)."""
    m = torch.empty(entries * group, dtype=torch.float32, device=device)
    return {"o_ptr": torch.empty(entries * group, d, dtype=torch.float32, device=device), "m_ptr": m,
            "l_ptr": torch.empty_like(m)}


def _launch_split(attend: dict, output: dict, fold: dict, segments: int, max_segment: int, total_slots: int | None,
                  programs: int) -> None:
    group, d = attend["G"], attend["D"]
    if total_slots is None:
        total_slots = max_segment * segments
    split = split_size(total_slots, attend["BLOCK"], programs)
    num_splits = max(1, -(-max_segment // split))
    parts = _partials(segments * num_splits, group, d, attend["q_ptr"].device)
    _split_kernel[(num_splits, segments)](**attend, **parts, SPLIT=split, NUM_SPLITS=num_splits)
    _launch_combine(attend, output, fold, parts, segments, NUM_SPLITS=num_splits, NSEG=segments, P=1, NSEG_PAD=1,
                    BALANCED=False)


def _launch_balanced(attend: dict, output: dict, fold: dict, segments: int, programs: int) -> None:
    group = attend["G"]
    # Entries program + segment: at most programs + segments - 1 (see _balanced_kernel).
    parts = _partials(programs + segments - 1, group, attend["D"], attend["q_ptr"].device)
    stream = dict(NSEG=segments, P=programs, NSEG_PAD=next_pow2(segments))
    _balanced_kernel[(programs,)](**attend, **parts, **stream)
    _launch_combine(attend, output, fold, parts, segments, NUM_SPLITS=0, **stream, BALANCED=True)


def _launch_combine(attend: dict, output: dict, fold: dict, parts: dict, segments: int, **schedule: Any) -> None:
    """The merge (``_combine_kernel``): one program per (segment, query head, ``COMBINE_DIMS`` dims)."""
    layout = {name: attend[name] for name in ("length_ptr", "var_len_ptr", "base_ptr", "stride_base", "ring", "HKV",
                                              "G", "D", "BLOCK", "LIVE")}
    # With a token the merge advances next_pos, so it reads the attention kernel's copy (_load_token).
    layout["next_pos_ptr"] = attend["copy_ptr"] if fold["TOKEN"] else attend["next_pos_ptr"]
    d = attend["D"]
    _combine_kernel[(segments, attend["G"], d // _merge_dims(d))](**parts, **output, **layout, **fold, **schedule,
                                                                **_merge_options(d))


def _fold_arguments(attend: dict, token: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> dict:
    """What the merge kernel takes to fold in and append the step's token (``_load_token``, ``_append_token``)."""
    key, value, pos = token if token is not None else (attend["q_ptr"], attend["q_ptr"], attend["owner_ptr"])
    key, value = (x if x.stride(-1) == 1 else x.contiguous() for x in (key, value))  # the kernel reads rows whole
    return dict(**{name: attend[name] for name in ("q_ptr", "k_ptr", "v_ptr", "owner_ptr", "start_ptr", "stride_qb",
                                                   "stride_qh", "stride_kb", "stride_ks", "stride_vb", "stride_vs",
                                                   "stride_ownb", "scale")},
                key_ptr=key, value_ptr=value, pos_ptr=pos, advance_ptr=attend["next_pos_ptr"],
                stride_keyb=key.stride(0), stride_keyh=key.stride(1), stride_valb=value.stride(0),
                stride_valh=value.stride(1), stride_posb=pos.stride(0), TOKEN=token is not None)


def launch(q_bhd: torch.Tensor, k_bsd: torch.Tensor, v_bsd: torch.Tensor, owner_bs: torch.Tensor,
           seg_start: torch.Tensor, seg_len: torch.Tensor, max_segment: int, scale: float,
           total_slots: int | None = None, live: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
           block: int | None = None, programs: int | None = None, num_warps: int | None = None,
           num_stages: int | None = None, schedule: str | None = None,
           token: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernels of one schedule.

    Args:
        q_bhd: ``[B, H_q, D]`` (stride 1 over ``D``).
        k_bsd, v_bsd: ``[B, S, D]`` contiguous flat buffers.
        owner_bs: int32 ``[B, S]`` contiguous: KV head of each live slot, ``-1`` if free.
        seg_start, seg_len: int32 ``[B, H_kv]`` contiguous: each head's segment (slots).
        max_segment: Python int >= every ``seg_len`` (sizes the "split" grid).
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
        block, num_warps, num_stages: tuning knobs; ``None`` takes the module's
            ``BLOCK_N``, ``NUM_WARPS`` and ``NUM_STAGES``.
        programs: "split": about how many programs share the segments (sizes
            the splits; ``TARGET_PROGRAMS``); "balanced": the grid
            (``BALANCED_PROGRAMS``).
        schedule: one of ``SCHEDULES``; ``None`` takes ``SCHEDULE``.
        token: ``(key_bhd, value_bhd, pos_bs)``: the step's new token, not yet in
            the cache (``[B, H_kv, D]`` each, any strides; int32 ``[B, S]`` positions,
            stride 1 over ``S``). The attention runs over the cache as it is and
            the merge folds the token in, then writes it to its ring slot and
            advances ``next_pos``, as ``triton_append.launch`` would before the
            attention (one launch fewer a step). Needs ``live``. ``k_bsd``,
            ``v_bsd``, ``owner_bs``, ``pos_bs`` and ``next_pos`` are then updated.

    Returns:
        (``[B, H_q, D]`` output in q's dtype, float32 ``[B, H_q]`` log-sum-exp).
    """
    schedule = schedule or SCHEDULE
    check_choice("schedule", schedule, SCHEDULES)
    if token is not None and live is None:
        raise ValueError("a token to append needs the cache's live ranges (live=...): the merge writes it to the "
                         "ring slot they define")
    bsz, hq, d = q_bhd.shape
    hkv = seg_start.shape[1]
    group = hq // hkv
    # Unused pointers when the whole segment is read (LIVE=False): any valid tensor will do.
    var_len, next_pos, base, ring = live if live is not None else (seg_len, seg_len, seg_len, 0)
    attend = dict(q_ptr=q_bhd, k_ptr=k_bsd, v_ptr=v_bsd, owner_ptr=owner_bs, start_ptr=seg_start, length_ptr=seg_len,
                  var_len_ptr=var_len, next_pos_ptr=next_pos, base_ptr=base, stride_qb=q_bhd.stride(0),
                  stride_qh=q_bhd.stride(1), stride_kb=k_bsd.stride(0), stride_ks=k_bsd.stride(1),
                  stride_vb=v_bsd.stride(0), stride_vs=v_bsd.stride(1), stride_ownb=owner_bs.stride(0),
                  stride_base=base.stride(0) if live is not None and base.dim() else 0, scale=scale, ring=ring,
                  HKV=hkv, G=group, G_PAD=max(16, next_pow2(group)),  # tl.dot needs >= 16 rows
                  D=d, BLOCK=block or BLOCK_N, LIVE=live is not None, IEEE=q_bhd.dtype == torch.float32,
                  num_warps=num_warps or NUM_WARPS, num_stages=num_stages or NUM_STAGES,
                  copy_ptr=torch.empty_like(next_pos) if token is not None else next_pos, TOKEN=token is not None)
    fold = _fold_arguments(attend, token)
    out = torch.empty(bsz, hq, d, dtype=q_bhd.dtype, device=q_bhd.device)
    lse = torch.empty(bsz, hq, dtype=torch.float32, device=q_bhd.device)
    output = dict(out_ptr=out, lse_ptr=lse, stride_outb=out.stride(0), stride_outh=out.stride(1))
    if schedule == "split":
        _launch_split(attend, output, fold, bsz * hkv, max_segment, total_slots, programs or TARGET_PROGRAMS)
    else:
        # No more programs than blocks of capacity: the extra ones would only exit (and in Triton's
        # interpreter, which runs programs one by one, a small cache would pay for all 396).
        slots = total_slots if total_slots is not None else max_segment * bsz * hkv
        programs = min(programs or BALANCED_PROGRAMS, max(1, -(-slots // attend["BLOCK"])))
        _launch_balanced(attend, output, fold, bsz * hkv, programs)
    return out, lse
