"""Triton kernel: the decode step's block compression of the TCA cache, in one launch.

The rule (docs/method.md, section 5; the reference is the plain tensor form
``TCACacheLayer.compress`` in ``cache.py``): when a whole block of ``b`` tokens
has left the exact window, each KV head keeps the block's top-``t`` tokens by
the attention the current query gave them (probabilities under the step's
log-sum-exp, mean or max over the head's ``g`` query heads; ties keep the
older token), moved to the end of its packed
region; the block's ring slots are freed.

Why a kernel: a block leaves once every ``b`` steps, but a CUDA graph (or a
compiled step) replays one fixed list of kernels, so the tensor form ran its
~40 small ops on every step (~150 us per layer on an H200, ``BENCHMARKS.md``).
Here one program per (row, KV head) reads two scalars and exits on the
``b - 1`` steps where no block leaves; on the others it scores the block with
one ``tl.dot``, ranks it and moves the kept tokens itself.

When a block leaves is derived from ``next_pos`` and ``base``, not read from
``ncs`` (the first position not yet compressed): all programs would read
``ncs`` while one of them advances it, a race across programs of one launch.
One token per step (and whole chunks, which compress every block they pass)
keep ``ncs == next_pos - window - b`` at every step where a block leaves, so
the two agree; each row's program of head 0 still writes the row's ``ncs``
for the tensor form and the host. ``base`` and ``ncs`` are per row: the rows
of a left-padded batch each follow their own window (``cache.py``). A second
call at the same position finds the block's first ring slot already freed and
does nothing, as the tensor form does.

Without a GPU the tests run this kernel in Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_decode import next_pow2

NUM_WARPS = 4


@triton.jit
def _compress_kernel(q_ptr, lse_ptr, k_ptr, v_ptr, owner_ptr, pos_ptr, start_ptr, var_len_ptr, keep_ptr,
                     ncs_ptr, next_pos_ptr, base_ptr, stride_qb, stride_qh, stride_lseb, stride_kb, stride_ks,
                     stride_vb, stride_vs, stride_ownb, stride_posb, stride_ncs, stride_base, scale, window, ring,
                     HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                     BLOCK: tl.constexpr, B_PAD: tl.constexpr, USE_MAX: tl.constexpr, IEEE: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    next_pos = tl.load(next_pos_ptr)
    base = tl.load(base_ptr + b * stride_base)  # per row: the rows of a padded batch have their own windows
    past_window = next_pos - base - window  # tokens that have left the window since the prefill
    if (past_window > 0) & (past_window % BLOCK == 0):
        first = next_pos - window - BLOCK  # position of the leaving block's first token
        i = tl.arange(0, B_PAD)
        in_block = i < BLOCK
        seg = tl.load(start_ptr + bh).to(tl.int64)
        ring_slot = seg + (first - base + i) % ring
        own_row = owner_ptr + b.to(tl.int64) * stride_ownb
        # A block already compressed at this position has a freed first slot: do nothing.
        if tl.load(own_row + seg + (first - base) % ring) == h:
            d = tl.arange(0, D)
            g = tl.arange(0, G_PAD)
            real = g < G
            k_row = k_ptr + b.to(tl.int64) * stride_kb
            v_row = v_ptr + b.to(tl.int64) * stride_vb
            pos_row = pos_ptr + b.to(tl.int64) * stride_posb
            q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :], mask=real[:, None],
                        other=0.0)
            k = tl.load(k_row + ring_slot[:, None] * stride_ks + d[None, :], mask=in_block[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            lse = tl.load(lse_ptr + b * stride_lseb + h * G + g, mask=real, other=0.0)
            probs = tl.exp(s * scale - lse[:, None])
            probs = tl.where(real[:, None] & in_block[None, :], probs, 0.0)
            if USE_MAX:
                importance = tl.max(probs, 0)
            else:
                importance = tl.sum(probs, 0) / G
            # rank_i = #tokens ahead of i: more important, or as important and older.
            imp_i = importance[:, None]
            imp_j = importance[None, :]
            ahead = (imp_j > imp_i) | ((imp_j == imp_i) & (i[None, :] < i[:, None]))
            rank = tl.sum((ahead & in_block[None, :]).to(tl.int32), 1)
            t = tl.load(keep_ptr + h)
            kept = (rank < t) & in_block
            var_len = tl.load(var_len_ptr + bh)
            dst = seg + ring + var_len + tl.cumsum(kept.to(tl.int64), 0) - 1
            tl.store(k_row + dst[:, None] * stride_ks + d[None, :], k, mask=kept[:, None])
            v = tl.load(v_row + ring_slot[:, None] * stride_vs + d[None, :], mask=kept[:, None], other=0.0)
            tl.store(v_row + dst[:, None] * stride_vs + d[None, :], v, mask=kept[:, None])
            tl.store(pos_row + dst, tl.load(pos_row + ring_slot, mask=kept, other=0), mask=kept)
            tl.store(own_row + ring_slot, tl.full([B_PAD], -1, tl.int32), mask=in_block)
            tl.store(own_row + dst, tl.zeros([B_PAD], tl.int32) + h, mask=kept)
            tl.store(var_len_ptr + bh, var_len + t)
        if h == 0:
            tl.store(ncs_ptr + b * stride_ncs, first + BLOCK)


def launch(q_bhd: torch.Tensor, lse_bh: torch.Tensor, k_bsd: torch.Tensor, v_bsd: torch.Tensor,
           owner_bs: torch.Tensor, pos_bs: torch.Tensor, seg_start: torch.Tensor, var_len: torch.Tensor,
           keep_h: torch.Tensor, ncs: torch.Tensor, next_pos: torch.Tensor, base: torch.Tensor, *, window: int,
           block: int, ring: int, scale: float, use_max: bool = False, num_warps: int | None = None) -> None:
    """Compress the leaving block in place, if one leaves at this step (else the programs exit at once).

    Args:
        q_bhd: ``[B, H_q, D]`` the step's queries (stride 1 over ``D``);
            query head ``h`` belongs to KV head ``h // (H_q // H_kv)``.
        lse_bh: float32 ``[B, H_q]`` contiguous: log-sum-exp of each query
            head's scores over the kept set (from the decode attention).
        k_bsd, v_bsd: ``[B, S, D]`` contiguous flat buffers (updated in place).
        owner_bs, pos_bs: int32 ``[B, S]`` contiguous (updated in place).
        seg_start: int64 ``[B, H_kv]`` contiguous: each head's first slot.
        var_len: int64 ``[B, H_kv]`` contiguous: tokens in each packed region
            (advanced by ``t`` where a block is compressed).
        keep_h: int64 ``[H_kv]``: ``t`` per head, ``0 <= t <= block``.
        ncs, base: int64 ``[B]`` (or 0-d, shared by every row): first position
            not yet compressed (written) and first ring position (read), per
            row; next_pos: int64 0-d, the next position to decode (read).
        window, block, ring: the cache's window, block size and ring slots.
        scale: softmax scale.
        use_max: aggregate query heads by max instead of mean.
    """
    bsz, hq, d = q_bhd.shape
    hkv = seg_start.shape[1]
    group = hq // hkv
    _compress_kernel[(bsz * hkv,)](
        q_bhd, lse_bh, k_bsd, v_bsd, owner_bs, pos_bs, seg_start, var_len, keep_h, ncs, next_pos, base,
        q_bhd.stride(0), q_bhd.stride(1), lse_bh.stride(0), k_bsd.stride(0), k_bsd.stride(1), v_bsd.stride(0),
        v_bsd.stride(1), owner_bs.stride(0), pos_bs.stride(0), ncs.stride(0) if ncs.dim() else 0,
        base.stride(0) if base.dim() else 0, scale, window, ring,
        HKV=hkv, G=group, G_PAD=max(16, next_pow2(group)), D=d, BLOCK=block,
        B_PAD=max(16, next_pow2(block)), USE_MAX=use_max, IEEE=q_bhd.dtype == torch.float32,
        num_warps=num_warps or NUM_WARPS)
