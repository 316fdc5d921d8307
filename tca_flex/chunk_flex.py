"""A chunk's attention over the pruned cache with FlexAttention (``chunks.chunk_attention``'s fast twin).

A chunk of ``c`` new tokens attends to the kept past (each KV head's live
slots, gathered by ``chunks.gather_segments``) plus itself, causally. Here both
go to one FlexAttention call over ``[past | chunk]``, each padded to whole
``KERNEL_BLOCK`` tiles:

- a past tile with no live slot is skipped, one whose slots are all live is
  computed without a mask, the others read the live flags in the mask;
- chunk tiles below a query tile's diagonal are full, the diagonal one causal.

So the work follows the kept tokens, not the cache's capacity. Compiled once
for every past and chunk length (``compile.length_generic``), like the prefill.
``chunks.chunk_attention`` stays the reference it is tested against.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .compile import kernel_options_for, length_generic, with_lse
from .masks import KERNEL_BLOCK, key_positions, tiled


def _first(flags: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the True entries of ``flags [..., n]`` first (stable), padded to ``width``; and their count."""
    n = flags.shape[-1]
    order = torch.sort((~flags).to(torch.int8), dim=-1, stable=True).indices
    if width > n:
        order = torch.nn.functional.pad(order, (0, width - n))
    return order[..., :width], flags.sum(-1)


def chunk_block_indices(live_past: torch.Tensor, chunk_tiles: int, group: int) -> tuple[torch.Tensor, ...]:
    """``BlockMask.from_kv_blocks`` inputs for ``[past | chunk]``.

    Args:
        live_past: bool ``[B, H_kv, P]``, ``P`` a multiple of ``KERNEL_BLOCK``.
        chunk_tiles: query (and chunk key) tiles.
        group: query heads per KV head.

    Returns:
        ``(kv_num, kv_idx, full_num, full_idx)`` over ``H_q`` query heads.
    """
    bsz, hkv, past = live_past.shape
    n_past = past // KERNEL_BLOCK
    width = n_past + chunk_tiles
    tiles = live_past.view(bsz, hkv, n_past, KERNEL_BLOCK)
    full_past = tiles.all(-1)
    partial_past = tiles.any(-1) & ~full_past
    q_tile = torch.arange(chunk_tiles, device=live_past.device).view(1, 1, chunk_tiles, 1)
    k = torch.arange(width, device=live_past.device).view(1, 1, 1, width)

    # partial: the past's partial tiles, then the query tile's own diagonal chunk tile
    p_idx, p_num = _first(partial_past, width)
    p_num = p_num.unsqueeze(-1).unsqueeze(-1)
    kv_idx = torch.where(k < p_num, p_idx.unsqueeze(2), n_past + q_tile)
    kv_num = (p_num + 1).squeeze(-1).expand(bsz, hkv, chunk_tiles)
    # full: the past's fully live tiles, then every chunk tile before the diagonal
    f_idx, f_num = _first(full_past, width)
    f_num = f_num.unsqueeze(-1).unsqueeze(-1)
    full_idx = torch.where(k < f_num, f_idx.unsqueeze(2), n_past + (k - f_num))
    full_num = (f_num.squeeze(-1) + q_tile.view(1, 1, chunk_tiles))
    full_idx = torch.where(k < f_num + q_tile, full_idx, 0)
    kv_idx = torch.where(k < p_num + 1, kv_idx, 0)

    def to_q_heads(x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.int32).contiguous()
        return x.repeat_interleave(group, dim=1) if group > 1 else x

    return to_q_heads(kv_num), to_q_heads(kv_idx), to_q_heads(full_num), to_q_heads(full_idx)


def _chunk_mask_mod(table: torch.Tensor, group: int):
    """Over ``masks.key_positions(live, chunk)``: ``1`` a live past slot, ``0`` a free one,
    ``-(j + 1)`` chunk key ``j`` (key-major, made outside the compiled graph, as for the prefill)."""

    def mask(b, h, q_idx, kv_idx):
        v = table[kv_idx, b, h // group]
        return (v == 1) | ((v < 0) & (-1 - v <= q_idx))
    return mask


def _chunk_flex(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, table: torch.Tensor,
                kv_num: torch.Tensor, kv_idx: torch.Tensor, full_num: torch.Tensor, full_idx: torch.Tensor,
                scale: float, kernel_options) -> tuple[torch.Tensor, ...]:
    """One graph: the BlockMask and FlexAttention over ``[past | chunk]`` (all padded to tiles)."""
    group = q.shape[1] // k_all.shape[1]
    block_mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=KERNEL_BLOCK,
                                          mask_mod=_chunk_mask_mod(table, group),
                                          seq_lengths=(q.shape[2], k_all.shape[2]), compute_q_blocks=False)
    return with_lse(flex_attention, q, k_all, v_all, block_mask=block_mask, scale=scale, enable_gqa=group > 1,
                    kernel_options=kernel_options)


def compiles_chunk(q_bhcd: torch.Tensor) -> bool:
    """Whether ``flex_chunk_attention`` runs as its compiled graph: on CUDA (the cache's chunks use
    it there), outside a caller's compiled graph. Inductor's CPU FlexAttention has no log-sum-exp
    (torch 2.13), so on the CPU it runs eagerly; a function, so that a CPU test can compile the
    CUDA route with another backend and check that one graph serves every length."""
    return q_bhcd.is_cuda and not torch.compiler.is_compiling()


def flex_chunk_attention(q_bhcd: torch.Tensor, k_bhmd: torch.Tensor, v_bhmd: torch.Tensor, live_bhm: torch.Tensor,
                         k_chunk: torch.Tensor, v_chunk: torch.Tensor, scale: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunks.chunk_attention`` on FlexAttention: same arguments, same results (lse in float32).

    On CUDA with half or float32 inputs. The block indices and the key table are built
    eagerly (a few small kernels): Inductor could not split their symbolic tile counts
    (``CantSplit``, torch 2.11), and the graph then takes them as inputs.
    """
    c = q_bhcd.shape[2]
    q, live = tiled(q_bhcd), tiled(live_bhm)  # live pads with False (zero)
    k_all = torch.cat([tiled(k_bhmd), tiled(k_chunk)], dim=2)
    v_all = torch.cat([tiled(v_bhmd), tiled(v_chunk)], dim=2)
    chunk = q.shape[2]
    indices = chunk_block_indices(live, chunk // KERNEL_BLOCK, q.shape[1] // k_all.shape[1])
    args = (q, k_all, v_all, key_positions(live, chunk), *indices)
    attend = _chunk_flex
    if compiles_chunk(q_bhcd):
        attend = length_generic(_chunk_flex, (0, 2), (1, 2), (2, 2), (3, 0), (4, 2), (5, 2), (5, 3), (6, 2), (7, 2),
                                (7, 3))
    out, lse = attend(*args, scale, kernel_options_for(q_bhcd.device))
    return out[:, :, :c], lse[:, :, :c]
