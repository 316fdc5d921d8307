"""Triton kernel: the decode step's append of the new token to the TCA cache, in one launch.

The rule (the reference is the plain tensor form ``decode.append_token_math``,
which ``TCACacheLayer._append`` runs where this kernel does not): the new key
and value of every (row, KV head) go to the head's ring slot ``seg_start +
(next_pos - base[row]) % ring``, which is then owned by that head and holds
position ``next_pos``; ``next_pos`` then advances by one.

Why a kernel: the tensor form is a handful of tiny ops (slot arithmetic, four
scatters, the increment), each one kernel in a captured CUDA graph or a
compiled step, for a few KB of writes: a good part of the ~19 us per layer
that a whole decode step cost on an H200 beyond its attention and idle
compression (``BENCHMARKS.md``, 128K: 95.5 us against 73.3 + 3.2 us). Here it
is one launch.

Why one program: every (row, head) reads ``next_pos`` and the same launch
advances it. Programs of one launch have no order, so with one program per
(row, head) the one that advances it could finish before another has read it,
which would then write to the next slot. One program walks every (row, head)
in tiles (one tile up to 4096 elements, e.g. 32 rows of head dim 128), reads
``next_pos`` once before any of them, and writes ``next_pos + 1`` last, behind
a barrier of all its threads (``__syncthreads``, which also orders their memory
accesses): every read of the old value is done by then, in whichever warp. A
decode step writes a few KB, so one program costs little; batches past one
tile (more than 32 (row, KV head) pairs at head dim 128) loop, one tile after
the other.

Without a GPU the tests run this kernel in Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_decode import next_pow2

NUM_WARPS = 4
TILE_ELEMENTS = 4096  # (row, head) pairs per tile times the padded head dim


@triton.jit
def _append_kernel(key_ptr, value_ptr, k_ptr, v_ptr, owner_ptr, pos_ptr, start_ptr, next_pos_ptr, base_ptr,
                   stride_keyb, stride_keyh, stride_keyd, stride_valb, stride_valh, stride_vald, stride_kb,
                   stride_ks, stride_vb, stride_vs, stride_ownb, stride_posb, stride_startb, stride_starth,
                   stride_base, pairs, ring, HKV: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                   ROWS: tl.constexpr):
    next_pos = tl.load(next_pos_ptr)
    d = tl.arange(0, D_PAD)
    in_d = d < D
    for first in range(0, pairs, ROWS):
        bh = first + tl.arange(0, ROWS)
        live = bh < pairs
        b = (bh // HKV).to(tl.int64)
        h = bh % HKV
        base = tl.load(base_ptr + b * stride_base, mask=live, other=0)  # per row, or one for all (stride 0)
        offset = (next_pos - base) % ring
        offset = tl.where(offset < 0, offset + ring, offset)  # torch's % floors; Triton's truncates
        slot = tl.load(start_ptr + b * stride_startb + h * stride_starth, mask=live, other=0) + offset
        both = live[:, None] & in_d[None, :]
        key = tl.load(key_ptr + b[:, None] * stride_keyb + h[:, None] * stride_keyh + d[None, :] * stride_keyd,
                      mask=both)
        tl.store(k_ptr + b[:, None] * stride_kb + slot[:, None] * stride_ks + d[None, :],
                 key.to(k_ptr.dtype.element_ty), mask=both)
        value = tl.load(value_ptr + b[:, None] * stride_valb + h[:, None] * stride_valh + d[None, :] * stride_vald,
                        mask=both)
        tl.store(v_ptr + b[:, None] * stride_vb + slot[:, None] * stride_vs + d[None, :],
                 value.to(v_ptr.dtype.element_ty), mask=both)
        tl.store(owner_ptr + b * stride_ownb + slot, h.to(tl.int32), mask=live)
        tl.store(pos_ptr + b * stride_posb + slot, tl.zeros([ROWS], tl.int32) + next_pos.to(tl.int32), mask=live)
    # All threads of the program have read next_pos above (and used it); only then is it advanced.
    tl.debug_barrier()
    tl.store(next_pos_ptr, next_pos + 1)


def launch(key_bhd: torch.Tensor, value_bhd: torch.Tensor, k_bsd: torch.Tensor, v_bsd: torch.Tensor,
           owner_bs: torch.Tensor, pos_bs: torch.Tensor, seg_start: torch.Tensor, next_pos: torch.Tensor,
           base: torch.Tensor, *, ring: int, num_warps: int | None = None) -> None:
    """Write the new token of every (row, KV head) into its ring slot and advance ``next_pos``, in place.

    Args:
        key_bhd, value_bhd: ``[B, H_kv, D]`` the new token's key and value
            (any strides; cast to the buffers' dtype).
        k_bsd, v_bsd: ``[B, S, D]`` flat buffers, stride 1 over ``D`` (updated in place).
        owner_bs, pos_bs: int32 ``[B, S]``, stride 1 over ``S`` (updated in place).
        seg_start: int64 ``[B, H_kv]``: each head's first slot.
        next_pos: int64 0-d: the new token's position (advanced by one).
        base: int64 ``[B]`` (or 0-d, shared by every row): each row's first ring position.
        ring: ring slots per head (window + block).
    """
    bsz, hkv, d = key_bhd.shape
    d_pad = next_pow2(d)
    rows = min(next_pow2(bsz * hkv), max(1, TILE_ELEMENTS // d_pad))
    _append_kernel[(1,)](
        key_bhd, value_bhd, k_bsd, v_bsd, owner_bs, pos_bs, seg_start, next_pos, base,
        key_bhd.stride(0), key_bhd.stride(1), key_bhd.stride(2), value_bhd.stride(0), value_bhd.stride(1),
        value_bhd.stride(2), k_bsd.stride(0), k_bsd.stride(1), v_bsd.stride(0), v_bsd.stride(1), owner_bs.stride(0),
        pos_bs.stride(0), seg_start.stride(0), seg_start.stride(1), base.stride(0) if base.dim() else 0,
        bsz * hkv, ring, HKV=hkv, D=d, D_PAD=d_pad, ROWS=rows, num_warps=num_warps or NUM_WARPS)
