"""The attention function transformers calls: TCA prefill, dense otherwise.

Dispatch per call:
- a fresh prefill longer than ``config.dense_up_to`` runs TCA
  (``tca_prefill_attention``);
- shorter prefills, decode and prefills on top of an existing cache run
  transformers' own SDPA attention, so they equal dense exactly;
- with a ``TCACache``, the cache layer that ``update`` just used waits on the
  module's ``CacheLink``: after a prefill it is pruned to the selection, a
  decode step attends over its kept set (``cache.py``), and so does a chunk
  of several new tokens (``docs/chunked_prefill.md``).
"""

from __future__ import annotations

import functools
import itertools
import json
import warnings
from typing import Any

import torch
from torch.nn.attention.flex_attention import flex_attention
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .chunks import AcceptedMask, building_graph, is_causal_left_padded
from .compile import kernel_options_for, length_generic, output_and_lse_if, prefill_kernel_options
from .config import TCAConfig
from .layer import TCALayer, tca_layer
from .masks import KERNEL_BLOCK, key_positions, packed_block_mask, tca_block_indices, tiled, whole_tiles
from .selection import PAD_POSITION, Selection, observed_queries, select

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tca_select(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, cdf_hk: torch.Tensor, config: TCAConfig,
               scaling: float, observed: bool = False) -> Selection:
    """``select`` with every knob taken from ``config`` (shapes as in ``tca_prefill_attention``)."""
    return select(q_bhsd, k_bhsd, cdf_hk, config.selection, scaling=scaling, capacity_multiple=KERNEL_BLOCK,
                  observed=observed)


def _select_positions(q_obs: torch.Tensor, k_bhsd: torch.Tensor, cdf_hk: torch.Tensor, config: TCAConfig,
                      scaling: float, q_cache: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The selection's ``(positions, counts)`` from the observation queries' rows (``observed_queries``),
    the packed mask's ``masks.key_positions`` table for the prompt padded to whole tiles, and the
    ``(positions, counts)`` the pruned cache keeps: the same, or, with ``q_cache`` (the rows of
    ``config.cache_selection``'s observation queries), that selection's.

    The table is made here, in the selection's graph, so that it enters the attention's graph
    as an input (``masks.table_mask_mod``) at no extra host cost: built eagerly between the
    two graphs, its few small ops delayed the attention kernel's launch (32K, H200). The
    cache's selection joins the same graph for the same reason.
    """
    sel = tca_select(q_obs, k_bhsd, cdf_hk, config, scaling, observed=True)
    padded = whole_tiles(k_bhsd.shape[2])
    table = key_positions(sel.positions, padded)
    knobs = config.cache_selection
    if (q_cache is None) != (knobs is None):
        raise ValueError("q_cache must be cache_queries(q, config): the rows of config.cache_selection's "
                         "observation queries, None without one")
    if knobs is None:
        return sel.positions, sel.counts, table, sel.positions, sel.counts
    kept = select(q_cache, k_bhsd, cdf_hk, knobs, scaling=scaling, capacity_multiple=KERNEL_BLOCK, observed=True)
    return sel.positions, sel.counts, table, kept.positions, kept.counts


def cache_queries(q_bhsd: torch.Tensor, config: TCAConfig) -> torch.Tensor | None:
    """The observation queries' rows of the cache's own selection (``observed_queries``), or ``None`` where the
    cache keeps the prefill's (``config.cache_selection`` is None)."""
    knobs = config.cache_selection
    return None if knobs is None else observed_queries(q_bhsd, knobs.num_queries, knobs.num_spread, knobs.window)


def cache_selection(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, cdf_hk: torch.Tensor, config: TCAConfig,
                    scaling: float) -> Selection:
    """What the pruned cache keeps of a prompt: ``config.cache_selection``'s choice, or, without one, the
    prefill's (``tca_select``). The eager form of what ``tca_prefill_attention`` returns for the cache."""
    knobs = config.cache_selection or config.selection
    return select(q_bhsd, k_bhsd, cdf_hk, knobs, scaling=scaling, capacity_multiple=KERNEL_BLOCK)


def _packed_attention(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor, positions: torch.Tensor,
                      table: torch.Tensor | None, window: int, scaling: float, return_lse: bool,
                      kernel_options: dict[str, Any] | None) -> Any:
    """Gather the packed keys, build the BlockMask, run FlexAttention (one graph).

    Takes the prefill padded to whole ``KERNEL_BLOCK`` tiles (``masks.tiled``), with
    the sequence dimension either flat or split as ``[..., n, KERNEL_BLOCK, ...]``
    (``positions`` likewise). Split, both lengths are multiples of the tile
    *as symbolic sizes*, so the one graph compiled for every prompt length still
    gets FlexAttention's unmasked-load Triton kernel (``IS_DIVISIBLE``). Padding
    queries sit after the real ones and padding keys after every real query,
    so no real query sees them. ``table``: the mask's ``masks.key_positions``,
    made outside this graph (``None`` inside a caller's graph: ``masks.capacity_mask_mod``).
    """
    if q_bhsd.dim() == 5:
        q_bhsd, k_bhsd, v_bhsd = (t.flatten(2, 3) for t in (q_bhsd, k_bhsd, v_bhsd))
        positions = positions.flatten(-2)
    hq, length, d = q_bhsd.shape[1], q_bhsd.shape[2], q_bhsd.shape[3]
    gather_idx = positions.clamp(max=length - 1).unsqueeze(-1).expand(-1, -1, -1, d)
    k_all = torch.cat([k_bhsd.gather(2, gather_idx), k_bhsd], dim=2)
    v_all = torch.cat([v_bhsd.gather(2, gather_idx), v_bhsd], dim=2)
    block_mask = packed_block_mask(positions, tca_block_indices(positions, length, window, hq), length, window, hq,
                                   table=table)
    kwargs = dict(block_mask=block_mask, scale=scaling, enable_gqa=hq != k_bhsd.shape[1], kernel_options=kernel_options)
    return output_and_lse_if(return_lse, flex_attention, q_bhsd, k_all, v_all, **kwargs)


def compiles_selection(q_bhsd: torch.Tensor) -> bool:
    """Whether ``tca_prefill_attention`` runs the selection as its compiled graph (on CUDA, outside
    a caller's compiled graph). A function, so that the CPU tests can take the CUDA path's route
    through a model (its layouts, its custom op) and check that the graph serves every length."""
    return q_bhsd.is_cuda and not torch.compiler.is_compiling()


def tca_prefill_attention(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor,
                          cdf_hk: torch.Tensor, config: TCAConfig, scaling: float,
                          return_lse: bool = False, return_selection: bool = False,
                          kernel_options: dict[str, Any] | None = None) -> Any:
    """TCA prefill attention for one layer.

    Compiled once for every prompt length: the selection and the attention
    are two graphs with a symbolic sequence length (``compile.length_generic``),
    so a new length runs without compiling (``docs/serving.md``).

    Args:
        q_bhsd: ``[B, H_q, L, D]`` queries; k_bhsd, v_bhsd: ``[B, H_kv, L, D]``.
            Query head ``h`` uses KV head ``h // (H_q // H_kv)``.
        cdf_hk: float64 ``[H_kv, b + 1]`` budget distributions.
        config: TCAConfig; requires ``L > config.window``.
        scaling: softmax scale.
        return_lse: also return the float32 ``[B, H_q, L]`` log-sum-exp of
            every query's scores over its kept keys, and the ``Selection`` the
            prefill attended to (FlexAttention supports this on CUDA only;
            ``mass.py`` has the device-independent computation).
        return_selection: return ``(out, selection)``, the selection the pruned
            cache keeps (``cache_selection``: the prefill's unless
            ``config.cache_spread_observation_queries`` chooses another);
            ignored with return_lse.
        kernel_options: FlexAttention kernel options (default: ``compile.prefill_kernel_options``,
            the FLASH backend on Hopper when FlashAttention-4 is installed, else Triton).

    Returns:
        ``[B, H_q, L, D]`` in the input dtype, ``(out, selection)`` or
        ``(out, lse, selection)``.
    """
    length = q_bhsd.shape[2]
    if length <= config.window:
        raise ValueError(f"TCA prefill needs more tokens ({length}) than the window ({config.window}); "
                         "shorter prefills run dense")
    # The log-sum-exp comes from the Triton kernel: FLASH's differed from it (H200, torch 2.11).
    if kernel_options is not None:
        options = kernel_options
    else:
        options = kernel_options_for(q_bhsd.device) if return_lse else prefill_kernel_options(q_bhsd.device)
    # On CUDA the selection is ~60 small kernels whose launches cost more than
    # their work (2.5 ms at 32K): compiled, they fuse into a few. On the CPU it
    # stays eager (cheap at CPU lengths, and no compile in every test process).
    select_fn = _select_positions
    if compiles_selection(q_bhsd):
        select_fn = length_generic(_select_positions, (1, 2))
    # The compiled selection sees the few observation rows and contiguous keys: one graph
    # whatever layout the caller's tensors have (a model's transposed projections, a
    # cache's concatenation), since compiled graphs are specialised on strides.
    q_obs = observed_queries(q_bhsd, config.num_observation_queries, config.spread_observation_queries,
                             config.window)
    q_cache = cache_queries(q_bhsd, config)
    k_bhsd = k_bhsd.contiguous()  # once: the attention's tiles below reuse it when no padding is needed
    positions, counts, table, kept_positions, kept_counts = select_fn(q_obs, k_bhsd, cdf_hk, config, scaling,
                                                                      q_cache)
    # The attention runs on whole tiles: a padded tail of < KERNEL_BLOCK queries and keys
    # (causal: invisible to the real queries; computed only in the last tile).
    padded = whole_tiles(length)
    # The Triton lowering keeps its unmasked loads when lengths are visibly tile multiples
    # (tiles split out); the CPU lowering accepts plain symbolic lengths only.
    split = q_bhsd.is_cuda
    args = [tiled(t, padded, split) for t in (q_bhsd, k_bhsd, v_bhsd)]
    args.append(positions.unflatten(-1, (-1, KERNEL_BLOCK)) if split else positions)
    # The mask reads the key-position table as an input of the attention's graph; inside a
    # caller's compiled graph there is no such input and the mask splits at the capacity.
    attend = _packed_attention
    if torch.compiler.is_compiling():
        args.append(None)
    else:
        args.append(table)
        attend = length_generic(_packed_attention, (0, 2), (1, 2), (2, 2), (3, 2), (4, 0))
    result = attend(*args, config.window, scaling, return_lse, options)
    result = (result[0][:, :, :length], result[1][:, :, :length]) if return_lse else result[:, :, :length]
    if return_lse:
        out, lse = result
        return out, lse, Selection(positions=positions, counts=counts)
    return (result, Selection(positions=kept_positions, counts=kept_counts)) if return_selection else result


@functools.lru_cache(maxsize=64)
def _config_from_json(text: str) -> TCAConfig:
    return TCAConfig.from_dict(json.loads(text))


def _rows_prefill(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], pads: list[int], length: int,
                  cdf_hk: torch.Tensor, config: TCAConfig, scaling: float
                  ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Each row of a left-padded batch alone on its real tokens.

    ``rows[r]`` is row ``r``'s ``(q, k, v)``, ``[1, H, n_r, D]``, its
    ``n_r = length - pads[r]`` real tokens. Each runs exactly what it would
    unpadded (TCA past ``config.dense_up_to``, dense causal attention
    otherwise, whose cache then keeps everything before the window), so
    padding never enters a selection, a budget or a window and costs no
    attention compute. The length-generic graphs serve every row's length
    without compiling. Returns the rows' outputs ``[1, H_q, n_r, D]`` and the
    selection of the padded batch: ``positions [B, H_kv, length - window]`` in
    padded coordinates (each row's shifted by its padding) and ``counts``.
    """
    hkv, window = rows[0][1].shape[1], config.window
    dev = rows[0][0].device
    positions = torch.full((len(rows), hkv, max(length - window, 0)), PAD_POSITION, dtype=torch.long, device=dev)
    counts = torch.zeros(len(rows), hkv, dtype=torch.long, device=dev)
    outs = []
    for r, ((q, k, v), pad) in enumerate(zip(rows, pads, strict=True)):
        n = length - pad
        if n > config.dense_up_to:
            o, sel = tca_prefill_attention(q, k, v, cdf_hk, config, scaling, return_selection=True)
            j = torch.arange(n - window, device=dev)
            kept = sel.positions[0, :, : n - window]
            positions[r, :, : n - window] = torch.where(j < sel.counts[0, :, None], kept + pad, PAD_POSITION)
            counts[r] = sel.counts[0]
        else:  # what a short prompt runs alone: exact dense attention, and the cache keeps all before the window
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                                 enable_gqa=q.shape[1] != hkv)
            before = n - min(n, window)
            positions[r, :, :before] = torch.arange(pad, pad + before, device=dev)
            counts[r] = before
        outs.append(o)
    return outs, positions, counts


def _padded_prefill(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor, cdf_hk: torch.Tensor,
                    config: TCAConfig, scaling: float, pads: list[int]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prefill of a left-padded batch ``[B, H, L, D]``, each row alone on its real tokens
    (``_rows_prefill``). Padding queries get zeros (finite; nothing reads them). Returns
    ``out [B, H_q, L, D]``, ``positions`` and ``counts``."""
    length = q_bhsd.shape[2]
    rows = [tuple(t[r: r + 1, :, pad:] for t in (q_bhsd, k_bhsd, v_bhsd)) for r, pad in enumerate(pads)]
    outs, positions, counts = _rows_prefill(rows, pads, length, cdf_hk, config, scaling)
    out = q_bhsd.new_zeros(q_bhsd.shape)
    for r, (o, pad) in enumerate(zip(outs, pads, strict=True)):
        out[r, :, pad:] = o[0]
    return out, positions, counts


def packed_prefill(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor, cdf_hk: torch.Tensor,
                   config: TCAConfig, scaling: float, pads: list[int], length: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Selection]:
    """The prefill of a left-padded batch of width ``length`` whose real tokens come packed in one row
    (``unpad.py``).

    ``q/k/v`` are ``[1, H, N, D]``: row ``r``'s ``length - pads[r]`` tokens, rows
    in order, ``N`` in all. Each row runs alone on its slice (``_rows_prefill``).
    Returns the output ``[1, N, H_q, D]``, the K/V scattered to the padded
    layout ``[B, H_kv, L, D]`` (zeros at padding, which no selection reads) for
    the pruned cache, and the selection in padded coordinates.
    """
    ends = list(itertools.accumulate(length - p for p in pads))
    if ends[-1] != q_bhsd.shape[2]:
        raise ValueError(f"{q_bhsd.shape[2]} packed tokens are not the {ends[-1]} real tokens of rows of {length} "
                         f"positions with paddings {pads}")
    starts = [0, *ends[:-1]]
    rows = [tuple(t[:, :, s:e] for t in (q_bhsd, k_bhsd, v_bhsd)) for s, e in zip(starts, ends, strict=True)]
    outs, positions, counts = _rows_prefill(rows, pads, length, cdf_hk, config, scaling)
    padded = [k_bhsd.new_zeros(len(pads), k_bhsd.shape[1], length, k_bhsd.shape[3]) for _ in range(2)]
    for r, (s, e, pad) in enumerate(zip(starts, ends, pads, strict=True)):
        padded[0][r, :, pad:] = k_bhsd[0, :, s:e]
        padded[1][r, :, pad:] = v_bhsd[0, :, s:e]
    out = torch.cat(outs, dim=2).transpose(1, 2).contiguous()
    return out, padded[0], padded[1], Selection(positions=positions, counts=counts)


# Inside an outer torch.compile the prefill runs as one opaque custom op, whose
# body calls the separately compiled selection and FlexAttention. Tracing both
# into one inductor graph failed on CUDA with torch 2.11 (codegen: "list
# indices must be integers or slices, not NoneType"; BENCHMARKS.md, 2026-11-24 run 3),
# the op keeps the outer graph free of that risk and costs no graph break.
# Being opaque, its body may read ``pads`` on the host even under compile.
@torch.library.custom_op("tca_flex::prefill_attention", mutates_args=())
def prefill_attention_op(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor,
                         cdf_hk: torch.Tensor, config_json: str, scaling: float, pads: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tca_prefill_attention`` as a torch custom op.

    ``config_json`` is ``json.dumps(config.to_dict())``. ``pads``: int64
    ``[B]`` leading padding tokens per row (``left_pads``), or ``None``.
    Returns the output as ``[B, L, H_q, D]`` contiguous (what transformers
    expects back), and the selection's ``positions`` (padded coordinates) and
    ``counts`` (the pruned cache needs them).
    """
    config = _config_from_json(config_json)
    pad_list = pads.tolist() if pads is not None else []
    if any(pad_list):
        out, positions, counts = _padded_prefill(q_bhsd, k_bhsd, v_bhsd, cdf_hk, config, scaling, pad_list)
        return out.transpose(1, 2).contiguous(), positions, counts
    out, sel = tca_prefill_attention(q_bhsd, k_bhsd, v_bhsd, cdf_hk, config, scaling, return_selection=True)
    # Cut to the global region (every kept position lies there): a width that is a plain
    # function of L keeps the fake below symbolic under an outer torch.compile.
    out_blhd = out.transpose(1, 2).contiguous()
    return out_blhd, sel.positions[..., :q_bhsd.shape[2] - config.window].contiguous(), sel.counts


@prefill_attention_op.register_fake
def _(q_bhsd, k_bhsd, v_bhsd, cdf_hk, config_json, scaling, pads=None):
    bsz, hkv, length = k_bhsd.shape[0], k_bhsd.shape[1], k_bhsd.shape[2]
    width = length - _config_from_json(config_json).window
    out_blhd = q_bhsd.new_empty((bsz, length, q_bhsd.shape[1], q_bhsd.shape[3]))
    return (out_blhd, k_bhsd.new_empty((bsz, hkv, width), dtype=torch.long),
            k_bhsd.new_empty((bsz, hkv), dtype=torch.long))


LEFT_PADDING_ONLY = (
    "tca_flex supports padded batches with left padding only: each row is its padding, then its tokens, "
    "attended causally. This mask is not that (right padding, a hole, or packed sequences). Pad on the "
    "left (tokenizer.padding_side = 'left') or run the rows separately. generate infers a hole when "
    "pad_token_id occurs inside a prompt: pass attention_mask yourself. Under torch.compile, a forward "
    "with use_cache=False makes transformers assume packed sequences: keep use_cache=True (the default)."
)


def visible_keys(attention_mask: torch.Tensor) -> torch.Tensor:
    """bool, True where a key is attended: a 2-D padding mask (nonzero = token), a 4-D bool mask, or a
    4-D additive float mask (0 = attend)."""
    if attention_mask.dim() == 2 or attention_mask.dtype == torch.bool:
        return attention_mask.bool()
    return attention_mask == 0


def check_left_padded(visible: torch.Tensor) -> list[int]:
    """Leading padding tokens per row of a prefill mask; ``ValueError`` unless it is exactly left padding + causal.

    Args:
        visible: bool ``[B, L]`` (a padding mask) or ``[B, H, L, L]`` (the
            causal mask of a prefill from scratch; padding query rows, which
            nothing reads, may hold anything).
    """
    length = visible.shape[-1]
    if visible.dim() == 4 and visible.shape[-2] != length:
        raise ValueError(f"a prefill mask must be square, got {tuple(visible.shape)}; " + LEFT_PADDING_ONLY)
    last = visible if visible.dim() == 2 else visible[:, :, -1]
    pads = (length - last.sum(-1)).reshape(visible.shape[0], -1)
    if visible.dim() == 4 and not bool((pads == pads[:, :1]).all()):
        raise ValueError("the mask differs between heads; " + LEFT_PADDING_ONLY)
    pads = pads[:, 0].tolist()
    idx = torch.arange(length, device=visible.device)
    causal = idx[None, :] <= idx[:, None]
    for r, pad in enumerate(pads):
        if pad >= length:
            raise ValueError(f"row {r} of the batch has no token (all padding): remove it from the batch")
        if visible.dim() == 2:
            ok = torch.equal(visible[r], idx >= pad)
        else:
            ok = bool((visible[r, :, pad:] == (causal[pad:] & (idx >= pad))).all())
        if not ok:
            raise ValueError(LEFT_PADDING_ONLY)
    return pads


@torch.library.custom_op("tca_flex::left_pads", mutates_args=())
def left_pads_op(visible: torch.Tensor) -> torch.Tensor:
    """``check_left_padded`` as an opaque op: int64 ``[B]`` pads, and a ``ValueError`` for any other mask,
    eager or under torch.compile (a compiled graph cannot branch on mask values; this body runs eagerly)."""
    return torch.tensor(check_left_padded(visible), dtype=torch.long, device=visible.device)


@left_pads_op.register_fake
def _(visible):
    return visible.new_empty((visible.shape[0],), dtype=torch.long)


def _check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    if query.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"tca_flex supports {[str(t) for t in SUPPORTED_DTYPES]}, got {query.dtype}; "
                        "cast the model with model.to(torch.bfloat16) or model.float()")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query, key and value dtypes differ ({query.dtype}, {key.dtype}, {value.dtype}); "
                        "cast the whole model to one dtype")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} KV heads")


# The decode mask last accepted: every layer of a forward gets the same one.
_accepted_decode_mask = AcceptedMask()


def check_decode_mask(attention_mask: torch.Tensor | None, pads: list[int], length: int) -> None:
    """Refuse a decode mask that hides anything but each row's leading ``pads`` (the prefill's padding),
    or that does not span the ``length`` tokens the cache has seen with this step's.

    The pruned cache stores no padding and no other hole, so such a mask
    cannot be honoured. Checked eagerly only: reading mask values inside a
    compiled step would be a data-dependent branch, and inside a CUDA-graph
    capture a sync the capture refuses; there the prefill's ``left_pads`` has
    checked the pattern, the eager warm-up before a capture has checked the
    step, and generate's masks only append visible tokens to it. A mask
    already accepted with the same ``pads`` (the same tensor, not modified in
    place since) is not read again (``chunks.AcceptedMask``).
    """
    if attention_mask is None or building_graph():
        return
    key = (tuple(pads), length)
    if _accepted_decode_mask.seen(attention_mask, key):
        return
    if attention_mask.shape[-1] != length:
        # Dense attention would fail on the shapes; the pruned cache must not read it against other tokens.
        raise ValueError(f"this decode step's attention mask spans {attention_mask.shape[-1]} positions, but the "
                         f"sequence is {length} tokens long with this step's: pass a mask over every token so far "
                         "(as generate does)")
    visible = visible_keys(attention_mask)
    visible = visible.reshape(visible.shape[0], -1, 1, visible.shape[-1])  # one query: [B, H, 1, kv]
    if len(pads) != visible.shape[0] or not is_causal_left_padded(visible, visible.shape[-1] - 1, pads):
        raise ValueError("TCACache decodes left-padded batches only: this decode mask hides other tokens than "
                         "each row's leading padding of the prefill. Pad on the left (tokenizer.padding_side = "
                         "'left') and pass generate the same attention_mask for the whole batch")
    _accepted_decode_mask.accept(attention_mask, key)


def _warn_if_detached(*tensors: torch.Tensor) -> None:
    # Eager only: the condition is static under torch.compile, and a warning there would break the graph.
    if torch.is_grad_enabled() and not torch.compiler.is_compiling() and any(t.requires_grad for t in tensors):
        warnings.warn("tca_flex is inference-only: its sparse attention ran under torch.no_grad(), so its output "
                      "is detached and no gradient flows through TCA layers. Run inference under "
                      "torch.no_grad() (or torch.inference_mode()) to silence this; call tca_flex.remove(model) "
                      "before training", UserWarning, stacklevel=3)


def _warn_if_full_cache_decode(layer: TCALayer, q_len: int, k_len: int) -> None:
    # New tokens over more keys than the window, without a TCACache: the caller's cache (transformers
    # makes a DynamicCache when none is passed) keeps every token. Worth a word: the KV cache a user
    # applied TCA to shrink does not shrink. Eager only, as above; Python's default filter shows it once.
    if q_len < k_len and k_len > layer.config.dense_up_to and not torch.compiler.is_compiling():
        warnings.warn("tca_flex: new tokens attend over a cache that is not a TCACache (transformers makes a "
                      "DynamicCache when none is passed): every token's K/V is kept and read, as dense. For "
                      "the pruned cache pass cache=tca_flex.TCACache(model) to generate (docs/cache.md)",
                      UserWarning, stacklevel=3)


def _check_no_dropout(module: torch.nn.Module, dropout: float) -> None:
    if dropout and module.training:
        raise ValueError("tca_flex is inference-only: call model.eval() before running TCA (attention dropout "
                         "would be dropped without a word)")


def _warn_no_weights() -> None:
    # Eager only, as _warn_if_detached; transformers' own SDPA warns the same way.
    if not torch.compiler.is_compiling():
        warnings.warn("tca_flex: TCA attention returns no attention weights, so output_attentions=True gives none "
                      "for its layers; run tca_flex.remove(model) and attn_implementation='eager' to get them",
                      UserWarning, stacklevel=3)


def _sparse_scale(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  dropout: float, scaling: float | None) -> float:
    """The checks every sparse prefill makes before it runs (inputs, eval mode, grad mode); its scale."""
    _check_inputs(query, key, value)
    _check_no_dropout(module, dropout)
    _warn_if_detached(query, key, value)
    return scaling if scaling is not None else query.shape[-1] ** -0.5


def tca_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None,
                          dropout: float = 0.0, scaling: float | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers ``AttentionInterface`` entry point.

    Shapes: query ``[B, H_q, Lq, D]``, key/value ``[B, H_kv, Lk, D]`` (the
    cache already updated); returns ``([B, Lq, H_q, D], None)``.

    TCA is inference-only: the sparse prefill and every ``TCACache`` step run
    under ``torch.no_grad()`` whatever the caller's grad mode, so a forward
    outside ``torch.no_grad()`` works (FlexAttention has no CPU backward), but
    their output is detached: no gradient flows through a TCA layer, and a
    ``UserWarning`` says so. Dense calls (short prompts) keep autograd.
    """
    layer: TCALayer | None = tca_layer(module)
    if layer is None:
        raise RuntimeError(
            f"{type(module).__name__} runs with attn_implementation='tca' but was not prepared by "
            "tca_flex.apply(model); call tca_flex.apply on the model instead of setting the name by hand"
        )
    if kwargs.get("output_attentions"):
        _warn_no_weights()
    cache_layer = layer.link.take(key)
    if cache_layer is None and key.shape[-1] != query.shape[-1]:
        # A TCACache layer's flat buffers (``TCACacheLayer.update``), posted to another module's link.
        raise ValueError("tca_flex: this attention got a TCACache made for another model (or before the model was "
                         "applied again): make a new tca_flex.TCACache(model) for the model you run")
    if cache_layer is not None and kwargs.get("use_cache") is False:
        cache_layer.abandon_step()
        raise ValueError("tca_flex: a TCACache was passed with use_cache=False: generate would feed the whole "
                         "sequence again at every step, on top of the tokens the cache already holds. "
                         "Leave use_cache at True with a TCACache, or pass no cache")
    if cache_layer is not None and cache_layer.prefilled:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        try:  # a refused step leaves the cache as before it (abandon_step), so the caller can go on
            _check_no_dropout(module, dropout)
            if not cache_layer.chunk_pending:  # (a chunk's mask is checked by chunk_step, before any change)
                check_decode_mask(attention_mask, cache_layer.pads, cache_layer.get_seq_length())
        except ValueError:
            cache_layer.abandon_step()
            raise
        _warn_if_detached(query, key, value)
        with torch.no_grad():  # inference-only; detached too: CPU FlexAttention refuses inputs requiring grad
            if cache_layer.chunk_pending:  # several new tokens on top of the pruned cache
                out = cache_layer.chunk_step(query.detach(), scale, attention_mask)
            else:
                out = cache_layer.decode_step(query.detach(), scale)
        return out.transpose(1, 2).contiguous(), None
    q_len, k_len = query.shape[2], key.shape[2]
    if (attention_mask is not None and attention_mask.dim() == 2 and q_len == k_len
            and attention_mask.shape[-1] != k_len):
        return _packed_forward(layer, cache_layer, query, key, value, attention_mask, dropout, module, scaling)
    sparse = q_len == k_len and k_len > layer.config.dense_up_to
    pads = None
    if attention_mask is not None and q_len == k_len:  # a prefill: only left padding can be honoured
        pads = torch.ops.tca_flex.left_pads(visible_keys(attention_mask))
    if not sparse:
        if cache_layer is None:
            _warn_if_full_cache_decode(layer, q_len, k_len)
        if attention_mask is not None and attention_mask.dim() == 2:
            if q_len != k_len:
                raise ValueError(f"tca_flex got a 2-D attention mask for {q_len} queries over {k_len} keys; "
                                 "let transformers build the mask (pass the 2-D mask to the model, not here)")
            # tca_mask hands a prefill its padding mask only (the 4-D one is L^2 bytes per row)
            attention_mask = sdpa_mask(batch_size=query.shape[0], q_length=q_len, kv_length=k_len,
                                       attention_mask=attention_mask, allow_is_causal_skip=False,
                                       device=query.device)
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                     scaling=scaling, **kwargs)
        if cache_layer is not None:
            # the cache keeps no autograd history
            cache_layer.finish_prefill(key.detach(), value.detach(), None, pads=pads)
        return out
    scale = _sparse_scale(module, query, key, value, dropout, scaling)
    with torch.no_grad():  # inference-only; detached too: CPU FlexAttention refuses inputs requiring grad
        query, key, value = query.detach(), key.detach(), value.detach()
        out_blhd, positions, counts = prefill_attention_op(query, key, value, layer.cdf, layer.config_json, scale,
                                                           pads)
        if cache_layer is not None:
            # prune now: peak memory never holds every layer in full
            cache_layer.finish_prefill(key, value, Selection(positions=positions, counts=counts), pads=pads)
    return out_blhd, None


def _packed_forward(layer: TCALayer, cache_layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor, dropout: float, module: torch.nn.Module,
                    scaling: float | None) -> tuple[torch.Tensor, None]:
    """A padded prefill run on its packed real tokens (``unpad.py``): queries ``[1, H, N, D]`` with the
    batch's 2-D padding mask ``[B, L]``. Eager only (the packing never happens under a trace)."""
    pads = check_left_padded(visible_keys(attention_mask))
    scale = _sparse_scale(module, query, key, value, dropout, scaling)
    with torch.no_grad():
        out, key_padded, value_padded, sel = packed_prefill(query.detach(), key.detach(), value.detach(), layer.cdf,
                                                            layer.config, scale, pads, attention_mask.shape[-1])
        if cache_layer is not None:
            cache_layer.finish_prefill(key_padded, value_padded, sel, pads=pads)
    return out, None
