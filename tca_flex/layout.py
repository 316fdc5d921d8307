"""Segment layout of the head-packed TCA cache: pure Python-int arithmetic.

Every batch row of the flat buffer ``[B, S, D]`` holds one segment per KV
head: ``ring`` slots (exact window + the block about to leave it) followed by
``var_cap`` packed slots (global subset, compressed blocks, headroom).

Sizes are Python ints, not tensors: what a head holds is known without
reading the device (the prefill's counts, then ``t`` per compressed block,
and blocks are compressed at known positions). Growing therefore never syncs
with the device and traces under ``torch.compile`` like any other step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NEVER = 1 << 62
SLOT_ALIGN = 16

Table = tuple[tuple[int, ...], ...]  # [B][H_kv]


@dataclass(frozen=True)
class Layout:
    """Packed capacities and segment starts per (row, KV head); ``slots`` = buffer width ``S``."""

    var_cap: Table
    starts: Table
    slots: int

    def rows(self, order: list[int]) -> Layout:
        """The layout of the rows ``order`` (beam reordering, batch selection)."""
        return Layout(var_cap=tuple(self.var_cap[r] for r in order),
                      starts=tuple(self.starts[r] for r in order), slots=self.slots)


def compressions_done(seen: int, base: int, window: int, block: int) -> int:
    """Blocks compressed once every position ``< seen`` has been decoded.

    Block ``c`` (1-based) covers positions ``[base + (c-1)b, base + cb)`` and is
    compressed when position ``base + cb + w - 1`` arrives.
    """
    return max(0, (seen - base - window) // block)


def packed_lengths(counts0: list[list[int]], keep: list[int], compressions: int) -> list[list[int]]:
    """Tokens in each packed region: the prefill's global subset plus ``t`` per compressed block."""
    return [[c + compressions * t for c, t in zip(row, keep, strict=True)] for row in counts0]


def plan(var_len: list[list[int]], keep: list[int], ring: int, headroom_blocks: int) -> Layout:
    """Segments holding ``var_len`` plus ``headroom_blocks`` compressed blocks per head."""
    var_cap = tuple(tuple(v + headroom_blocks * t for v, t in zip(row, keep, strict=True)) for row in var_len)
    starts, slots = [], 0
    for row in var_cap:
        seg = [ring + c for c in row]
        starts.append(tuple(sum(seg[:h]) for h in range(len(seg))))
        slots = max(slots, sum(seg))
    return Layout(var_cap=var_cap, starts=tuple(starts), slots=-(-slots // SLOT_ALIGN) * SLOT_ALIGN)


def global_blocks(length: int, window: int, block: int) -> int:
    """Selection blocks of a prompt of ``length`` tokens: its global region (all but the final ``window``)
    in blocks of ``block``, the last one possibly partial; 0 for a prompt within the window."""
    return max(0, -(-(length - window) // block))


def bucket_blocks(blocks: int, per_octave: int) -> int:
    """The smallest size ``>= blocks`` on a grid of ``per_octave`` sizes per doubling (``ceil(2^(j / per_octave))``);
    ``blocks`` itself with ``per_octave = 0``. Prompts whose global regions round to one size share one layout."""
    if per_octave == 0 or blocks <= 1:
        return blocks
    # From below: ceil(2^(j/n)) can reach ``blocks`` while 2^(j/n) is still under it.
    j = max(0, math.floor(per_octave * math.log2(blocks - 1)) - 1)
    while math.ceil(2 ** (j / per_octave)) < blocks:
        j += 1
    return math.ceil(2 ** (j / per_octave))


def headroom_blocks(var_len: list[list[int]], keep: list[int], ring: int, growth: float,
                    min_blocks: int, extra_blocks: int = 0) -> int:
    """Blocks of headroom: ``growth`` of the mean kept size, at least ``min_blocks`` / ``extra_blocks``."""
    mean_kept = ring + sum(map(sum, var_len)) / max(1, sum(map(len, var_len)))
    mean_t = max(1.0, sum(keep) / len(keep))
    return max(math.ceil(growth * mean_kept / mean_t), min_blocks, extra_blocks)


def next_growth(layout: Layout, var_len: list[list[int]], keep: list[int], compressions: int, base: int,
                window: int, block: int) -> int:
    """Logical position whose append needs more packed slots than ``layout`` has (``NEVER`` if none)."""
    fits = [(cap - v) // t for caps, row in zip(layout.var_cap, var_len, strict=True)
            for cap, v, t in zip(caps, row, keep, strict=True) if t > 0]
    if not fits:
        return NEVER
    return base + (compressions + min(fits) + 1) * block + window - 1


def slot_map(old: Layout, new: Layout, ring: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 ``[B, new.slots]``: the ``old`` slot each ``new`` slot copies, and bool: whether it copies one.

    Each head's old segment lands at the start of its new one (offsets are
    kept), so ring slots and packed slots keep their meaning.
    """
    hkv = len(new.starts[0])
    new_starts = torch.tensor(new.starts, device=device)
    new_ends = new_starts + ring + torch.tensor(new.var_cap, device=device)
    old_size = ring + torch.tensor(old.var_cap, device=device)
    slot = torch.arange(new.slots, device=device).expand(len(new.starts), new.slots).contiguous()
    head = torch.searchsorted(new_ends, slot, right=True)
    inside = head < hkv
    head = head.clamp(max=hkv - 1)
    offset = slot - new_starts.gather(1, head)
    valid = inside & (offset < old_size.gather(1, head))
    src = torch.tensor(old.starts, device=device).gather(1, head) + offset
    return torch.where(valid, src, 0), valid
