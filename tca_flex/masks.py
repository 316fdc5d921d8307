"""Selection -> FlexAttention inputs for TCA prefill.

Layout (chosen by measurement, docs/method.md, section 3): per-block top-t leaves
almost every 128-key block of the original key order partly used, so a
BlockMask over the original order skips almost nothing and runs slower than
dense. Instead each KV head's kept keys are gathered, in position order, into
a packed prefix placed ahead of the full keys:

    kv index:  [0, capacity)            packed global keys (per KV head)
               [capacity, capacity + L)  the original keys, used as local window

Query ``i`` sees packed key ``p`` when ``pos(p) <= i - w`` (older than its
window, so nothing is counted twice) and original key ``j`` when
``i - w < j <= i``. Because packed keys are sorted by position, the visible
packed keys of a query block are a prefix: the computed blocks scale with the
number of kept tokens. The BlockMask is built from block indices directly
(``BlockMask.from_kv_blocks``), never by evaluating the mask on ``L x L``.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

KERNEL_BLOCK = 128


def whole_tiles(n):
    """``n`` rounded up to a multiple of ``KERNEL_BLOCK`` (an int or a symbolic size)."""
    return -(-n // KERNEL_BLOCK) * KERNEL_BLOCK


def tiled(t: torch.Tensor, padded: int | None = None, split: bool = False) -> torch.Tensor:
    """``t`` zero-padded along dim 2 to ``padded`` (default: the next whole tile), contiguous; split
    into tiles there if ``split``.

    Contiguous always: the compiled graph guards on strides, and a model's
    transposed projections or a padded copy must not give two graphs. Split,
    a symbolic length is visibly a multiple of the tile, so FlexAttention's
    Triton kernel keeps its unmasked loads.
    """
    if padded is None:
        padded = whole_tiles(t.shape[2])
    if t.shape[2] != padded:
        t = torch.nn.functional.pad(t, (0, 0) * (t.dim() - 3) + (0, padded - t.shape[2]))
    t = t.contiguous()
    return t.unflatten(2, (-1, KERNEL_BLOCK)) if split else t


def key_positions(positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Each key's position in the packed layout, int32 ``[capacity + L, B, H_kv]``.

    Packed keys hold their position (``PAD_POSITION`` past a head's count),
    local key ``j`` holds ``-(j + 1)``: the sign tells the two parts apart, so
    the mask never compares ``kv_idx`` with the capacity. Key-major with static
    strides: FlexAttention's FLASH (CuTe-DSL) lowering cannot index with a
    symbolic size, which a length-generic graph's capacity is (torch 2.11).
    """
    bsz, hkv, _ = positions.shape
    local = -1 - torch.arange(seq_len, device=positions.device, dtype=torch.int32)
    table = torch.cat([positions.to(torch.int32), local.expand(bsz, hkv, seq_len)], dim=-1)
    return table.permute(2, 0, 1).contiguous()


def tca_mask_mod(positions: torch.Tensor, seq_len: int, window: int, group: int):
    """mask_mod of the packed layout (``table_mask_mod`` over ``key_positions``).

    Args:
        positions: int64 ``[B, H_kv, capacity]`` from ``Selection``.
        seq_len: ``L``, the queries and the original (local) keys.
        window: local window ``w``.
        group: query heads per KV head (``h`` in a mask_mod is a query head).
    """
    return table_mask_mod(key_positions(positions, seq_len), window, group)


def table_mask_mod(table: torch.Tensor, window: int, group: int):
    """The packed mask read from a ``key_positions`` table: compares, ``&`` and ``|`` only, which
    every FlexAttention backend lowers (FLASH has no min/max and no symbolic index, torch 2.11).

    Inside a compiled graph the table must be a graph input: Inductor inlines a table computed
    in the graph into the mask's loads, which no lowering could generate (CUDA: torch 2.11;
    CPU: torch 2.13).
    """

    def tca_prefill_mask(b, h, q_idx, kv_idx):
        p = table[kv_idx, b, h // group]
        packed_ok = (p >= 0) & (p <= q_idx - window)
        j = -1 - p
        local_ok = (p < 0) & (j <= q_idx) & (j > q_idx - window)
        return packed_ok | local_ok

    return tca_prefill_mask


def capacity_mask_mod(positions: torch.Tensor, window: int, group: int):
    """The packed mask split at the capacity, for a BlockMask built inside a caller's compiled
    graph, where no table can enter as an input (``table_mask_mod``); the shipped path, an opaque
    custom op, always passes the table."""
    capacity = positions.shape[-1]

    def tca_prefill_mask(b, h, q_idx, kv_idx):
        in_packed = kv_idx < capacity
        pos = positions[b, h // group, torch.where(in_packed, kv_idx, 0)]
        j = kv_idx - capacity
        return torch.where(in_packed, pos <= q_idx - window, (j <= q_idx) & (j > q_idx - window))

    return tca_prefill_mask


def _segments_to_indices(starts: list[torch.Tensor], lengths: list[torch.Tensor], width: int) -> torch.Tensor:
    """Concatenate contiguous index ranges per row into ``[..., width]`` int32.

    Entries past the total length are filler (index 0) that the kernel never
    reads, because ``kv_num_blocks`` stops before them.
    """
    k = torch.arange(width, device=starts[0].device)
    out = torch.zeros((*starts[0].shape, width), dtype=torch.long, device=starts[0].device)
    offset = torch.zeros_like(lengths[0])
    for start, length in zip(starts, lengths, strict=True):
        rel = k - offset.unsqueeze(-1)
        inside = (rel >= 0) & (rel < length.unsqueeze(-1))
        out = torch.where(inside, start.unsqueeze(-1) + rel, out)
        offset = offset + length
    return out.to(torch.int32)


def tca_block_mask(positions: torch.Tensor, seq_len: int, window: int, num_q_heads: int,
                   block: int = KERNEL_BLOCK) -> BlockMask:
    """BlockMask of the packed layout, built from block indices.

    Args:
        positions: int64 ``[B, H_kv, capacity]`` sorted kept positions, padded
            with ``PAD_POSITION``; ``capacity`` a multiple of ``block``.
        seq_len: ``L`` (queries and original keys).
        window: ``w``.
        num_q_heads: ``H_q``; the mask carries one row per query head.
        block: the kernel tile (queries and keys).

    Returns:
        A BlockMask over ``Q_LEN = L`` and ``KV_LEN = capacity + L``.
    """
    return packed_block_mask(positions, tca_block_indices(positions, seq_len, window, num_q_heads, block),
                             seq_len, window, num_q_heads, block)


def packed_block_mask(positions: torch.Tensor, indices: tuple[torch.Tensor, ...], seq_len: int, window: int,
                      num_q_heads: int, block: int = KERNEL_BLOCK, table: torch.Tensor | None = None) -> BlockMask:
    """Wrap ``tca_block_indices``' output and the packed mask_mod into a BlockMask: over
    ``table`` (``key_positions``, made outside the compiled graph) when given, else split at
    the capacity (``capacity_mask_mod``)."""
    hkv, capacity = positions.shape[1], positions.shape[2]
    group = num_q_heads // hkv
    mask_mod = (table_mask_mod(table, window, group) if table is not None
                else capacity_mask_mod(positions, window, group))
    return BlockMask.from_kv_blocks(
        *indices,
        BLOCK_SIZE=block,
        mask_mod=mask_mod,
        seq_lengths=(seq_len, capacity + seq_len),
        compute_q_blocks=False,
    )


def tca_block_indices(positions: torch.Tensor, seq_len: int, window: int, num_q_heads: int,
                      block: int = KERNEL_BLOCK) -> tuple[torch.Tensor, ...]:
    """Block indices of the packed layout: ``(kv_num, kv_idx, full_num, full_idx)``.

    Shapes ``[B, H_q, n_q]`` (int32 counts) and ``[B, H_q, n_q, n_kv]`` (int32
    indices), as ``BlockMask.from_kv_blocks`` takes them; arguments as in
    ``tca_block_mask``. Pure tensor code, so it can be compiled on its own.
    """
    bsz, hkv, capacity = positions.shape
    if capacity % block:
        raise ValueError(f"packed capacity {capacity} must be a multiple of the kernel block {block}")
    group = num_q_heads // hkv
    device = positions.device
    n_q = -(-seq_len // block)
    n_packed = capacity // block
    n_local = n_q
    q0 = torch.arange(n_q, device=device) * block
    q1 = torch.clamp(q0 + block - 1, max=seq_len - 1)

    # Packed part: keys visible to every query of the tile form a full prefix,
    # keys visible to some query end at ceil(hi / block).
    lo = count_at_most(positions, (q0 - window).expand(bsz, hkv, n_q).contiguous())
    hi = count_at_most(positions, (q1 - window).expand(bsz, hkv, n_q).contiguous())
    g_full = lo // block
    g_any = -(-hi // block)

    # Local part, the same for every head: block c is visible to some query
    # when c*B <= q1 and c*B + B - 1 > q0 - w; to every query when
    # c*B + B - 1 <= q0 and c*B > q1 - w.
    c_lo = torch.clamp(torch.div(q0 - window + 1, block, rounding_mode="floor"), min=0)
    c_hi = torch.div(q1, block, rounding_mode="floor")
    f_lo = torch.clamp(-torch.div(-(q1 - window + 1), block, rounding_mode="floor"), min=0)
    f_lo = torch.maximum(f_lo, c_lo)
    f_hi = torch.div(q0 + 1, block, rounding_mode="floor") - 1
    empty = f_hi < f_lo
    f_lo = torch.where(empty, c_hi + 1, f_lo)
    f_hi = torch.where(empty, c_hi, f_hi)

    def per_head(x: torch.Tensor) -> torch.Tensor:
        return x.expand(bsz, hkv, n_q)

    zero = torch.zeros_like(g_full)
    partial_starts = [g_full, per_head(n_packed + c_lo), per_head(n_packed + f_hi + 1)]
    partial_lengths = [g_any - g_full, per_head(f_lo - c_lo), per_head(c_hi - f_hi)]
    full_starts = [zero, per_head(n_packed + f_lo)]
    full_lengths = [g_full, per_head(f_hi - f_lo + 1)]

    # FlexAttention's CPU lowering wants index rows as wide as the KV length
    # in blocks, although at most a few partial blocks per row are used.
    width = n_packed + n_local
    kv_idx = _segments_to_indices(partial_starts, partial_lengths, width)
    kv_num = sum(partial_lengths).to(torch.int32)
    full_idx = _segments_to_indices(full_starts, full_lengths, width)
    full_num = sum(full_lengths).to(torch.int32)

    def to_q_heads(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(group, dim=1) if group > 1 else x

    return to_q_heads(kv_num), to_q_heads(kv_idx), to_q_heads(full_num), to_q_heads(full_idx)


def count_at_most(sorted_rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``torch.searchsorted(sorted_rows, values, right=True)``: per row, how many entries are <= each value.

    A single value per row (a prefill of one query tile) is counted by comparison instead: there
    Inductor (torch 2.11, Triton 3.6, CUDA) folds the values to one scalar and fails to compile its
    searchsorted loop ("Loop-carried variable low ... re-assigned", BENCHMARKS.md 2026-12-05).
    """
    if values.shape[-1] == 1:
        return (sorted_rows <= values).sum(-1, keepdim=True)
    return torch.searchsorted(sorted_rows, values, right=True)


def causal_mask_mod(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def causal_block_mask(seq_len: int, device: torch.device, block: int = KERNEL_BLOCK) -> BlockMask:
    """Causal BlockMask over ``[seq_len, seq_len]`` from block indices (head dim 1)."""
    n = -(-seq_len // block)
    rows = torch.arange(n, device=device)
    cols = torch.arange(n, device=device)
    partial_num = torch.ones(1, 1, n, dtype=torch.int32, device=device)
    partial_idx = rows.view(1, 1, n, 1).expand(1, 1, n, n).to(torch.int32).contiguous()
    full_num = rows.to(torch.int32).view(1, 1, n)
    full_idx = cols.view(1, 1, 1, n).expand(1, 1, n, n).to(torch.int32).contiguous()
    return BlockMask.from_kv_blocks(partial_num, partial_idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=causal_mask_mod, seq_lengths=(seq_len, seq_len),
                                    compute_q_blocks=False)
