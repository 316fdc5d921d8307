"""The slot layout every ``TCACacheLayer`` keeps between steps, checked from its buffers alone.

Each (row, KV head) owns one segment of the flat buffers: a ring of ``ring`` slots for the recent
tokens (each slot the head's or free), then its packed run of ``var_len`` compressed tokens with no
hole in it, then free headroom. The Triton decode kernel reads exactly the ring's filled prefix and
the packed run (``LiveRanges``): a live slot in the headroom would never be attended. It masks free
slots by ``owner`` in both runs; with no hole in the packed run, that mask is needed in the ring only.
"""

from __future__ import annotations


def assert_slot_layout(layer) -> None:
    owner = layer.owner.cpu()
    starts, var_len = layer.seg_start.cpu(), layer.var_len.cpu()
    lengths = layer.segments.length.cpu()
    ring = layer.ring
    for b in range(owner.shape[0]):
        for h in range(starts.shape[1]):
            s0, packed, end = int(starts[b, h]), int(var_len[b, h]), int(starts[b, h] + lengths[b, h])
            assert ring + packed <= end - s0, f"row {b} head {h}: packed run past its segment"
            ring_owner = owner[b, s0: s0 + ring]
            assert ((ring_owner == h) | (ring_owner == -1)).all(), f"row {b} head {h}: another head in its ring"
            run = owner[b, s0 + ring: s0 + ring + packed]
            assert (run == h).all(), f"row {b} head {h}: a hole in the packed run at {(run != h).nonzero()[:, 0]}"
            assert (owner[b, s0 + ring + packed: end] == -1).all(), f"row {b} head {h}: a live slot in the headroom"
    live = owner >= 0
    assert (layer.pos.cpu()[live] >= 0).all(), "a live slot without a position"
