"""Chunk-time pure functions over the head-packed TCA cache.

A *chunk* is ``c >= 1`` new tokens on top of a pruned cache: the next message
of a conversation, or one piece of a prompt prefilled in pieces. The rule the
cache follows is written in ``docs/chunked_prefill.md``: every query of the
chunk attends to the kept set plus the chunk itself, causally; the blocks that
leave the window keep each KV head's ``t`` most important tokens, importance
being the attention the chunk's last ``m`` queries gave them.

Here the attention is plain tensor ops, the reference (CUDA runs ``chunk_flex``): the kept set is
gathered per KV head (each head's segment of the flat buffer, ``cache.py``),
and the queries are processed in tiles so that one score tile stays small.
Everything computes in float32, or in float64 for float64 inputs.
"""

from __future__ import annotations

import weakref

import torch

# Scores per query tile (float32: 256 MB); bounds a chunk's memory whatever its length.
TILE_SCORES = 1 << 26


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def gather_segments(k_bsd: torch.Tensor, v_bsd: torch.Tensor, owner_bs: torch.Tensor, seg_start: torch.Tensor,
                    max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each KV head's slots of the flat buffer as a rectangular, masked tensor.

    Args:
        k_bsd, v_bsd: ``[B, S, D]`` flat buffers.
        owner_bs: int32 ``[B, S]``: KV head of each live slot, ``-1`` if free.
        seg_start: int64 ``[B, H_kv]``: first slot of each head's segment.
        max_length: Python int, at least every segment's length.

    Returns:
        ``[B, H_kv, M, D]`` keys and values and bool ``[B, H_kv, M]`` (slot
        live and owned by that head), ``M = max_length``.
    """
    bsz, slots, d = k_bsd.shape
    hkv = seg_start.shape[1]
    idx = seg_start.unsqueeze(-1) + torch.arange(max_length, device=k_bsd.device)
    inside = idx < slots
    flat = idx.clamp(max=slots - 1).view(bsz, -1)
    heads = torch.arange(hkv, device=k_bsd.device, dtype=owner_bs.dtype).view(1, hkv, 1)
    live = inside & (owner_bs.gather(1, flat).view(bsz, hkv, max_length) == heads)
    rows = flat.unsqueeze(-1).expand(-1, -1, d)
    k = k_bsd.gather(1, rows).view(bsz, hkv, max_length, d)
    v = v_bsd.gather(1, rows).view(bsz, hkv, max_length, d)
    return k, v, live


def chunk_attention(q_bhcd: torch.Tensor, k_bhmd: torch.Tensor, v_bhmd: torch.Tensor, live_bhm: torch.Tensor,
                    k_chunk: torch.Tensor, v_chunk: torch.Tensor, scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each chunk query over the kept past plus the chunk up to itself, one softmax.

    Args:
        q_bhcd: ``[B, H_q, c, D]`` the chunk's queries (RoPE applied); query
            head ``q`` reads KV head ``q // (H_q / H_kv)``.
        k_bhmd, v_bhmd, live_bhm: the kept past, from ``gather_segments``.
        k_chunk, v_chunk: ``[B, H_kv, c, D]`` the chunk's keys and values.
        scale: softmax scale.

    Returns:
        (``[B, H_q, c, D]`` output in q's dtype, ``[B, H_q, c]`` log-sum-exp of
        every query's scores over what it sees, in ``compute_dtype``).
    """
    bsz, hq, c, d = q_bhcd.shape
    hkv, past = k_bhmd.shape[1], k_bhmd.shape[2]
    g = hq // hkv
    dt = compute_dtype(q_bhcd.dtype)
    q = q_bhcd.to(dt).view(bsz, hkv, g, c, d)
    k_past, v_past, k_new, v_new = (x.to(dt) for x in (k_bhmd, v_bhmd, k_chunk, v_chunk))
    hidden_past = ~live_bhm[:, :, None, None, :]
    key_idx = torch.arange(c, device=q.device)
    tile = max(1, TILE_SCORES // max(1, bsz * hq * (past + c)))
    outs, lses = [], []
    for start in range(0, c, tile):
        q_t = q[:, :, :, start: start + tile]
        rows = torch.arange(start, start + q_t.shape[3], device=q.device)
        s_past = torch.einsum("bkgtd,bkmd->bkgtm", q_t, k_past).mul_(scale).masked_fill_(hidden_past, float("-inf"))
        s_new = torch.einsum("bkgtd,bkjd->bkgtj", q_t, k_new).mul_(scale)
        s_new.masked_fill_(key_idx[None, :] > rows[:, None], float("-inf"))
        lse = torch.logsumexp(torch.cat([s_past, s_new], -1), -1)
        out = (torch.einsum("bkgtm,bkmd->bkgtd", torch.exp(s_past - lse[..., None]), v_past)
               + torch.einsum("bkgtj,bkjd->bkgtd", torch.exp(s_new - lse[..., None]), v_new))
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, 3).reshape(bsz, hq, c, d).to(q_bhcd.dtype)
    return out, torch.cat(lses, 3).reshape(bsz, hq, c)


def leaving_importance(q_obs: torch.Tensor, k_leave: torch.Tensor, lse_obs: torch.Tensor, sees: torch.Tensor,
                       scale: float, aggregation: str = "mean") -> torch.Tensor:
    """Importance of the tokens of the blocks that leave the window during a chunk.

    The probability each observation query gave each token in ``chunk_attention``
    (0 where the token lies after it), averaged over the observation queries,
    then combined over the ``g`` query heads of each KV head (the order of
    ``selection.importance``).

    Args:
        q_obs: ``[B, H_q, O, D]`` the observation queries.
        k_leave: ``[B, H_kv, N, D]`` keys of the leaving tokens.
        lse_obs: ``[B, H_q, O]`` their log-sum-exp from ``chunk_attention``.
        sees: bool ``[O, N]``: observation query ``o`` sees token ``n``.
        scale: softmax scale.
        aggregation: ``"mean"`` or ``"max"`` over the query heads.

    Returns:
        ``[B, H_kv, N]`` in ``compute_dtype``.
    """
    bsz, hq, obs, d = q_obs.shape
    hkv = k_leave.shape[1]
    dt = compute_dtype(q_obs.dtype)
    q = q_obs.to(dt).view(bsz, hkv, hq // hkv, obs, d)
    logits = torch.einsum("bkgod,bknd->bkgon", q, k_leave.to(dt)) * scale
    probs = torch.exp(logits - lse_obs.to(dt).view(bsz, hkv, hq // hkv, obs, 1)) * sees
    probs = probs.mean(3)
    return probs.mean(2) if aggregation == "mean" else probs.amax(2)


def building_graph() -> bool:
    """Whether torch.compile is tracing or a CUDA graph is being captured: then no code may read a
    device value on the host (a data-dependent branch, or a sync that a capture refuses).

    Eager decode asks this several times a layer and step: ``torch.cuda.is_initialized`` (a flag)
    stands in for ``is_available`` (a driver query: several us a call on the H200's host), as nothing
    can be capturing before CUDA starts."""
    return torch.compiler.is_compiling() or (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())


def is_causal_left_padded(visible: torch.Tensor, past_length: int, pads: list[int] | None) -> bool:
    """Whether bool ``visible [B, H, c, past_length + c]`` is exactly the causal mask of ``c`` new
    queries after ``past_length`` tokens, with each row's leading ``pads`` tokens hidden (none if
    ``pads`` is empty). The one rule the pruned cache can honour, for chunks and decode steps."""
    c, kv = visible.shape[-2], visible.shape[-1]
    if kv != past_length + c or (pads and len(pads) != visible.shape[0]):
        return False
    dev = visible.device
    key = torch.arange(kv, device=dev)
    want = (key[None, :] <= torch.arange(past_length, past_length + c, device=dev)[:, None]).expand(
        visible.shape[0], c, kv)
    if pads:
        want = want & (key >= torch.tensor(pads, device=dev)[:, None])[:, None, :]
    return torch.equal(visible, want.unsqueeze(1).expand_as(visible))


class AcceptedMask:
    """The last mask a check accepted: a weak reference, its in-place version and the check's other
    arguments. transformers hands every layer of one forward the same mask tensor, so the layers
    after the first skip reading it again (on a GPU each read is a host-device sync, which stalls
    the launches that follow); a new tensor, an in-place change or other arguments are checked."""

    def __init__(self) -> None:
        self._ref: weakref.ref | None = None
        self._key: tuple = ()

    def seen(self, mask: torch.Tensor, *args: object) -> bool:
        return self._ref is not None and self._ref() is mask and self._key == (mask._version, *args)

    def accept(self, mask: torch.Tensor, *args: object) -> None:
        self._ref, self._key = weakref.ref(mask), (mask._version, *args)


_accepted_chunk_mask = AcceptedMask()


def check_chunk_mask(attention_mask: torch.Tensor | None, past_length: int, pads: list[int] | None = None) -> None:
    """Refuse any mask but the causal one (hiding each row's leading ``pads``) for a chunk after ``past_length``.

    The pruned cache stores neither padding nor holes: a mask that hides a
    token other than a row's left padding of the prefill cannot be honoured.
    transformers materialises the causal mask of a chunk on top of a cache
    (``[B, 1, c, past + c]``, bool, or float with 0 where visible). Checked
    eagerly only: reading mask values inside a compiled graph would be a
    data-dependent branch, and inside a CUDA-graph capture a sync the capture refuses.
    A mask already accepted with the same arguments is not read again (``AcceptedMask``).
    """
    if attention_mask is None or building_graph():
        return
    key = (past_length, tuple(pads or ()))
    if _accepted_chunk_mask.seen(attention_mask, *key):
        return
    visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    if not is_causal_left_padded(visible, past_length, pads):
        raise ValueError("TCACache does not support this mask for new tokens on top of the cache: it hides "
                         "tokens other than each row's left padding of the prefill (a padded chunk, right "
                         "padding or a hole). Pass the conversation with the prompt's left padding only (generate "
                         "infers a hole when pad_token_id occurs inside the text: pass attention_mask yourself)")
    _accepted_chunk_mask.accept(attention_mask, *key)
