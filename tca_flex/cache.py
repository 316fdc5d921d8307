"""TCACache: the pruned, head-packed KV cache used for decoding.

What is kept (docs/method.md, "Decode: the pruned cache and its compression"): after the
prefill each KV head keeps its global subset plus the last ``w`` tokens. New
tokens join an exact window; whenever a whole block of ``b`` tokens has left
the window (and, with ``TCAConfig.grace_blocks = n``, lies ``n`` blocks past
it) it is compressed to its top-``t`` tokens by the attention the current
query gave them (GQA-aggregated), ``t = floor(E[k])`` of that head.
Keys are cached after RoPE, so a kept token keeps its position for free.

Several new tokens at once after the prefill (the next turn of a
conversation, a piece of a chunked prefill) follow the same rule
generalised to a chunk (``docs/chunked_prefill.md``, ``chunk_step``).

Left-padded batches (``generate`` with ``attention_mask``): positions are the
padded ones, and row ``r`` (``pads[r]`` padding tokens) holds exactly what it
would alone, shifted by ``pads[r]``: its ring base ``base[r]`` is the start of
its own window, so its compression schedule (``ncs[r]``, the host's
``_base[r]``) is its own; padding positions are never stored.

Storage: one flat buffer per batch row, ``[B, S, D]``, in which every KV head
owns a contiguous segment

    [ ring: w + (n + 1) b slots, the exact window, the n grace blocks and the block about to go |
      packed: global subset, then compressed blocks | headroom ]

so bytes follow what each head keeps (heads keep very different counts; a
rectangular per-head buffer would pad all of them to the largest). The ring
never moves data: position ``p`` lives in ring slot ``(p - base) % ring``.
``owner [B, S]`` names the KV head of each live slot (``-1``: free), which is
all the decode kernel needs (``decode.py``). The packed region grows in
chunks (``growth`` of the kept size, at least ``min_chunk_blocks`` blocks),
decided from Python integers, so a decode step has no data-dependent branch.

The link to the attention function: transformers calls ``cache.update``
right before the attention function, which does not get the cache. Each
layer's ``update`` therefore posts itself, with the key tensor it returns, on
the ``CacheLink`` of its module's ``TCALayer``; the attention function takes
it back when it receives that very tensor, prunes the layer right after its
prefill (so peak memory never holds every layer's full cache) and runs decode
steps through it. No class is patched and nothing goes on ``model.config``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .checks import check_choice, check_count
from .chunk_flex import flex_chunk_attention
from .chunks import building_graph, check_chunk_mask, chunk_attention, gather_segments, leaving_importance
from .config import TCAConfig
from .decode import (
    DECODE_BACKENDS,
    LiveRanges,
    NewToken,
    Segments,
    append_token,
    append_token_math,
    block_importance,
    compress_block,
    compress_targets,
    decode_attention,
    resolve_backend,
    token_slots,
    top_t_in_block,
)
from .layer import CacheLink, model_link, tca_layers
from .layout import (
    NEVER,
    Layout,
    bucket_blocks,
    compressions_done,
    global_blocks,
    headroom_blocks,
    next_growth,
    packed_lengths,
    plan,
    slot_map,
)
from .memory import LayerMemory, MemoryReport
from .selection import Selection, budget_ladder, rank_of


def _writable(buffer: torch.Tensor) -> bool:
    """Whether a kept buffer may be updated in place now: not one made in ``torch.inference_mode``
    while this call runs outside it (``TCACacheLayer._leave_inference_mode``)."""
    return torch.is_inference_mode_enabled() or not buffer.is_inference()


class TCACacheLayer(CacheLayerMixin):
    """One layer of the TCA cache (see the module docstring for the layout).

    Args:
        config: TCAConfig (window ``w``, block ``b``, GQA aggregation).
        keep_per_block: ``t`` for every KV head of this layer, ``0 <= t <= b``.
        link: the module's ``CacheLink``; ``None`` for a layer driven by hand
            (then call ``finish_prefill`` and ``decode_step`` yourself).
        growth: headroom added when the packed region grows, as a fraction
            of the kept tokens.
        min_chunk_blocks: headroom is at least this many compressed blocks.
        reserve_tokens: after the prefill, leave room for this many decode
            tokens, so a generation of that length never grows (a growth
            changes buffer shapes: one recompile, one CUDA-graph re-capture).
            With room reserved the layer is compileable for transformers:
            ``generate`` on CUDA then compiles its decode step and replays it
            from CUDA graphs, as for a ``StaticCache`` (``disable_compile=True``
            in ``generate`` opts out; docs/cache.md).
        backend: decode kernel, see ``decode.decode_attention``.
        cdf: the layer's budget distributions (``TCALayer.cdf``); with them the
            buffers are sized for what any prompt of the length keeps, not
            what this one happens to keep (see ``size_buckets``). ``None``:
            sized for this prompt's counts.
        size_buckets: prompt sizes per doubling of the global region that
            share one buffer layout (with ``cdf``): the buffers make room for
            what a prompt of the largest length of its bucket keeps, so
            requests of nearby lengths through one cache (``reset``) reuse its
            buffers and a compiled step's CUDA graphs. The price: the budgets
            of the bucket's extra blocks, which are under ``2^(1/n) - 1`` of
            the prompt's blocks (9% for 8). ``None``: 8 with ``reserve_tokens``
            (the graph-replayed path), else 0 (each length its own layout).
    """

    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, config: TCAConfig, keep_per_block: Sequence[int], link: CacheLink | None = None,
                 growth: float = 0.05, min_chunk_blocks: int = 4, reserve_tokens: int = 0,
                 backend: str = "auto", cdf: torch.Tensor | None = None, size_buckets: int | None = None) -> None:
        super().__init__()
        keep = torch.as_tensor(list(keep_per_block), dtype=torch.long)
        if keep.dim() != 1 or keep.numel() == 0 or (keep < 0).any() or (keep > config.block_size).any():
            raise ValueError(f"keep_per_block must list 0 <= t <= block_size={config.block_size} per KV "
                             f"head, got {keep.tolist()}")
        check_choice("backend", backend, DECODE_BACKENDS)
        check_count("min_chunk_blocks", min_chunk_blocks)
        if isinstance(reserve_tokens, bool) or not isinstance(reserve_tokens, int):
            raise ValueError(f"reserve_tokens must be an int >= 0 (new tokens to make room for), got "
                             f"{reserve_tokens!r}")
        if not 0.0 <= growth <= 10.0 or reserve_tokens < 0:
            raise ValueError(f"need 0 <= growth <= 10 and reserve_tokens >= 0, got {growth}, {reserve_tokens}")
        size_buckets = (8 if reserve_tokens else 0) if size_buckets is None else size_buckets
        if isinstance(size_buckets, bool) or not isinstance(size_buckets, int) or not 0 <= size_buckets <= 64:
            raise ValueError(f"size_buckets must be an int in [0, 64] (sizes per doubling; 0: none), got "
                             f"{size_buckets}")
        if cdf is not None and tuple(cdf.shape) != (keep.numel(), config.block_size + 1):
            raise ValueError(f"cdf must be [H_kv, block_size + 1] = [{keep.numel()}, {config.block_size + 1}], got "
                             f"{tuple(cdf.shape)}")
        # On the host: the buffers' sizes are Python ints (layout.py), and so is this bound.
        self.cdf = None if cdf is None else cdf.detach().to("cpu", torch.float64)
        self.size_buckets, self.anchor_blocks = size_buckets, config.anchor_blocks
        self._bounds: dict[int, list[int]] = {}
        # ``window``: the prefill's exact tail; ``compress_window``: how far behind the newest token a
        # block must lie before decode compresses it (the window plus ``grace_blocks``). The ring holds
        # every exact token up to it, plus the block being filled.
        self.window, self.block = config.window, config.block_size
        self.compress_window = config.compress_window
        self.ring = self.compress_window + config.block_size
        self.aggregation = config.gqa_aggregation
        self.num_observation_queries = config.num_observation_queries
        self.keep_host = keep
        self._keep_list = keep.tolist()
        self.reserve_tokens = reserve_tokens
        # A bool, read by transformers inside the compiled step: dynamo guards on its value, so
        # requests with other reserves reuse the step (guarding on the int would recompile).
        self._compileable = reserve_tokens > 0
        self.link = link
        self.growth, self.min_chunk_blocks, self.backend = growth, min_chunk_blocks, backend
        self._spare: dict[str, torch.Tensor] = {}  # the last request's buffers, kept by ``reset``
        self._clear()

    @property
    def is_compileable(self) -> bool:
        # transformers' generate compiles the decode step ("reduce-overhead": CUDA graphs) of a
        # compileable cache. Only with reserved room: without it the buffers re-lay every few
        # blocks, and each re-lay would re-record the graphs.
        return self._compileable

    def _clear(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.prefilled = False
        self._awaiting_prune = False
        self._chunk: tuple[torch.Tensor, torch.Tensor] | None = None
        self._token: tuple[torch.Tensor, torch.Tensor] | None = None  # see _append
        self._step_pending = False  # a decode token appended by update, not yet attended (abandon_step)
        self._seen = 0
        self._prepared = 0  # tokens of the next step ``_seen`` already counts (``prepare_decode_step``)
        self._grow_at = NEVER
        self.regrew = False  # see TCACache.regrew
        self.pads: list[int] = []
        self.prior: torch.Tensor | None = None

    # ----------------------------------------------------------- transformers API

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads, _, self.head_dim = key_states.shape
        if self.num_heads != self.keep_host.numel():
            raise ValueError(f"the cache layer was built for {self.keep_host.numel()} KV heads, "
                             f"the model gives {self.num_heads}")
        # Constants of the layer: made once per device, so a reset cache keeps their addresses too.
        if getattr(self, "keep", None) is None or self.keep.device != self.device:
            self.keep = self.keep_host.to(self.device)
            self._heads = torch.arange(self.num_heads, dtype=torch.int32, device=self.device)
            self._block_offsets = torch.arange(self.block, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill: returns the full K/V (the attention function prunes right after).
        Decode: appends one token per sequence and returns the flat buffers ``[B, S, D]``.
        A chunk of several tokens after the prefill: returns them; the attention
        function then runs ``chunk_step``, which stores them."""
        if self.link is not None and self.link.closed:
            raise RuntimeError("TCACache: the model this cache was made for had tca_flex.remove run on it (or was "
                               "applied again) since; a TCACache serves the applied model it was made for: make a "
                               "new tca_flex.TCACache(model)")
        if self._awaiting_prune:
            raise RuntimeError("TCACache: the previous prefill was never pruned. TCACache only works with a "
                               "model prepared by tca_flex.apply (attn_implementation 'tca')")
        if self._step_pending:
            raise RuntimeError("TCACache: the previous decode token never reached the TCA attention (decode_step "
                               "attends to it). TCACache only works with the model prepared by tca_flex.apply it "
                               "was made for (attn_implementation 'tca'); after an error inside a forward, start "
                               "again with a fresh cache")
        if self._chunk is not None:
            raise RuntimeError("TCACache: the previous chunk of new tokens never reached the TCA attention. "
                               "TCACache only works with a model prepared by tca_flex.apply (attn_implementation "
                               "'tca'); after an error inside a forward, start again with a fresh cache")
        if key_states.shape[-2] != 1:
            self._unprepare()  # a prepared one-token step that did not come (a chunk, or a new prefill, did)
        if not building_graph():
            self._leave_inference_mode()
        if not self.prefilled:
            self.lazy_initialization(key_states, value_states)
            self._awaiting_prune = True
            self._post(key_states)
            return key_states, value_states
        self._check_step(key_states)
        if key_states.shape[-2] != 1:
            self._chunk = (key_states.detach(), value_states.detach())  # the buffers keep no autograd history
            self._post(key_states)
            return key_states, value_states
        self._append(key_states, value_states)
        # The TCA attention reads the cache layer, not these tensors (the link matches them by
        # identity). Their last dim is S * D, not the head dim, so an attention that is not TCA's
        # (a plain model given this cache) fails on them instead of attending over flat buffers.
        keys, values = (t.view(t.shape[0], 1, 1, -1) for t in (self.keys, self.values))
        self._post(keys)
        return keys, values

    def _check_step(self, key_states: torch.Tensor) -> None:
        # Static checks (shapes, dtype): free under torch.compile, and clearer than a scatter's error.
        if key_states.shape[0] != self.batch_size:
            raise ValueError(f"TCACache holds {self.batch_size} rows but this call brings {key_states.shape[0]}: a "
                             "cache serves the batch it was prefilled with (generate expands beams and "
                             "num_return_sequences itself); use a new TCACache for another batch")
        if key_states.dtype != self.dtype:
            raise TypeError(f"TCACache holds {self.dtype} K/V but the model now gives {key_states.dtype} (its dtype "
                            "changed after the prefill): use a new TCACache, or keep the model's dtype")

    def append_only(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """A decode step's append with no attention after it (benchmarks that time the compression
        alone). Needs an append that writes at once (``append_kernel`` "math" or "triton")."""
        if self.append_kernel == "auto":
            raise ValueError("append_only needs append_kernel 'math' or 'triton' ('auto' may leave the token to "
                             "the attention's merge kernel)")
        self.update(key_states, value_states)
        self._step_pending = False

    def abandon_step(self) -> None:
        """Undo this layer's ``update`` of a step its attention then refused (a mask it cannot honour,
        dropout): the cache is as before the call, so the caller can fix the input and go on.

        A prefill not yet pruned leaves the layer empty again. A held chunk or token is dropped. A
        token the update already wrote took a slot that was free before it (``decode.token_slots``:
        its block left at the step before, or the ring was not full yet); that slot is freed again
        and the position taken back."""
        if self._awaiting_prune:
            self._clear()
            return
        self._unprepare()
        if self._chunk is not None:
            self._chunk = None
            return
        if not self._step_pending:
            return
        self._step_pending = False
        if self._token is not None:
            self._token = None
        else:
            self.next_pos -= 1
            self.owner.scatter_(1, token_slots(self.seg_start, self.next_pos, self.base, self.ring), -1)
        self._seen -= 1

    @property
    def chunk_pending(self) -> bool:
        """Whether ``update`` holds a chunk that ``chunk_step`` has to attend to and store."""
        return self._chunk is not None

    def _post(self, key: torch.Tensor) -> None:
        if self.link is not None:
            self.link.post(self, key)

    def get_seq_length(self) -> int:
        """Logical length: every token seen, kept or not (it drives positions). The token of a step
        the host prepared (``prepare_decode_step``) counts from its append on."""
        return self._seen - self._prepared

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Logical sizes, as for a dense cache. The decode kernel builds its own
        # mask from ``owner`` and does not use transformers' mask.
        return self.get_seq_length() + query_length, 0

    def prepare_decode_step(self) -> None:
        """Do the host's bookkeeping of the next one-token decode step before the step runs: grow the
        buffers if it needs room, and count its token.

        A compiled step whose ``_append`` reads and advances ``_seen`` takes it as an int input that
        changes every step, and CUDA-graph trees (``mode="reduce-overhead"``, what ``generate``
        compiles with) record graphs per distinct int input: such a step never replays a graph. With
        the bookkeeping done here, outside the compiled forward, the step reads only the constant
        ``_prepared`` (``apply`` makes ``generate`` call this through ``prepare_inputs_for_generation``).
        A prepared step that never ran (its forward failed before the append) is taken back first.
        """
        self._unprepare()
        self._leave_inference_mode()
        self._make_room()
        self._seen += 1
        self._prepared = 1

    def _leave_inference_mode(self) -> None:
        """Outside ``torch.inference_mode``, copy buffers made inside it into ordinary tensors.

        Tensors made in inference mode may not be updated in place outside it, and the cache updates
        its buffers in place: a cache filled under ``inference_mode`` and continued (or ``reset`` and
        reused) under ``no_grad`` would fail inside a kernel. Copied once, on the host, when a call
        first runs outside inference mode; ``k_buf`` is remade whenever any buffer is (allocation,
        re-lay, row selection), so it tells for all of them. The spare buffers of ``reset`` are
        handled where they are taken (``_filled``, ``_reused``)."""
        if (torch.is_inference_mode_enabled() or not self.prefilled or not self.k_buf.is_inference()):
            return
        for name in ("_heads", "_block_offsets", *self._REUSED, "prior"):
            tensor = getattr(self, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.is_inference():
                setattr(self, name, tensor.clone())
        self.segments = self.segments._replace(start=self.segments.start.clone(),
                                               length=self.segments.length.clone())
        self.keys, self.values = self.k_buf, self.v_buf
        self._static_for_graphs()

    def _unprepare(self) -> None:
        self._seen -= self._prepared
        self._prepared = 0

    def _make_room(self) -> None:
        """Re-lay the buffers if the next token would not fit."""
        if self._seen >= self._grow_at:
            self._grow()

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Empty the layer for a new request, keeping its buffers (as transformers' caches keep theirs).

        The next prefill whose buffers have the same sizes (same batch size, budgets, ``reserve_tokens``
        and size bucket of the prompt's length; nothing re-laid during the last request) refills them in place: their
        addresses stay, so a compiled decode step's CUDA graphs replay for the new request instead of
        being recorded again. Buffers of other sizes are freed by that prefill, before it allocates
        its own. Delete the cache to free them at once.
        """
        if self.prefilled:
            self._spare = {name: getattr(self, name) for name in self._REUSED}
            self._spare |= {"segments.start": self.segments.start, "segments.length": self.segments.length}
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("TCACache cannot crop: pruned tokens cannot be restored (assisted decoding "
                                  "and prompt-lookup are not supported; use a DynamicCache)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: rows follow their beams (each row keeps its own selection)."""
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(torch.as_tensor(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.prefilled:  # an empty cache has no rows to repeat (as transformers' own caches)
            self._select_rows(torch.arange(self.batch_size).repeat_interleave(repeats))

    # ------------------------------------------------------------- prefill

    def finish_prefill(self, key: torch.Tensor, value: torch.Tensor, selection: Selection | None,
                       pads: torch.Tensor | Sequence[int] | None = None) -> None:
        """Keep each head's global subset plus the final window of the prefill.

        Args:
            key, value: ``[B, H_kv, L, D]`` the full prefill K/V (RoPE applied).
            selection: the prefill's ``Selection``; ``None`` after a dense
                prefill (then everything before the window is kept).
            pads: leading padding tokens per row (a left-padded batch), ``None``
                for none. Row ``r`` then holds what it would alone, shifted by
                ``pads[r]``: its window is the last ``min(n_r, w)`` of its
                ``n_r = L - pads[r]`` tokens, its compression schedule its own,
                and no padding position is ever stored.
        """
        bsz, hkv, length, _ = key.shape
        dev = key.device
        pad_list = [0] * bsz if pads is None else [int(p) for p in (pads.tolist() if isinstance(pads, torch.Tensor)
                                                                  else pads)]
        if len(pad_list) != bsz or not all(0 <= p < length for p in pad_list):
            raise ValueError(f"pads must give 0 <= pad < {length} for each of the {bsz} rows, got {pad_list}")
        # Per row: the first position of its window (``base``), in padded coordinates.
        bases = [length - min(length - p, self.window) for p in pad_list]
        if selection is None:
            width = max(b - p for b, p in zip(bases, pad_list, strict=True))
            pad_t = torch.tensor(pad_list, device=dev)
            positions = (pad_t.view(bsz, 1, 1) + torch.arange(width, device=dev)).expand(bsz, hkv, width)
            counts = torch.tensor([b - p for b, p in zip(bases, pad_list, strict=True)], device=dev)
            counts = counts.view(bsz, 1).expand(bsz, hkv)
        else:
            positions, counts = selection.positions, selection.counts
        self._counts0 = counts.tolist()  # one sync per layer per prefill: sizes the buffers
        self.batch_size = bsz  # update() saw the packed row of a padded batch (unpad.py), not its rows
        self._base, self._seen, self.pads = bases, length, pad_list
        extra = -(-self.reserve_tokens // self.block) if self.reserve_tokens else 0
        room = self._counts0 if selection is None else self._room([length - p for p in pad_list])
        self._allocate(self._plan(room, extra), bsz)
        win = min(length, self.window)
        base_t = torch.tensor(bases, device=dev)
        ring_pos = torch.arange(length - win, length, device=dev).expand(bsz, hkv, win)
        in_window = (ring_pos >= base_t.view(bsz, 1, 1)).expand(bsz, hkv, win)
        ring_slot = self.seg_start[..., None] + (ring_pos - base_t.view(bsz, 1, 1)) % self.ring
        self._place(ring_pos, ring_slot, key, value, in_window)
        j = torch.arange(positions.shape[-1], device=dev)
        valid = j < counts[..., None]
        dst = self.seg_start[..., None] + self.ring + j
        self._place(positions.clamp(max=max(length - 1, 0)), dst, key, value, valid)
        self.var_len = self._reused("var_len", counts.to(dev, torch.long).clone(memory_format=torch.contiguous_format))
        self.base = self._reused("base", base_t)
        self.ncs = self._reused("ncs", base_t.clone())  # first position not yet compressed, per row
        self.next_pos = self._reused("next_pos", torch.tensor(length, device=dev))
        self._spare = {}  # what did not fit this request
        self.prefilled, self._awaiting_prune = True, False
        self._static_for_graphs()

    def _room(self, lengths: list[int]) -> list[list[int]]:
        """Global tokens to make room for, per row of ``lengths`` real tokens and KV head: at least the
        prompt's own counts, and with ``cdf`` what the budget ladder keeps over its bucket's size.

        Without a runtime guard (``guard_floor``), span (``span``) or partial block a head keeps exactly the
        ladder's total, whatever the prompt says; a partial last block can only keep fewer. So the layout,
        and with it the compiled step's sizes, depends on the length alone."""
        if self.cdf is None:
            return self._counts0
        rows = []
        for counts, n in zip(self._counts0, lengths, strict=True):
            blocks = bucket_blocks(global_blocks(n, self.window, self.block), self.size_buckets)
            if blocks not in self._bounds:
                self._bounds[blocks] = (budget_ladder(self.cdf, blocks, self.anchor_blocks).sum(-1).tolist() if blocks
                                        else [0] * len(counts))
            rows.append([max(c, u) for c, u in zip(counts, self._bounds[blocks], strict=True)])
        return rows

    def set_prior(self, scores: torch.Tensor) -> None:
        """Rank the tokens of the prefill's final window by ``scores`` when their blocks leave it.

        Normally a block that leaves the window keeps the top-``t`` tokens under
        the queries that push it out (``docs/chunked_prefill.md``). With a
        prior, every block that lies entirely in ``[0, P)`` keeps its top-``t``
        by ``scores`` instead (ties: the older token); blocks past it follow the
        usual rule. ``prefill_by_reconstruction`` sets the repeat pass's scores,
        so the whole first prompt is selected by one question-agnostic score.
        Dropped once the last such block has left. While one is pending, decode
        steps compress with the tensor form (not the Triton kernel).

        Args:
            scores: ``[B, H_kv, P]`` for positions ``0 .. P - 1``, ``P <=`` the tokens seen.
        """
        if not self.prefilled:
            raise RuntimeError("set_prior needs a prefilled cache layer")
        bsz, hkv = self.batch_size, self.num_heads
        if scores.dim() != 3 or tuple(scores.shape[:2]) != (bsz, hkv) or not 0 < scores.shape[-1] <= self._seen:
            raise ValueError(f"prior scores must be [{bsz}, {hkv}, P] with 0 < P <= {self._seen}, got "
                             f"{tuple(scores.shape)}")
        self.prior = scores.detach().to(self.device, torch.float32)
        self._drop_spent_prior()
        self._static_for_graphs()

    def _prior_pending(self) -> bool:
        """Whether a whole block of the prior's range has yet to leave the window (host ints)."""
        if self.prior is None:
            return False
        end = self.prior.shape[-1]
        return any(base + done * self.block + self.block <= end
                   for base, done in zip(self._base, self._done(self._seen), strict=True))

    def _drop_spent_prior(self) -> None:
        if not self._prior_pending():
            self.prior = None

    def _apply_prior(self, importance: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """``importance [B, H_kv, n * b]`` of ``n`` leaving blocks starting at ``starts`` (``[n]`` or ``[B, n]``),
        with the prior's scores on every block that lies entirely in its range."""
        bsz, hkv, width = importance.shape
        end = self.prior.shape[-1]
        starts = starts.expand(bsz, -1) if starts.dim() == 1 else starts
        pos = (starts.unsqueeze(-1) + self._block_offsets).view(bsz, 1, width).expand(bsz, hkv, width)
        covered = (starts + self.block <= end).repeat_interleave(self.block, dim=-1).view(bsz, 1, width)
        prior = self.prior.gather(-1, pos.clamp(max=end - 1))
        return torch.where(covered, prior.to(importance.dtype), importance)

    def _place(self, src_pos: torch.Tensor, dst: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               valid: torch.Tensor | None = None) -> None:
        """Copy ``key/value[b, h, src_pos]`` to slots ``dst`` (both ``[B, H_kv, n]``)."""
        bsz, hkv, n = src_pos.shape
        b_idx = torch.arange(bsz, device=key.device).view(bsz, 1, 1).expand(bsz, hkv, n)
        h_idx = torch.arange(hkv, device=key.device).view(1, hkv, 1).expand(bsz, hkv, n)
        if valid is not None:
            b_idx, h_idx, src_pos, dst = b_idx[valid], h_idx[valid], src_pos[valid], dst[valid]
        self.k_buf[b_idx, dst] = key[b_idx, h_idx, src_pos]
        self.v_buf[b_idx, dst] = value[b_idx, h_idx, src_pos]
        self.owner[b_idx, dst] = h_idx.to(torch.int32)
        self.pos[b_idx, dst] = src_pos.to(torch.int32)

    # ------------------------------------------------------------- storage (sizes: layout.py)

    def _done(self, seen: int) -> list[int]:
        """Blocks each row has compressed once every position ``< seen`` was decoded (rows of a padded
        batch have their own windows, so their own schedules)."""
        return [compressions_done(seen, base, self.compress_window, self.block) for base in self._base]

    def _packed_lengths(self) -> tuple[list[int], list[list[int]]]:
        done = self._done(self._seen)
        return done, [packed_lengths([row], self._keep_list, d)[0]
                      for row, d in zip(self._counts0, done, strict=True)]

    def _plan(self, var_len: list[list[int]], extra_blocks: int = 0) -> Layout:
        blocks = headroom_blocks(var_len, self._keep_list, self.ring, self.growth, self.min_chunk_blocks,
                                 extra_blocks)
        return plan(var_len, self._keep_list, self.ring, blocks)

    def _allocate(self, layout: Layout, bsz: int) -> None:
        # zeros, not empty: the branch-free compression reads ring slots that
        # may not hold a token yet and writes them back unchanged.
        shape = (bsz, layout.slots, self.head_dim)
        self.k_buf = self._filled("k_buf", shape, 0, self.dtype)
        self.v_buf = self._filled("v_buf", shape, 0, self.dtype)
        self.owner = self._filled("owner", shape[:2], -1, torch.int32)
        self.pos = self._filled("pos", shape[:2], -1, torch.int32)
        self._set_layout(layout)

    # The buffers ``reset`` keeps for the next request (``_filled``, ``_reused``).
    _REUSED = ("k_buf", "v_buf", "owner", "pos", "seg_start", "var_len", "base", "ncs", "next_pos")

    def _filled(self, name: str, shape: tuple[int, ...], fill: int, dtype: torch.dtype) -> torch.Tensor:
        """A ``shape`` buffer full of ``fill``: the spare one of that name where it fits, else a new one
        (the spare is let go first, so the two never coexist)."""
        old = self._spare.pop(name, None)
        if (old is not None and tuple(old.shape) == shape and old.dtype == dtype and old.device == self.device
                and _writable(old)):
            return old.fill_(fill)
        old = None
        return torch.full(shape, fill, dtype=dtype, device=self.device)

    def _reused(self, name: str, new: torch.Tensor) -> torch.Tensor:
        """``new``, copied into the spare tensor of that name where it fits (same address as before)."""
        old = self._spare.pop(name, None)
        if (old is not None and old.shape == new.shape and old.dtype == new.dtype and old.device == new.device
                and _writable(old)):
            return old.copy_(new)
        return new

    def _set_layout(self, layout: Layout) -> None:
        self.layout = layout
        self.seg_start = self._reused("seg_start", torch.tensor(layout.starts, dtype=torch.long, device=self.device))
        seg_len = [[self.ring + c for c in row] for row in layout.var_cap]
        self.segments = Segments(self._reused("segments.start", self.seg_start.to(torch.int32)),
                                 self._reused("segments.length", torch.tensor(seg_len, dtype=torch.int32,
                                                                              device=self.device)),
                                 max(map(max, seg_len)), sum(map(sum, seg_len)))
        self.keys, self.values = self.k_buf, self.v_buf
        self._refresh_grow_at()

    def _refresh_grow_at(self) -> None:
        done, var_len = self._packed_lengths()
        self._grow_at = min(next_growth(self.layout.rows([r]), [var_len[r]], self._keep_list, done[r],
                                        self._base[r], self.compress_window, self.block) for r in range(len(done)))

    def _grow(self, var_len: list[list[int]] | None = None) -> None:
        """Re-lay the buffers with room for ``var_len`` packed tokens (default: what is packed now) plus
        fresh headroom (once per chunk of compressed blocks; no host sync)."""
        new = self._plan(self._packed_lengths()[1] if var_len is None else var_len)
        src, valid = slot_map(self.layout, new, self.ring, self.device)
        idx = src.unsqueeze(-1).expand(-1, -1, self.head_dim)
        self.k_buf = torch.where(valid.unsqueeze(-1), self.k_buf.gather(1, idx), 0)
        self.v_buf = torch.where(valid.unsqueeze(-1), self.v_buf.gather(1, idx), 0)
        self.owner = torch.where(valid, self.owner.gather(1, src), -1)
        self.pos = torch.where(valid, self.pos.gather(1, src), -1)
        self._set_layout(new)
        self._static_for_graphs()
        # Written, never read, inside a compiled step: dynamo replays the store and guards on nothing.
        self.regrew = True

    def _select_rows(self, rows: torch.Tensor) -> None:
        if not self.prefilled:
            return
        order = [int(r) for r in rows.tolist()]
        rows = rows.to(self.device)
        for name in ("k_buf", "v_buf", "owner", "pos", "var_len", "base", "ncs"):
            setattr(self, name, getattr(self, name).index_select(0, rows))
        if self.prior is not None:
            self.prior = self.prior.index_select(0, rows)
        self._counts0 = [self._counts0[r] for r in order]
        self._base = [self._base[r] for r in order]
        self.pads = [self.pads[r] for r in order]
        self.batch_size = len(order)
        self._set_layout(self.layout.rows(order))
        self._static_for_graphs()

    def mark_static(self) -> None:
        """Mark the buffers as static addresses (for CUDA graphs); outside compile, after the prefill.

        A layer with ``reserve_tokens`` does this itself each time its buffers
        are made. Unguarded: dynamo does not recompile for a new cache or a
        re-lay of this one; CUDA-graph trees record new graphs for the new
        addresses. Reserve capacity (``reserve_tokens``) so a generation does
        not re-lay.
        """
        for t in (self.k_buf, self.v_buf, self.owner, self.pos, self.var_len, self.ncs, self.next_pos,
                  self.seg_start, self.base, self.segments.start, self.segments.length, self.prior):
            if t is not None:  # no prior: no reconstruction pending
                torch._dynamo.mark_static_address(t, guard=False)

    def _static_for_graphs(self) -> None:
        # A compileable layer's buffers, each time they are (re)made: CUDA-graph trees replay a step
        # that updates them in place only if their addresses are static (else they skip the graphs).
        # Unguarded, so a new cache re-records graphs; it does not recompile.
        # Not while tracing (a growth inside a compiled step): those buffers stay unmarked and the
        # step runs compiled, without graphs, until the next re-lay outside a trace.
        if self.is_compileable and not torch.compiler.is_compiling():
            self.mark_static()
            # The slot count differs per request: a compiled step takes it symbolic from its first
            # compile, instead of compiling again at the second prompt length.
            for t in (self.k_buf, self.v_buf, self.owner, self.pos):
                torch._dynamo.maybe_mark_dynamic(t, 1)
            if self.prior is not None:
                torch._dynamo.maybe_mark_dynamic(self.prior, 2)

    # ------------------------------------------------------------- decode

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write the new token of every (row, head) into its ring slot.

        With ``append_kernel`` "auto" on the ``"triton"`` decode backend the token waits for
        ``decode_step``, whose merge kernel attends to it and writes it (attention first: one
        launch fewer a layer and step, ``triton_decode._append_token``). Otherwise now: the Triton
        kernel (``decode.append_token``) where it runs, else the tensor form
        (``decode.append_token_math``), which is the reference of both.
        """
        prepared, self._prepared = self._prepared, 0  # the host did the bookkeeping (prepare_decode_step)
        if not prepared:
            self._make_room()
        # The key stands in for the step's query in the backend rule: same device, dtype and head dim.
        fused = self._fused(self.append_kernel, key_states)
        if fused and self.append_kernel == "auto":
            self._token = (key_states.detach(), value_states.detach())
        else:
            append = append_token if fused else append_token_math
            append(key_states, value_states, self.k_buf, self.v_buf, self.owner, self.pos, self.seg_start,
                   self.next_pos, self.base, ring=self.ring, heads=self._heads)
        if not prepared:
            self._seen += 1
        self._step_pending = True

    # Kernels of the per-step cache updates, the block compression and the append: "auto" (the
    # Triton kernel wherever the decode attention runs the "triton" backend, else tensor ops; for
    # the append, the attention's merge kernel), "triton" (the append's own kernel) or "math" (the
    # tensor ops of ``compress`` / ``decode.append_token_math``, the reference). Set per layer, or on
    # every layer with ``TCACache.set_compression`` / ``set_append``.
    KERNELS = ("auto", "triton", "math")
    COMPRESSIONS = APPENDS = KERNELS
    compression = "auto"
    append_kernel = "auto"
    # Set while a CUDA graph is captured (``TCACache.graph_capture``): True keeps the compression
    # in the step, False leaves it out; None decides per step (eager) or keeps it (captured).
    assume_leaves: bool | None = None

    def decode_step(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of the newest token over the kept set, then compression.

        Args:
            query: ``[B, H_q, 1, D]`` (call after ``update`` took its key).
            scale: softmax scale.

        Returns:
            ``[B, H_q, 1, D]``.
        """
        group = query.shape[1] // self.num_heads
        live = LiveRanges(self.var_len, self.next_pos, self.base, self.ring)
        token = None if self._token is None else NewToken(*self._token, self.pos)
        self._token = None
        self._step_pending = False
        out, lse = decode_attention(query, self.k_buf, self.v_buf, self.owner, group=group, scale=scale,
                                    backend=self.backend, segments=self.segments, live=live, token=token)
        if self._host_knows_no_block_leaves():
            return out
        self.compress(query, lse, scale)
        return out

    def _host_knows_no_block_leaves(self) -> bool:
        """Eager decode skips the compression on the ``b - 1`` of every ``b`` steps where no block
        leaves the window (decided from Python ints: no sync). Compiled or captured steps keep it
        (the Triton kernel exits at once on those steps, the tensor form is branch-free), so one
        graph serves every step, unless ``TCACache.graph_capture`` says which of two graphs this is."""
        if self.assume_leaves is not None:
            return not self.assume_leaves
        if building_graph():
            return False
        return self._done(self._seen) == self._done(self._seen - 1)

    def _fused_compression(self, query: torch.Tensor) -> bool:
        return self._fused(self.compression, query)

    def _fused(self, kernel: str, probe: torch.Tensor) -> bool:
        """Whether the Triton kernel runs for setting ``kernel``, decided as the decode backend is for
        ``probe`` (the step's query, or a tensor of its device, dtype and head dim)."""
        check_choice("kernel", kernel, self.KERNELS)
        if kernel == "auto":
            return resolve_backend(probe, self.segments, self.backend) == "triton"
        if kernel == "triton":
            resolve_backend(probe, self.segments, "triton")  # raises where the kernel cannot run
        return kernel == "triton"

    def compress(self, query: torch.Tensor, lse: torch.Tensor, scale: float) -> None:
        """Moves the top-t of the oldest exact block once it lies ``grace_blocks`` blocks past the window
        (``compress_window`` tokens behind the newest; else a no-op).

        The Triton kernel (``decode.compress_block``) where it runs; otherwise
        the branch-free tensor form below, which is also its reference.
        """
        if self._fused_compression(query) and not self._prior_pending():
            compress_block(query, lse, self.k_buf, self.v_buf, self.owner, self.pos, self.seg_start, self.var_len,
                           self.keep, self.ncs, self.next_pos, self.base, window=self.compress_window, block=self.block,
                           scale=scale, aggregation=self.aggregation)
            return
        bsz, hkv, d = self.k_buf.shape[0], self.num_heads, self.head_dim
        newest = self.next_pos - 1
        do = (newest - self.compress_window + 1 - self.ncs >= self.block).view(bsz, 1, 1)  # per row
        ring_slots = self.seg_start.unsqueeze(-1) + ((self.ncs - self.base).view(bsz, 1, 1)
                                                     + self._block_offsets) % self.ring
        flat = ring_slots.view(bsz, -1)
        k_blk = self.k_buf.gather(1, flat.unsqueeze(-1).expand(-1, -1, d))
        v_blk = self.v_buf.gather(1, flat.unsqueeze(-1).expand(-1, -1, d))
        k_heads = k_blk.view(bsz, hkv, self.block, d)
        importance = block_importance(query, k_heads, lse, scale, self.aggregation)
        if self.prior is not None:
            importance = self._apply_prior(importance, self.ncs.view(bsz, 1))
        keep = top_t_in_block(importance, self.keep)
        var_end = self.seg_start + self.ring + self.var_len
        dst = compress_targets(keep, ring_slots, var_end, do).view(bsz, -1)
        self.k_buf.scatter_(1, dst.unsqueeze(-1).expand(-1, -1, d), k_blk)
        self.v_buf.scatter_(1, dst.unsqueeze(-1).expand(-1, -1, d), v_blk)
        self.pos.scatter_(1, dst, self.pos.gather(1, flat))
        # Free the block's ring slots, then let the moved tokens claim their new ones.
        self.owner.scatter_(1, flat, torch.where(do.view(bsz, 1), -1, self.owner.gather(1, flat)))
        moved = (keep & do).view(bsz, -1)
        heads = self._heads.view(1, hkv, 1).expand(bsz, hkv, self.block).reshape(bsz, -1)
        self.owner.scatter_(1, dst, torch.where(moved, heads, self.owner.gather(1, dst)))
        # add_, not +=: an augmented assignment also stores the attribute, which a compiled step
        # returns from its graph and sets again after every call.
        self.var_len.add_(torch.where(do.view(bsz, 1), self.keep, 0))
        self.ncs.add_(torch.where(do.view(bsz), self.block, 0))
        if self.prior is not None:
            self._drop_spent_prior()

    # ------------------------------------------------------------- chunks (docs/chunked_prefill.md)

    @torch.no_grad()
    def chunk_step(self, query: torch.Tensor, scale: float,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of a chunk of new tokens over the kept set plus the chunk, then compression.

        The chunk is the K/V the last ``update`` received. Blocks that leave the
        window during the chunk keep each head's top-``t`` tokens, scored by the
        chunk's last ``num_observation_queries`` queries; the rest of the chunk
        joins the ring. With one token this is the decode step's rule.

        Args:
            query: ``[B, H_q, c, D]`` (RoPE applied).
            scale: softmax scale.
            attention_mask: transformers' mask for the chunk; only the plain
                causal mask is accepted (``ValueError`` for padding).

        Returns:
            ``[B, H_q, c, D]``, detached (inference only, like the rest of the cache).
        """
        if self._chunk is None:
            raise RuntimeError("chunk_step needs a chunk: call update with the new keys and values first")
        (key, value), self._chunk = self._chunk, None  # a refused mask leaves the cache as it was
        check_chunk_mask(attention_mask, self._seen, self.pads)
        if len(set(self._base)) > 1:
            raise ValueError("TCACache: new tokens on top of a padded batch need every row's first prompt (its "
                             f"prefill) at least as long as the window ({self.window} tokens) after its padding, "
                             "however long the row has grown since (the rows' windows, hence their compression "
                             "schedules, differ otherwise); continue the shorter rows separately, or prefill them "
                             "with longer prompts")
        base = self._base[0]
        n, c = self._seen, key.shape[-2]
        done = compressions_done(n, base, self.compress_window, self.block)
        done_after = compressions_done(n + c, base, self.compress_window, self.block)
        needed = packed_lengths(self._counts0, self._keep_list, done_after)
        if any(v > cap for row, caps in zip(needed, self.layout.var_cap, strict=True)
               for v, cap in zip(row, caps, strict=True)):
            self._grow(needed)
        past = gather_segments(self.k_buf, self.v_buf, self.owner, self.seg_start, self.segments.max_length)
        query = query.detach()
        # FlexAttention on CUDA (work follows the kept tokens); the tensor-op reference elsewhere.
        attend = flex_chunk_attention if query.is_cuda and query.dtype != torch.float64 else chunk_attention
        out, lse = attend(query, *past, key, value, scale)
        ncs = base + done * self.block
        if done_after > done:
            self._compress_chunk(query, lse, key, value, scale, n, ncs, (done_after - done) * self.block, base)
        # The chunk's tokens from ``first`` on have not left the window: they join the ring.
        self._write_ring(key, value, n, max(n, base + done_after * self.block), base)
        self.next_pos += c
        self.ncs += (done_after - done) * self.block
        self._seen += c
        self._refresh_grow_at()
        if self.prior is not None:
            self._drop_spent_prior()
        return out

    def _write_ring(self, key: torch.Tensor, value: torch.Tensor, n: int, first: int, base: int) -> None:
        """Store the chunk's tokens at positions ``[first, n + c)`` in their ring slots."""
        bsz, hkv, c, d = key.shape
        stay = torch.arange(first, n + c, device=self.device)
        slots = (self.seg_start.unsqueeze(-1) + (stay - base) % self.ring).view(bsz, -1)
        idx = slots.unsqueeze(-1).expand(-1, -1, d)
        self.k_buf.scatter_(1, idx, key[:, :, first - n:].reshape(bsz, -1, d))
        self.v_buf.scatter_(1, idx, value[:, :, first - n:].reshape(bsz, -1, d))
        self.owner.scatter_(1, slots, self._heads.view(1, hkv, 1).expand(bsz, hkv, stay.numel()).reshape(bsz, -1))
        self.pos.scatter_(1, slots, stay.to(torch.int32).expand(bsz, hkv, -1).reshape(bsz, -1))

    def _compress_chunk(self, query: torch.Tensor, lse: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        scale: float, n: int, ncs: int, count: int, base: int) -> None:
        """Keep the top-``t`` of every block in ``[ncs, ncs + count)``, packed after each head's packed region.

        The leaving tokens come from the ring (positions ``< n``) or from the
        chunk. Each (row, head) packs exactly ``blocks * t`` tokens; the scatter
        is rectangular: columns past a head's count repeat its last kept token
        (same slot, same data), and a head with ``t = 0`` writes its first ring
        slot back unchanged.
        """
        bsz, hkv, d, c = self.batch_size, self.num_heads, self.head_dim, key.shape[-2]
        positions = torch.arange(ncs, ncs + count, device=self.device)
        ring_slots = self.seg_start.unsqueeze(-1) + (positions - base) % self.ring  # [B, H_kv, count]
        from_ring = (positions < n).view(1, 1, count, 1)
        in_chunk = (positions - n).clamp(min=0).view(1, 1, count, 1).expand(bsz, hkv, count, d)
        rows = ring_slots.view(bsz, -1, 1).expand(-1, -1, d)
        k_leave = torch.where(from_ring, self.k_buf.gather(1, rows).view(bsz, hkv, count, d), key.gather(2, in_chunk))
        v_leave = torch.where(from_ring, self.v_buf.gather(1, rows).view(bsz, hkv, count, d),
                              value.gather(2, in_chunk))
        obs = min(self.num_observation_queries, c)
        sees = positions[None, :] <= torch.arange(n + c - obs, n + c, device=self.device)[:, None]
        importance = leaving_importance(query[:, :, c - obs:], k_leave, lse[:, :, c - obs:], sees, scale,
                                        self.aggregation)
        if self.prior is not None:
            importance = self._apply_prior(importance, positions[::self.block])
        keep = rank_of(importance.view(bsz, hkv, -1, self.block)) < self.keep.view(1, hkv, 1, 1)
        keep = keep.view(bsz, hkv, count)
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices  # kept first, oldest first
        per_head = (count // self.block) * self.keep  # [H_kv]
        width = (count // self.block) * max(self._keep_list)
        if width:
            col = torch.minimum(torch.arange(width, device=self.device), (per_head - 1).clamp(min=0)[:, None])
            col = col.expand(bsz, hkv, width)
            src = order.gather(-1, col)
            real = (per_head > 0).view(1, hkv, 1)
            packed = (self.seg_start + self.ring + self.var_len).unsqueeze(-1) + col
            dst = torch.where(real, packed, self.seg_start.unsqueeze(-1)).view(bsz, -1)
            idx = dst.unsqueeze(-1).expand(-1, -1, d)
            k_new = k_leave.gather(2, src.unsqueeze(-1).expand(-1, -1, -1, d)).view(bsz, -1, d)
            v_new = v_leave.gather(2, src.unsqueeze(-1).expand(-1, -1, -1, d)).view(bsz, -1, d)
            real_f = real.expand(bsz, hkv, width).reshape(bsz, -1)
            self.k_buf.scatter_(1, idx, torch.where(real_f.unsqueeze(-1), k_new, self.k_buf.gather(1, idx)))
            self.v_buf.scatter_(1, idx, torch.where(real_f.unsqueeze(-1), v_new, self.v_buf.gather(1, idx)))
            new_pos = positions.to(torch.int32)[src].view(bsz, -1)
            self.pos.scatter_(1, dst, torch.where(real_f, new_pos, self.pos.gather(1, dst)))
            heads = self._heads.view(1, hkv, 1).expand(bsz, hkv, width).reshape(bsz, -1)
            self.owner.scatter_(1, dst, torch.where(real_f, heads, self.owner.gather(1, dst)))
        # Free the ring slots of leaving tokens that were in the ring (the chunk's own never got one).
        in_ring = min(max(n - ncs, 0), count)
        if in_ring:
            freed = ring_slots[..., :in_ring].reshape(bsz, -1)
            self.owner.scatter_(1, freed, torch.full_like(freed, -1, dtype=self.owner.dtype))
        self.var_len += per_head

    # ------------------------------------------------------------- CUDA-graph replay (host bookkeeping)

    def block_leaves_at(self, seen: int) -> bool:
        """Whether the step that appends token ``seen`` (0-based) compresses a block."""
        return self._done(seen + 1) != self._done(seen)

    def _steps_before_growth(self) -> int:
        return self._grow_at - self._seen

    # ------------------------------------------------------------- observability

    def kept_positions(self, row: int, head: int) -> torch.Tensor:
        """Sorted int64 positions that (row, KV head) keeps (for tests and inspection)."""
        live = self.owner[row] == head
        return self.pos[row][live].long().sort().values

    def memory(self) -> LayerMemory:
        """Bytes this layer holds vs a dense cache of the same logical length."""
        if not self.prefilled:  # after ``reset``: the buffers it keeps for the next request
            return LayerMemory(0, 0, 0, sum(t.numel() * t.element_size() for t in self._spare.values()), 0)
        bsz, slots, d = self.k_buf.shape
        token_bytes = 2 * d * self.k_buf.element_size()
        index_bytes = sum(t.numel() * t.element_size() for t in (self.owner, self.pos))
        used = 2 * self.k_buf.numel() * self.k_buf.element_size() + index_bytes
        return LayerMemory(kept_tokens=int((self.owner >= 0).sum()),
                           dense_tokens=bsz * self.num_heads * self._seen, slots=bsz * slots,
                           bytes_used=used, bytes_per_token=token_bytes)


class TCACache(Cache):
    """A transformers ``Cache`` that keeps only what TCA selects (one ``TCACacheLayer`` per layer).

    Pass it to ``generate`` or ``forward`` of a model prepared by ``tca_flex.apply``::

        out = model.generate(ids, cache=tca_flex.TCACache(model), max_new_tokens=64)  # or past_key_values=

    transformers offers no sanctioned hook to change the default cache class
    of ``generate`` (it builds a ``DynamicCache`` itself), so the cache is
    passed explicitly; with a ``DynamicCache`` decode runs dense over the
    full cache, as before. Supported: greedy/sampling, beam search
    (``reorder_cache``), batches of unpadded sequences (each row its own
    selection), left-padded batches of different lengths (``generate`` with
    ``attention_mask``: each row keeps, compresses and decodes exactly what it
    would alone, shifted by its padding; no padding token is stored),
    multi-turn conversations (pass the same cache to the next ``generate``
    with the conversation plus the new message) and chunked prefill
    (``tca_flex.chunked_prefill``): chunks of new tokens follow
    ``docs/chunked_prefill.md`` (on a padded batch, only when every row fills
    the window). Not supported (clear errors): right padding or any mask
    with holes, ``crop`` (assisted decoding, prompt lookup).

    For a stream of requests, keep one cache and call ``reset()`` before each:
    a request of the sizes of the last one refills its buffers in place, so a
    compiled ``generate`` replays the CUDA graphs it recorded instead of
    recording them again (``TCACacheLayer.reset``).

    Args:
        model: a model prepared by ``tca_flex.apply``.
        growth, min_chunk_blocks, reserve_tokens, backend, size_buckets: see ``TCACacheLayer``.
    """

    def __init__(self, model: torch.nn.Module, *, growth: float = 0.05, min_chunk_blocks: int = 4,
                 reserve_tokens: int = 0, backend: str = "auto", size_buckets: int | None = None) -> None:
        records = tca_layers(model)
        if not records:
            raise ValueError("TCACache(model): this model was not prepared by tca_flex.apply; "
                             "call tca_flex.apply(model) first")
        layers = [TCACacheLayer(record.config, record.keep_per_block, link=record.link, growth=growth,
                                min_chunk_blocks=min_chunk_blocks, reserve_tokens=reserve_tokens, backend=backend,
                                cdf=record.cdf, size_buckets=size_buckets)
                  for record in records]
        super().__init__(layers=layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx >= len(self.layers):  # a model with more layers than the one the cache was made for
            raise ValueError(f"TCACache was made for a model of {len(self.layers)} TCA layers, this model has "
                             f"more (layer {layer_idx}): make a new tca_flex.TCACache(model) for the model you run")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a model this cache was not made for, before its call runs (the forward and
        ``generate`` wrappers ``apply`` puts on the model call it, outside compiled graphs): another
        applied model's attention would not find this cache's layers and run as if it had no cache."""
        link = model_link(model)
        if link is not None and self.layers and self.layers[0].link is not link:
            raise ValueError("this TCACache was made for another model (or for this one before tca_flex.remove or "
                             "a second apply): a cache serves the applied model it was made for; make a new "
                             "tca_flex.TCACache(model) for the model you run")

    def mark_static(self) -> None:
        """``TCACacheLayer.mark_static`` on every layer (CUDA graphs)."""
        for layer in self.layers:
            layer.mark_static()

    @property
    def regrew(self) -> bool:
        """Whether any layer re-laid its buffers after the prefill (decode or a later chunk outgrew
        the reserve and headroom). Under a compiled ``generate`` the step's CUDA graphs were recorded
        again for the new buffers (and a compiled step without ``prepare_decode_step`` compiled again
        and ran on without graphs): a server can log it and raise ``reserve_tokens``."""
        return any(layer.regrew for layer in self.layers)

    def memory_report(self) -> MemoryReport:
        """Bytes kept per layer and in total vs a dense cache of the same logical length."""
        return MemoryReport(layers=[layer.memory() for layer in self.layers])

    def set_compression(self, kernel: str) -> None:
        """Block compression on every layer: ``"auto"``, ``"triton"`` or ``"math"`` (``TCACacheLayer.compression``)."""
        check_choice("compression", kernel, TCACacheLayer.COMPRESSIONS)
        for layer in self.layers:
            layer.compression = kernel

    def set_append(self, kernel: str) -> None:
        """The decode step's append on every layer: ``"auto"``, ``"triton"`` or ``"math"``
        (``TCACacheLayer.append_kernel``)."""
        check_choice("append", kernel, TCACacheLayer.APPENDS)
        for layer in self.layers:
            layer.append_kernel = kernel

    # CUDA graphs: a replay runs the device work of one captured step, never the Python, so the
    # host's counters (what ``_seen`` drives: growth, which steps compress) are advanced here.

    def block_leaves_next(self) -> bool:
        """Whether the next decode step compresses a block (host ints, no sync; the same for every layer)."""
        return self.layers[0].block_leaves_at(self.layers[0].get_seq_length())

    def replayable_steps(self) -> int:
        """Decode steps a captured graph may still be replayed before a layer must grow its buffers
        (replays cannot grow them: reserve capacity with ``reserve_tokens``)."""
        return min(layer._steps_before_growth() for layer in self.layers)

    @contextlib.contextmanager
    def graph_capture(self, compress: bool | None = None) -> Iterator[None]:
        """Around the capture of one decode step in a CUDA graph.

        Args:
            compress: ``None``: the step keeps the block compression, which
                decides on the device whether a block leaves (one graph for
                every step). ``True`` / ``False``: with / without it; replay
                the graph without it on the steps where ``block_leaves_next()``
                is False, the other one where it is True (two graphs, no
                compression cost on the ``b - 1`` steps in ``b`` where none leaves).

        The Python of the captured step runs once but its device work does not,
        so the host counters are put back on exit; call ``replayed()`` after
        each replay.
        """
        if self.replayable_steps() < 1:
            raise RuntimeError("TCACache: the captured step would grow the cache; create it with a larger "
                               "reserve_tokens")
        seen = [layer._seen for layer in self.layers]
        for layer in self.layers:
            layer.assume_leaves = compress if compress is not None else True
        try:
            yield
        finally:
            for layer, n in zip(self.layers, seen, strict=True):
                layer._seen, layer.assume_leaves = n, None

    def prepare_decode_step(self) -> None:
        """``TCACacheLayer.prepare_decode_step`` on every layer, when the next step decodes one token
        over a prefilled cache (else nothing to prepare)."""
        if all(layer.prefilled and not layer.chunk_pending for layer in self.layers):
            # Only a reserved cache's first re-lay of a request is news (an eager cache grows by design).
            watch = self.is_compileable and not self.regrew
            for layer in self.layers:
                layer.prepare_decode_step()
            if watch and self.regrew:
                # Once a request (reset clears regrew); a constant text, so Python's default filter
                # shows it once a process to a server that keeps a short reserve on purpose.
                warnings.warn(f"TCACache: decode outgrew the room reserve_tokens={self.layers[0].reserve_tokens} "
                              "left after the prefill: every layer re-laid its buffers, so a compiled step's CUDA "
                              "graphs are recorded again for the new ones (a slow step, and memory for both sets "
                              "of graphs). Make the cache with reserve_tokens >= max_new_tokens (cache.regrew "
                              "tells after each request)", UserWarning, stacklevel=2)

    def replayed(self, steps: int = 1) -> None:
        """Advance the host counters by ``steps`` replayed decode steps."""
        if steps > self.replayable_steps():
            raise RuntimeError(f"TCACache: {steps} replayed steps pass the cache's capacity "
                               f"({self.replayable_steps()} left): reserve more tokens")
        for layer in self.layers:
            layer._seen += steps
