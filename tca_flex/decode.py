"""Decode-time pure functions over the head-packed TCA cache.

Storage (see ``cache.py``): each batch row holds the kept keys of *all* its KV
heads in one flat buffer ``k_bsd [B, S, D]``; every KV head owns a contiguous
segment of slots, sized to what that head keeps. ``owner_bs [B, S]`` (int32)
names the KV head of each live slot and is ``-1`` for a free slot, so one
tensor says both "is this slot live" and "whose is it".

Kernel decision (measured, ``BENCHMARKS.md``):

- Decode is memory-bound, and pruning pays only if the kernel reads the live,
  compacted bytes, not a full-size buffer with a length mask.
- SDPA on compact buffers is fastest when every head has the same length, but
  TCA heads keep very different counts: a rectangular ``[B, H_kv, L_max, D]``
  buffer pads every head to the largest and gives the memory back.
- A per-query-head BlockMask with ``enable_gqa`` falls off the flex-decoding
  kernel; with a mask head dimension of 1 it stays on it, but then every
  query head scores every head's slots (FlexAttention over the flat buffer
  viewed as one KV head, ``"flex"``): ``H_kv`` times the needed FLOPs, which
  made it no faster than dense SDPA over the full cache at 128K.

So the CUDA default is ``"triton"`` (``triton_decode.py``): one program per
(row, KV head, split of its segment) scores the segment with the head's own
query heads only, flash-decoding style, so both bytes and FLOPs follow what
each head keeps, and stops at the head's live length (``LiveRanges``). With
it, the block compression runs as one kernel too (``triton_compress.py``,
``compress_block``), which exits at once on the steps where no block leaves,
and the append of the new token costs no launch of its own: the attention's
merge kernel writes it after the attention has read the cache (``NewToken``;
``triton_append.py``, ``append_token``, is the append's own kernel, kept as an
option and as the rule the merge follows).
``"flex"`` stays as the fallback where Triton is missing or the head
dimension is not a power of two. ``"math"`` is the same
computation in plain tensor ops: the CPU path (compiled FlexAttention on CPU
cannot return the log-sum-exp that compression needs) and the reference the
other two are tested against. Without a GPU, an explicit ``"triton"`` runs
the same kernels in Triton's interpreter (``TRITON_INTERPRET=1``; tests only).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .checks import check_choice
from .compile import compiled_flex_attention, with_lse
from .selection import rank_of

try:
    from . import triton_append, triton_compress, triton_decode
except ImportError:  # no Triton (e.g. a CPU-only install): the "flex" and "math" backends remain
    triton_append = triton_compress = triton_decode = None

DECODE_BACKENDS = ("auto", "triton", "flex", "math")
_KV_BLOCK = 128


class Segments(NamedTuple):
    """Where each KV head's slots lie in the flat buffer (what the ``"triton"`` backend reads).

    ``start``, ``length``: int32 ``[B, H_kv]``; ``max_length`` (>= every
    length) and ``total_length`` (their sum): Python ints that size the kernel
    grid, fixed between growths.
    """

    start: torch.Tensor
    length: torch.Tensor
    max_length: int
    total_length: int


class LiveRanges(NamedTuple):
    """Where a TCA cache's live slots lie inside each segment (read on the device every step).

    Offsets ``[0, min(next_pos - base, ring))`` (the ring's filled part) and
    ``[ring, ring + var_len)`` (the packed tokens); the rest of a segment is
    free headroom, which the ``"triton"`` kernel does not read.

    ``var_len``: int64 ``[B, H_kv]``; ``next_pos``: int64 0-d; ``base``: int64
    ``[B]`` (each row's first ring position: rows of a padded batch differ) or 0-d;
    ``ring``: Python int.
    """

    var_len: torch.Tensor
    next_pos: torch.Tensor
    base: torch.Tensor
    ring: int


class NewToken(NamedTuple):
    """The step's new token, for the ``"triton"`` backend to append after its attention (``decode_attention``).

    ``key``, ``value``: ``[B, H_kv, 1, D]`` (stored in the buffers' dtype);
    ``pos``: the cache's int32 ``[B, S]`` positions (updated with the rest).
    """

    key: torch.Tensor
    value: torch.Tensor
    pos: torch.Tensor


if triton_decode is not None:
    def _decode_segments(q_bhd: torch.Tensor, k_bsd: torch.Tensor, v_bsd: torch.Tensor, owner_bs: torch.Tensor,
                         seg_start: torch.Tensor, seg_len: torch.Tensor, var_len: torch.Tensor | None,
                         next_pos: torch.Tensor | None, base: torch.Tensor | None, ring: int, max_segment: int,
                         total_slots: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        # An opaque custom op, not a triton_op: on torch 2.11 + Triton 3.6 Inductor failed to
        # recompile these kernels inside a compiled graph (BENCHMARKS.md, 2026-12-02), while
        # an opaque op launches the same JIT kernels as eager and stays CUDA-graph capturable.
        live = None if var_len is None else (var_len, next_pos, base, ring)
        return triton_decode.launch(q_bhd, k_bsd, v_bsd, owner_bs, seg_start, seg_len, max_segment, scale,
                                    total_slots=total_slots, live=live)

    _decode_segments_op = torch.library.custom_op("tca_flex::decode_segments", _decode_segments, mutates_args=())

    @_decode_segments_op.register_fake
    def _(q_bhd, k_bsd, v_bsd, owner_bs, seg_start, seg_len, var_len, next_pos, base, ring, max_segment,
          total_slots, scale):
        # Contiguous, as the launcher allocates them (q may be a strided view).
        return q_bhd.new_empty(q_bhd.shape), q_bhd.new_empty(q_bhd.shape[:2], dtype=torch.float32)

    # The same kernels with the step's new token appended by the merge (attention first: ``triton_decode.launch``'s
    # ``token``); it writes the cache, declared so a compiled graph orders it after the reads of these buffers.
    def _decode_append(q_bhd: torch.Tensor, key_bhd: torch.Tensor, value_bhd: torch.Tensor, k_bsd: torch.Tensor,
                       v_bsd: torch.Tensor, owner_bs: torch.Tensor, pos_bs: torch.Tensor, seg_start: torch.Tensor,
                       seg_len: torch.Tensor, var_len: torch.Tensor, next_pos: torch.Tensor, base: torch.Tensor,
                       ring: int, max_segment: int, total_slots: int,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return triton_decode.launch(q_bhd, k_bsd, v_bsd, owner_bs, seg_start, seg_len, max_segment, scale,
                                    total_slots=total_slots, live=(var_len, next_pos, base, ring),
                                    token=(key_bhd, value_bhd, pos_bs))

    _decode_append_op = torch.library.custom_op(
        "tca_flex::decode_append", _decode_append, mutates_args=("k_bsd", "v_bsd", "owner_bs", "pos_bs", "next_pos"))

    @_decode_append_op.register_fake
    def _(q_bhd, key_bhd, value_bhd, k_bsd, v_bsd, owner_bs, pos_bs, seg_start, seg_len, var_len, next_pos, base,
          ring, max_segment, total_slots, scale):
        return q_bhd.new_empty(q_bhd.shape), q_bhd.new_empty(q_bhd.shape[:2], dtype=torch.float32)

    # Opaque for the same reason; it mutates the cache in place (declared, so a compiled graph
    # orders it after the reads of these buffers and before the next step's).
    def _compress_block(q_bhd: torch.Tensor, lse_bh: torch.Tensor, k_bsd: torch.Tensor, v_bsd: torch.Tensor,
                        owner_bs: torch.Tensor, pos_bs: torch.Tensor, seg_start: torch.Tensor,
                        var_len: torch.Tensor, keep_h: torch.Tensor, ncs: torch.Tensor, next_pos: torch.Tensor,
                        base: torch.Tensor, window: int, block: int, ring: int, scale: float,
                        use_max: bool) -> None:
        triton_compress.launch(q_bhd, lse_bh, k_bsd, v_bsd, owner_bs, pos_bs, seg_start, var_len, keep_h, ncs,
                               next_pos, base, window=window, block=block, ring=ring, scale=scale, use_max=use_max)

    _compress_block_op = torch.library.custom_op(
        "tca_flex::compress_block", _compress_block,
        mutates_args=("k_bsd", "v_bsd", "owner_bs", "pos_bs", "var_len", "ncs"))

    @_compress_block_op.register_fake
    def _(q_bhd, lse_bh, k_bsd, v_bsd, owner_bs, pos_bs, seg_start, var_len, keep_h, ncs, next_pos, base, window,
          block, ring, scale, use_max):
        return None

    # Opaque for the same reason. It writes next_pos too: declared, so a compiled step reads the
    # advanced position after it (the decode attention's live ring fill, the compression).
    def _append_token(key_bhd: torch.Tensor, value_bhd: torch.Tensor, k_bsd: torch.Tensor, v_bsd: torch.Tensor,
                      owner_bs: torch.Tensor, pos_bs: torch.Tensor, seg_start: torch.Tensor,
                      next_pos: torch.Tensor, base: torch.Tensor, ring: int) -> None:
        triton_append.launch(key_bhd, value_bhd, k_bsd, v_bsd, owner_bs, pos_bs, seg_start, next_pos, base,
                             ring=ring)

    _append_token_op = torch.library.custom_op("tca_flex::append_token", _append_token,
                                               mutates_args=("k_bsd", "v_bsd", "owner_bs", "pos_bs", "next_pos"))

    @_append_token_op.register_fake
    def _(key_bhd, value_bhd, k_bsd, v_bsd, owner_bs, pos_bs, seg_start, next_pos, base, ring):
        return None


def _run(op: Any, impl: Any, *args: Any) -> Any:
    """The registered op inside torch.compile (opaque to Inductor, its mutations declared); eagerly
    the function it wraps: the op's dispatch costs 20-50 us a call on the host (CPU,
    ``scripts/host_overhead.py``), which eager decode pays per layer and step."""
    return op(*args) if torch.compiler.is_compiling() else impl(*args)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_supported(q_bhsd: torch.Tensor) -> bool:
    """Whether the ``"triton"`` backend can run this query: Triton, a power-of-two head dim, and CUDA
    (or CPU tensors under Triton's interpreter, ``TRITON_INTERPRET=1``: slow, for tests)."""
    d = q_bhsd.shape[-1]
    on_device = q_bhsd.device.type == "cuda" or (q_bhsd.device.type == "cpu" and _interpreting())
    return (triton_decode is not None and on_device and d >= 16 and d & (d - 1) == 0
            and q_bhsd.dtype in (torch.float16, torch.bfloat16, torch.float32))


def resolve_backend(q_bhsd: torch.Tensor, segments: Segments | None, backend: str = "auto") -> str:
    """The decode backend that runs for this query: ``"auto"`` resolved, an impossible one refused.

    ``"auto"``: ``"math"`` off CUDA, ``"triton"`` on CUDA where it can run
    (``triton_supported`` and ``segments`` given), else ``"flex"``.
    """
    check_choice("decode backend", backend, DECODE_BACKENDS)
    if backend == "auto":
        if q_bhsd.device.type != "cuda":
            return "math"
        return "triton" if segments is not None and triton_supported(q_bhsd) else "flex"
    if backend == "triton" and (segments is None or not triton_supported(q_bhsd)):
        raise ValueError("decode backend 'triton' needs a CUDA query with a power-of-two head dim, Triton "
                         "installed and the cache's Segments; use backend='flex' or 'math' otherwise")
    return backend


def owner_mask_mod(owner_bs: torch.Tensor, group: int):
    """mask_mod: query head ``h`` sees slot ``kv_idx`` iff the slot is live and its KV head's.

    Module-level factory: every layer shares one code object, so dynamo does
    not recompile per layer; the captured ``owner`` tensor may change freely.
    """

    def tca_decode_mask(b, h, q_idx, kv_idx):
        return owner_bs[b, kv_idx] == h // group

    return tca_decode_mask


def decode_block_mask(owner_bs: torch.Tensor, group: int) -> BlockMask:
    """Head-dim-1 BlockMask over every allocated block of the flat buffer.

    All blocks are listed as partial: the buffer is already compact (free
    slots are a few percent), so skipping blocks would save little, and a
    mask built from the shape alone costs no data-dependent work per step.
    """
    bsz, slots = owner_bs.shape
    num_blocks = -(-slots // _KV_BLOCK)
    device = owner_bs.device
    kv_num_blocks = torch.full((bsz, 1, 1), num_blocks, dtype=torch.int32, device=device)
    kv_indices = torch.arange(num_blocks, dtype=torch.int32, device=device).expand(bsz, 1, 1, num_blocks)
    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices.contiguous(), BLOCK_SIZE=(_KV_BLOCK, _KV_BLOCK),
                                    mask_mod=owner_mask_mod(owner_bs, group), seq_lengths=(1, slots),
                                    compute_q_blocks=False)


def _math_decode(q_bhsd: torch.Tensor, k_bsd: torch.Tensor, v_bsd: torch.Tensor, owner_bs: torch.Tensor,
                 group: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    heads = torch.arange(q_bhsd.shape[1], device=q_bhsd.device) // group
    scores = torch.einsum("bhd,bsd->bhs", q_bhsd[:, :, 0].float(), k_bsd.float()) * scale
    scores = scores.masked_fill(owner_bs[:, None, :] != heads[None, :, None], float("-inf"))
    lse = scores.logsumexp(-1)
    out = torch.einsum("bhs,bsd->bhd", torch.exp(scores - lse[..., None]), v_bsd.float())
    return out.to(q_bhsd.dtype).unsqueeze(2), lse


def _flex_decode(q_bhsd: torch.Tensor, k_bsd: torch.Tensor, v_bsd: torch.Tensor, owner_bs: torch.Tensor,
                 group: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    # Eager flex on CPU materialises only [B, H_q, 1, S] scores here (q_len 1), which is fine.
    on_cuda = q_bhsd.device.type == "cuda"
    fn = compiled_flex_attention() if on_cuda and not torch.compiler.is_compiling() else flex_attention
    block_mask = decode_block_mask(owner_bs, group)
    out, lse = with_lse(fn, q_bhsd, k_bsd.unsqueeze(1), v_bsd.unsqueeze(1), block_mask=block_mask, scale=scale,
                        enable_gqa=True)
    return out, lse[:, :, 0].float()


def _triton_decode(q_bhsd: torch.Tensor, k_bsd: torch.Tensor, v_bsd: torch.Tensor, owner_bs: torch.Tensor,
                   segments: Segments, scale: float, live: LiveRanges | None,
                   token: NewToken | None) -> tuple[torch.Tensor, torch.Tensor]:
    if token is not None:
        out, lse = _run(torch.ops.tca_flex.decode_append, _decode_append, q_bhsd[:, :, 0], token.key[:, :, 0].detach(),
                        token.value[:, :, 0].detach(), k_bsd, v_bsd, owner_bs, token.pos, segments.start,
                        segments.length, live.var_len, live.next_pos, live.base, live.ring, segments.max_length,
                        segments.total_length, scale)
        return out.unsqueeze(2), lse
    var_len, next_pos, base, ring = live if live is not None else (None, None, None, 0)
    out, lse = _run(torch.ops.tca_flex.decode_segments, _decode_segments, q_bhsd[:, :, 0], k_bsd, v_bsd, owner_bs,
                    segments.start, segments.length, var_len, next_pos, base, ring, segments.max_length,
                    segments.total_length, scale)
    return out.unsqueeze(2), lse


def decode_attention(q_bhsd: torch.Tensor, k_bsd: torch.Tensor, v_bsd: torch.Tensor, owner_bs: torch.Tensor,
                     *, group: int, scale: float, backend: str = "auto", segments: Segments | None = None,
                     live: LiveRanges | None = None,
                     token: NewToken | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of attention over the head-packed kept set.

    Args:
        q_bhsd: ``[B, H_q, 1, D]`` queries (RoPE applied).
        k_bsd, v_bsd: ``[B, S, D]`` flat buffers holding every KV head's kept
            keys/values (RoPE already applied to keys).
        owner_bs: int32 ``[B, S]``: KV head of each live slot, ``-1`` if free.
        group: query heads per KV head; query head ``h`` reads KV head ``h // group``.
        scale: softmax scale.
        backend: ``"triton"`` (CUDA default), ``"flex"`` (CUDA without
            Triton), ``"math"`` (CPU default), or ``"auto"`` (``resolve_backend``).
        segments: each KV head's slot range; needed by ``"triton"`` (``"auto"``
            picks ``"flex"`` without it).
        live: where the live slots lie inside each segment (a TCA cache's
            ring fill and packed lengths); lets ``"triton"`` skip the free
            headroom. ``None``: read whole segments. Every backend masks free
            slots by ``owner_bs`` either way.
        token: the step's new token, not yet in the cache (``"triton"`` only,
            with ``live``): attended with the kept set, then written to its ring
            slot and ``next_pos`` advanced, by the attention's own merge kernel
            (what ``append_token`` before the attention does, one launch fewer).

    Returns:
        (``[B, H_q, 1, D]`` output in q's dtype, float32 ``[B, H_q]`` log-sum-exp
        of each query head's scores over its kept keys).
    """
    backend = resolve_backend(q_bhsd, segments, backend)
    if token is not None and (backend != "triton" or live is None):
        raise ValueError(f"decode_attention appends a token only on the 'triton' backend with the cache's live "
                         f"ranges (got backend {backend!r}, live={'given' if live is not None else None}); append "
                         "it first with append_token / append_token_math and pass token=None")
    if backend == "triton":
        return _triton_decode(q_bhsd, k_bsd, v_bsd, owner_bs, segments, scale, live, token)
    fn = _flex_decode if backend == "flex" else _math_decode
    return fn(q_bhsd, k_bsd, v_bsd, owner_bs, group, scale)


def block_importance(q_bhsd: torch.Tensor, k_block: torch.Tensor, lse_bh: torch.Tensor, scale: float,
                     aggregation: str = "mean") -> torch.Tensor:
    """Attention probability the current query gives each token of a block, per KV head.

    Args:
        q_bhsd: ``[B, H_q, 1, D]`` the current queries.
        k_block: ``[B, H_kv, b, D]`` the block's keys.
        lse_bh: float32 ``[B, H_q]`` log-sum-exp over the whole kept set, so
            the probabilities are the ones the attention actually used.
        scale: softmax scale.
        aggregation: ``"mean"`` or ``"max"`` over the ``g`` query heads (as in
            ``selection.importance``).

    Returns:
        float32 ``[B, H_kv, b]``.
    """
    bsz, hq, _, d = q_bhsd.shape
    hkv = k_block.shape[1]
    q = q_bhsd[:, :, 0].float().view(bsz, hkv, hq // hkv, d)
    logits = torch.einsum("bkgd,bktd->bkgt", q, k_block.float()) * scale
    probs = torch.exp(logits - lse_bh.view(bsz, hkv, hq // hkv, 1))
    return probs.mean(2) if aggregation == "mean" else probs.amax(2)


def top_t_in_block(importance: torch.Tensor, t_h: torch.Tensor) -> torch.Tensor:
    """bool ``[B, H_kv, b]``: each head's top-``t_h`` tokens (ties keep the older token).

    Args:
        importance: ``[B, H_kv, b]``.
        t_h: int64 ``[H_kv]`` tokens each head keeps per block.
    """
    return rank_of(importance) < t_h[None, :, None]


def compress_targets(keep: torch.Tensor, ring_slots: torch.Tensor, var_end: torch.Tensor,
                     do: torch.Tensor) -> torch.Tensor:
    """Destination slot of every token of a leaving block (branch-free).

    A kept token moves to the next free slot of its head's packed region; a
    dropped token, and every token when ``do`` is False, "moves" to its own
    slot, which makes the scatter that follows a no-op for it. Destinations
    are distinct, so one scatter moves the whole block.

    Args:
        keep: bool ``[B, H_kv, b]``.
        ring_slots: int64 ``[B, H_kv, b]`` current slots of the block's tokens.
        var_end: int64 ``[B, H_kv]`` first free slot of each head's packed region.
        do: bool 0-d tensor: a whole block has left the window at this step.

    Returns:
        int64 ``[B, H_kv, b]`` destination slots.
    """
    packed = var_end.unsqueeze(-1) + keep.long().cumsum(-1) - 1
    return torch.where(keep & do, packed, ring_slots)


def compress_block(q_bhsd: torch.Tensor, lse_bh: torch.Tensor, k_bsd: torch.Tensor, v_bsd: torch.Tensor,
                   owner_bs: torch.Tensor, pos_bs: torch.Tensor, seg_start: torch.Tensor, var_len: torch.Tensor,
                   keep_h: torch.Tensor, ncs: torch.Tensor, next_pos: torch.Tensor, base: torch.Tensor, *,
                   window: int, block: int, scale: float, aggregation: str = "mean") -> None:
    """The decode step's block compression as one Triton kernel, in place (``triton_compress.py``).

    Does what ``TCACacheLayer.compress`` does with tensor ops, and nothing on
    the steps where no block leaves the window (decided on the device, so one
    CUDA graph serves every step). Needs ``triton_supported(q_bhsd)``.

    Args:
        q_bhsd: ``[B, H_q, 1, D]``; lse_bh: float32 ``[B, H_q]`` from ``decode_attention``.
        k_bsd, v_bsd, owner_bs, pos_bs: the cache's flat buffers (updated).
        seg_start, var_len: int64 ``[B, H_kv]`` (``var_len`` updated).
        keep_h: int64 ``[H_kv]``, ``t`` per KV head.
        ncs: int64 ``[B]`` (or 0-d), first position not yet compressed per row
            (updated); next_pos: int64 0-d; base: int64 ``[B]`` (or 0-d), each
            row's first ring position.
        window, block: the cache's ``compress_window`` (its window plus the grace blocks: a
            block is compressed once it lies that far behind the newest token) and block
            size (ring = window + block).
        scale: softmax scale; aggregation: ``"mean"`` or ``"max"`` over query heads.
    """
    _run(torch.ops.tca_flex.compress_block, _compress_block, q_bhsd[:, :, 0], lse_bh.contiguous(), k_bsd, v_bsd,
         owner_bs, pos_bs, seg_start, var_len, keep_h, ncs, next_pos, base, window, block, window + block, scale,
         aggregation == "max")


def append_token(key_bhsd: torch.Tensor, value_bhsd: torch.Tensor, k_bsd: torch.Tensor, v_bsd: torch.Tensor,
                 owner_bs: torch.Tensor, pos_bs: torch.Tensor, seg_start: torch.Tensor, next_pos: torch.Tensor,
                 base: torch.Tensor, *, ring: int, heads: torch.Tensor | None = None) -> None:
    """The decode step's append as one Triton kernel, in place (``triton_append.py``).

    Does what ``append_token_math`` does with tensor ops (same arguments;
    ``heads`` is not needed here). Needs Triton on CUDA, or its interpreter.
    """
    _run(torch.ops.tca_flex.append_token, _append_token, key_bhsd[:, :, 0].detach(), value_bhsd[:, :, 0].detach(),
         k_bsd, v_bsd, owner_bs, pos_bs, seg_start, next_pos, base, ring)


def token_slots(seg_start: torch.Tensor, next_pos: torch.Tensor, base: torch.Tensor, ring: int) -> torch.Tensor:
    """``[B, H_kv]``: the ring slot of position ``next_pos`` in each (row, KV head)'s segment."""
    return seg_start + (next_pos - base.unsqueeze(-1)) % ring


def append_token_math(key_bhsd: torch.Tensor, value_bhsd: torch.Tensor, k_bsd: torch.Tensor, v_bsd: torch.Tensor,
                      owner_bs: torch.Tensor, pos_bs: torch.Tensor, seg_start: torch.Tensor, next_pos: torch.Tensor,
                      base: torch.Tensor, *, ring: int, heads: torch.Tensor | None = None) -> None:
    """Write the new token of every (row, KV head) into its ring slot, then advance ``next_pos`` (in place).

    The slot of (row ``r``, head ``h``) is ``seg_start[r, h] + (next_pos -
    base[r]) % ring``; it gets the key and value, ``owner = h`` and ``pos =
    next_pos``.

    Args:
        key_bhsd, value_bhsd: ``[B, H_kv, 1, D]`` the new token, in the
            buffers' dtype (stored detached: the cache is inference-only).
        k_bsd, v_bsd: ``[B, S, D]`` flat buffers; owner_bs, pos_bs: int32
            ``[B, S]`` (all updated).
        seg_start: int64 ``[B, H_kv]``, each head's first slot.
        next_pos: int64 0-d, the new token's position (advanced by one).
        base: int64 ``[B]`` (or 0-d, shared by every row), each row's first ring position.
        ring: ring slots per head (window + block).
        heads: int32 ``[H_kv]`` ``0 .. H_kv - 1`` (the cache keeps one: an op
            less per step), made here if ``None``.
    """
    bsz, hkv, _, d = key_bhsd.shape
    if heads is None:
        heads = torch.arange(hkv, dtype=torch.int32, device=owner_bs.device)
    slot = token_slots(seg_start, next_pos, base, ring)
    idx = slot.unsqueeze(-1).expand(bsz, hkv, d)
    k_bsd.scatter_(1, idx, key_bhsd[:, :, 0].detach())
    v_bsd.scatter_(1, idx, value_bhsd[:, :, 0].detach())
    owner_bs.scatter_(1, slot, heads.expand(bsz, hkv))
    pos_bs.scatter_(1, slot, next_pos.to(torch.int32).expand(bsz, hkv))
    next_pos += 1
