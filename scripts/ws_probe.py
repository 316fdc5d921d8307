# ruff: noqa: B023, E402, E731  (a GPU probe, as run for BENCHMARKS.md; its closures run within their iteration)
"""Triton's warp specialization (Hopper: a producer warp feeding TMA loads to the consumers) in the
balanced decode kernel's packed run, against the shipped kernel (issue: decode faster end to end).

Why: the kernel streams the kept bytes at ~4.1 TB/s on the H200 against cuDNN's ~4.5 TB/s over a
full cache; the tile, stage, grid and plain-TMA sweeps left that gap (BENCHMARKS.md). A warp-
specialized loop keeps its loads in flight while the consumer warps score, which a software-
pipelined loop of two to four stages does only in part.

The variant reads the packed run (no free slot in it: tests/layout_checks.py) through host-side TMA
descriptors, without the owner load, in a ``tl.range(..., warp_specialize=WS)`` loop; the ring run
stays the shipped pointer loop; the merge is the shipped merge. Modes:

    PYTHONPATH=. python scripts/ws_probe.py            # sweep, then A/B of the best setting (GPU)
    PYTHONPATH=. python scripts/ws_probe.py --check    # outputs against the shipped kernel only
    PYTHONPATH=. python scripts/ws_probe.py --floor    # the flat probe's floor rows only

Also a "flat" rate probe: P programs each streaming an equal contiguous share of one compact
[N, D] K/V pair (no layout, no merge), pointer loads against TMA with and without warp
specialization: what rate each way of loading reaches at all.
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
def _attend_packed(q, m_i, l_i, acc, k_desc, v_desc, row0, lo, hi, scale, D: tl.constexpr, BLOCK: tl.constexpr,
                   WS: tl.constexpr):
    for n0 in tl.range(lo, hi, BLOCK, warp_specialize=WS):
        n = n0 + tl.arange(0, BLOCK)
        k = k_desc.load([row0 + n0, 0])
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where((n < hi)[None, :], s, float("-inf"))
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
def _balanced_ws(q_ptr, k_ptr, v_ptr, owner_ptr, start_ptr, length_ptr, var_len_ptr, next_pos_ptr, base_ptr,
                 o_ptr, m_ptr, l_ptr, stride_qb, stride_qh, stride_kb, stride_ks, stride_vb, stride_vs,
                 stride_ownb, stride_base, scale, ring, NSEG, P, HKV: tl.constexpr, G: tl.constexpr,
                 G_PAD: tl.constexpr, D: tl.constexpr, NSEG_PAD: tl.constexpr, BLOCK: tl.constexpr,
                 LIVE: tl.constexpr, IEEE: tl.constexpr, copy_ptr, TOKEN: tl.constexpr, k_desc, v_desc, S,
                 WS: tl.constexpr):
    pid = tl.program_id(0)
    if TOKEN:
        tl.store(copy_ptr, tl.load(next_pos_ptr), mask=pid == 0)
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
        start = td._pick(starts, at)
        q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :], mask=g[:, None] < G,
                    other=0.0)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        m_i, l_i, acc = td._attend_blocks(q, m_i, l_i, acc, k_ptr + b.to(tl.int64) * stride_kb,
                                          v_ptr + b.to(tl.int64) * stride_vb,
                                          owner_ptr + b.to(tl.int64) * stride_ownb, start, lo,
                                          tl.minimum(hi, seg_fill), h, stride_ks, stride_vs, scale, D, BLOCK, IEEE)
        m_i, l_i, acc = _attend_packed(q, m_i, l_i, acc, k_desc, v_desc, b * S + start,
                                       ring + tl.maximum(lo - seg_fill, 0), ring + hi - seg_fill, scale, D, BLOCK,
                                       WS)
        td._store_partial(o_ptr, m_ptr, l_ptr, pid + bh, m_i, l_i, acc, G, G_PAD, D)


SETTING = {"WS": False}


def _launch_balanced_ws(attend, output, fold, segments, programs):
    """``td._launch_balanced`` with ``_balanced_ws`` (patched in by ``variant``)."""
    k, v = attend["k_ptr"], attend["v_ptr"]
    bsz, s, d = k.shape
    block = attend["BLOCK"]
    parts = td._partials(programs + segments - 1, attend["G"], d, attend["q_ptr"].device)
    stream = dict(NSEG=segments, P=programs, NSEG_PAD=td.next_pow2(segments))
    kd = TensorDescriptor.from_tensor(k.view(-1, d), [block, d])
    vd = TensorDescriptor.from_tensor(v.view(-1, d), [block, d])
    _balanced_ws[(programs,)](**attend, **parts, **stream, k_desc=kd, v_desc=vd, S=s, WS=SETTING["WS"])
    td._launch_combine(attend, output, fold, parts, segments, NUM_SPLITS=0, **stream, BALANCED=True)


SHIPPED = td._launch_balanced


def variant(ws: bool | None):
    """Select the launcher: ``None`` the shipped one, else the TMA packed run with or without WS."""
    if ws is None:
        td._launch_balanced = SHIPPED
    else:
        SETTING["WS"] = ws
        td._launch_balanced = _launch_balanced_ws


@triton.jit
def _flat(q_ptr, k_ptr, v_ptr, k_desc, v_desc, o_ptr, share, N, G_PAD: tl.constexpr, D: tl.constexpr,
          BLOCK: tl.constexpr, MODE: tl.constexpr):
    """One program's equal share of a compact K/V pair: 0 pointer loads, 1 TMA, 2 TMA + WS; 3 pointer
    loads summed, no scores (the load path's own rate)."""
    pid = tl.program_id(0)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + g[:, None] * D + d[None, :])
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    lo = pid * share
    hi = tl.minimum(lo + share, N)
    for n0 in tl.range(lo, hi, BLOCK, warp_specialize=MODE == 2):
        n = n0 + tl.arange(0, BLOCK)
        if MODE == 3:
            k = tl.load(k_ptr + n.to(tl.int64)[:, None] * D + d[None, :])
            v = tl.load(v_ptr + n.to(tl.int64)[:, None] * D + d[None, :])
            acc += tl.sum((k + v).to(tl.float32), 0)[None, :]
            l_i = tl.full([G_PAD], 1.0, tl.float32)
        else:
            if MODE == 0:
                k = tl.load(k_ptr + n.to(tl.int64)[:, None] * D + d[None, :])
            else:
                k = k_desc.load([n0, 0])
            s = tl.dot(q, tl.trans(k))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            if MODE == 0:
                v = tl.load(v_ptr + n.to(tl.int64)[:, None] * D + d[None, :])
            else:
                v = v_desc.load([n0, 0])
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
    tl.store(o_ptr + pid * G_PAD * D + g[:, None] * D + d[None, :], acc / l_i[:, None])


def flat_probe(device, dtype, n_tokens: int, floor: bool = False) -> None:
    """Rate of each load mode over ``n_tokens`` K/V rows (D = 128), swept over tile and grid; ``floor``:
    pointer loads with and without scores at the shipped tile, and cuDNN's SDPA over the same rows as
    8 KV heads of 4 query heads each."""
    d = 128
    k, v = (torch.randn(n_tokens, d, device=device, dtype=dtype) for _ in range(2))
    q = torch.randn(16, d, device=device, dtype=dtype) * 0.1
    mb = 2 * k.numel() * k.element_size() / 1e6
    print(f"flat: {n_tokens} rows x 2, {mb:.0f} MB", flush=True)
    if floor:
        qs = torch.randn(1, 32, 1, d, device=device, dtype=dtype)
        ks, vs = (x.view(1, 8, n_tokens // 8, d) for x in (k, v))
        us = bench.graph_timed(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True),
                               device)
        print(f"  SDPA (default backend), 8 KV heads x {n_tokens // 8}: {us:.1f} us {mb / us:.2f} TB/s", flush=True)
        us = bench.graph_timed(lambda: k.add(v), device)
        print(f"  k + v (torch, reads both, writes one): {us:.1f} us {1.5 * mb / us:.2f} TB/s", flush=True)
    grid = itertools.product((64, 128), (4, 8), (2, 3, 4), (264, 396), (0, 1, 2))
    if floor:
        grid = itertools.product((64,), (4,), (2, 3), (264, 396, 528, 792), (0, 3))
    for block, warps, stages, programs, mode in grid:
        share = -(-n_tokens // programs // block) * block
        grid = -(-n_tokens // share)
        kd = TensorDescriptor.from_tensor(k, [block, d])
        vd = TensorDescriptor.from_tensor(v, [block, d])
        o = torch.empty(grid, 16, d, device=device, dtype=torch.float32)
        fn = lambda: _flat[(grid,)](q, k, v, kd, vd, o, share, n_tokens, G_PAD=16, D=d, BLOCK=block, MODE=mode,
                                    num_warps=warps, num_stages=stages)
        try:
            us = bench.graph_timed(fn, device)
        except Exception as exc:  # noqa: BLE001
            print(f"  b{block} w{warps} s{stages} p{programs} mode{mode}: FAILED {type(exc).__name__}: "
                  f"{str(exc)[:200]}", flush=True)
            continue
        print(f"  b{block} w{warps} s{stages} p{grid} mode{mode}: {us:.1f} us {mb / us:.2f} TB/s", flush=True)


def layers(device, dtype):
    for length in (32768, 131072) if device.type == "cuda" else (8192,):
        layer = bench.build_cache_layer(length, 32, 8, 128, bench.head_fractions(0.39, length, 4096, 8),
                                        TCAConfig(block_size=128, window=4096), dtype, device)
        q = torch.randn(1, 32, 128, device=device, dtype=dtype)
        seg, live = layer.segments, (layer.var_len, layer.next_pos, layer.base, layer.ring)
        call = lambda layer=layer, q=q, seg=seg, live=live, **kw: td.launch(
            q, layer.k_buf, layer.v_buf, layer.owner, seg.start, seg.length, seg.max_length, 128 ** -0.5,
            total_slots=seg.total_length, live=live, schedule="balanced", **kw)
        yield length, call


def check(device, dtype) -> None:
    for length, call in layers(device, dtype):
        variant(None)
        ref, ref_lse = call()
        for ws in (False, True):
            variant(ws)
            try:
                out, lse = call()
            except Exception as exc:  # noqa: BLE001
                print(f"L={length} ws={ws}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            print(f"L={length} ws={ws}: max |out - shipped| {(out.float() - ref.float()).abs().max().item():.2e}, "
                  f"lse {(lse - ref_lse).abs().max().item():.2e}", flush=True)
        variant(None)


def sweep(device, dtype) -> None:
    """Sweep at the longest length, then A/B of its best setting at every length."""
    best = None
    for length, call in list(layers(device, dtype))[-1:]:
        variant(None)
        ref, _ = call()
        base = bench.graph_timed(call, device)
        print(f"L={length} shipped {base:.1f} us", flush=True)
        rows = []
        for block, warps, stages, programs, ws in itertools.product((64, 128), (4, 8), (2, 3), (264, 396),
                                                                    (False, True)):
            variant(ws)
            kw = dict(block=block, num_warps=warps, num_stages=stages, programs=programs)
            t0 = time.time()
            try:
                out, _ = call(**kw)
                err = (out.float() - ref.float()).abs().max().item()
                us = bench.graph_timed(lambda: call(**kw), device)
            except Exception as exc:  # noqa: BLE001
                print(f"  b{block} w{warps} s{stages} p{programs} ws={ws}: FAILED {type(exc).__name__}: "
                      f"{str(exc)[:200]}", flush=True)
                continue
            rows.append((us, kw, ws))
            print(f"  b{block} w{warps} s{stages} p{programs} ws={ws}: {us:.1f} us (err {err:.1e}, "
                  f"{time.time() - t0:.1f} s)", flush=True)
        variant(None)
        rows.sort(key=lambda r: r[0])
        print(f"L={length} shipped again {bench.graph_timed(call, device):.1f} us; best {rows[:3]}", flush=True)
        best = rows[0] if rows else None
    if best is None:
        return
    # A/B: shipped against the best variant, alternated five times.
    for length, call in layers(device, dtype):
        _, kw, ws = best
        a, b = [], []
        for _ in range(5):
            variant(None)
            a.append(bench.graph_timed(call, device))
            variant(ws)
            b.append(bench.graph_timed(lambda: call(**kw), device))
        variant(None)
        print(f"A/B L={length} shipped {[round(x, 1) for x in a]} variant {kw} ws={ws} {[round(x, 1) for x in b]} "
              f"medians {sorted(a)[2]:.1f} / {sorted(b)[2]:.1f} us", flush=True)


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    if "--floor" in sys.argv:
        flat_probe(device, dtype, 51200 * 8, floor=True)
        return
    check(device, dtype)
    if "--check" in sys.argv:
        return
    sweep(device, dtype)
    flat_probe(device, dtype, 51200 * 8)


if __name__ == "__main__":
    main()
