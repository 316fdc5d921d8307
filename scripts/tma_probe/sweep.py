# ruff: noqa: B023, E402, E731, I001  (a one-off probe, as run on the H200; the closures run inside their iteration)
"""TMA (tensor-descriptor) loads in the balanced decode kernel vs the shipped kernel (H200 probe; removed after
the run, BENCHMARKS.md 2026-12-04 third session).

    PYTHONPATH=. python scripts/tma_probe/sweep.py
"""
import itertools
import sys
import time

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from tca_flex import bench
from tca_flex import triton_decode as td
from tca_flex.config import TCAConfig


@triton.jit
def _attend_blocks_tma(q, m_i, l_i, acc, k_desc, v_desc, own_row, row0, lo, hi, h, scale,
                       D: tl.constexpr, BLOCK: tl.constexpr):
    for n0 in range(lo, hi, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        inside = n < hi
        live = tl.load(own_row + n, mask=inside, other=-1) == h
        k = k_desc.load([row0 + n0, 0])
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - shift)
        p = tl.exp(s - shift[:, None])
        v = v_desc.load([row0 + n0, 0])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _balanced_tma(q_ptr, k_desc, v_desc, owner_ptr, start_ptr, length_ptr, var_len_ptr, next_pos_ptr, base_ptr,
                  o_ptr, m_ptr, l_ptr, stride_qb, stride_qh, S, stride_ownb, stride_base, scale, ring, NSEG, P,
                  HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                  NSEG_PAD: tl.constexpr, BLOCK: tl.constexpr, LIVE: tl.constexpr):
    pid = tl.program_id(0)
    fill, n, begin, first, last, share = td._stream_layout(length_ptr, var_len_ptr, next_pos_ptr, base_ptr,
                                                           stride_base, ring, NSEG, P, HKV, NSEG_PAD, BLOCK, LIVE)
    seg = tl.arange(0, NSEG_PAD)
    starts = tl.load(start_ptr + seg, mask=seg < NSEG, other=0)
    mine = (first <= pid) & (pid <= last)
    share_lo = pid * share
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    for bh in range(tl.min(tl.where(mine, seg, NSEG_PAD), 0), tl.max(tl.where(mine, seg, -1), 0) + 1):
        at = seg == bh
        seg_fill, seg_begin = td._pick(fill, at), td._pick(begin, at)
        lo = tl.maximum(share_lo - seg_begin, 0)
        hi = tl.minimum(share_lo + share - seg_begin, td._pick(n, at))
        b = bh // HKV
        h = bh % HKV
        q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
                    mask=g[:, None] < G, other=0.0)
        start = td._pick(starts, at)
        row0 = b * S + start
        own_row = owner_ptr + b.to(tl.int64) * stride_ownb + start
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        m_i, l_i, acc = _attend_blocks_tma(q, m_i, l_i, acc, k_desc, v_desc, own_row, row0, lo,
                                           tl.minimum(hi, seg_fill), h, scale, D, BLOCK)
        m_i, l_i, acc = _attend_blocks_tma(q, m_i, l_i, acc, k_desc, v_desc, own_row, row0,
                                           ring + tl.maximum(lo - seg_fill, 0), ring + hi - seg_fill, h, scale,
                                           D, BLOCK)
        td._store_partial(o_ptr, m_ptr, l_ptr, pid + bh, m_i, l_i, acc, G, G_PAD, D)


def make_tma_launch(layer, q, block, warps, stages, programs):
    seg = layer.segments
    k, v = layer.k_buf, layer.v_buf
    bsz, s, d = k.shape
    hq = q.shape[1]
    hkv = seg.start.shape[1]
    g = hq // hkv
    kd = TensorDescriptor.from_tensor(k.view(-1, d), [block, d])
    vd = TensorDescriptor.from_tensor(v.view(-1, d), [block, d])
    segments = bsz * hkv
    programs = min(programs, max(1, -(-seg.total_length // block)))
    parts = td._partials(programs + segments - 1, g, d, q.device)
    stream = dict(NSEG=segments, P=programs, NSEG_PAD=td.next_pow2(segments))
    out = torch.empty(bsz, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, hq, dtype=torch.float32, device=q.device)
    output = dict(out_ptr=out, lse_ptr=lse, stride_outb=out.stride(0), stride_outh=out.stride(1))
    base = layer.base
    layout = dict(length_ptr=seg.length, var_len_ptr=layer.var_len, next_pos_ptr=layer.next_pos, base_ptr=base,
                  stride_base=base.stride(0) if base.dim() else 0, ring=layer.ring, HKV=hkv, BLOCK=block, LIVE=True)

    def run():
        _balanced_tma[(programs,)](q, kd, vd, layer.owner, seg.start, **{x: layout[x] for x in (
            "length_ptr", "var_len_ptr", "next_pos_ptr", "base_ptr")}, **parts, stride_qb=q.stride(0),
            stride_qh=q.stride(1), S=s, stride_ownb=layer.owner.stride(0), stride_base=layout["stride_base"],
            scale=d ** -0.5, ring=layer.ring, **stream, HKV=hkv, G=g, G_PAD=max(16, td.next_pow2(g)), D=d,
            BLOCK=block, LIVE=True, num_warps=warps, num_stages=stages)
        td._balanced_combine_kernel[(segments, g, d // td._merge_dims(d))](
            **parts, **output, **layout, **stream, G=g, D=d, **td._merge_options(d))
        return out, lse
    return run


def main():
    device, dtype = torch.device("cuda"), torch.bfloat16
    quick = "--quick" in sys.argv
    for length in (32768, 131072):
        target = 0.39
        layer = bench.build_cache_layer(length, 32, 8, 128, bench.head_fractions(target, length, 4096, 8),
                                        TCAConfig(block_size=128, window=4096), dtype, device)
        q = torch.randn(1, 32, 128, device=device, dtype=dtype)
        seg, live = layer.segments, (layer.var_len, layer.next_pos, layer.base, layer.ring)

        def shipped():
            return td.launch(q, layer.k_buf, layer.v_buf, layer.owner, seg.start, seg.length, seg.max_length,
                             128 ** -0.5, total_slots=seg.total_length, live=live)
        ref, ref_lse = shipped()
        base_us = bench.graph_timed(shipped, device)
        print(f"L={length} shipped {base_us:.1f} us (kept {seg.total_length / 8 / length:.2f} cap)", flush=True)
        grid = itertools.product((64, 128), (4, 8), (2, 3, 4), (264, 396, 528))
        if quick:
            grid = [(64, 4, 2, 396), (128, 8, 3, 396)]
        rows = []
        for block, warps, stages, programs in grid:
            t0 = time.time()
            try:
                fn = make_tma_launch(layer, q, block, warps, stages, programs)
                out, lse = fn()
                err = (out.float() - ref.float()).abs().max().item()
                lerr = (lse - ref_lse).abs().max().item()
                us = bench.graph_timed(fn, device)
            except Exception as exc:  # noqa: BLE001
                print(f"  tma b{block} w{warps} s{stages} p{programs}: FAILED {type(exc).__name__}: {exc}"[:400],
                      flush=True)
                continue
            rows.append((us, block, warps, stages, programs))
            print(f"  tma b{block} w{warps} s{stages} p{programs}: {us:.1f} us (err {err:.2e}, lse {lerr:.2e}, "
                  f"{time.time() - t0:.1f} s)", flush=True)
        again = bench.graph_timed(shipped, device)
        rows.sort()
        print(f"L={length} shipped again {again:.1f} us; best tma {rows[:3]}", flush=True)


if __name__ == "__main__":
    main()
