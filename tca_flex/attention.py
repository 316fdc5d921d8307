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
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .cache import CacheLink
from .compile import compiled, flex
from .config import TCAConfig
from .masks import KERNEL_BLOCK, packed_block_mask, tca_block_indices
from .selection import Selection, global_region_length, select

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class TCALayer:
    """What one attention layer needs at run time (attached by ``apply``).

    Attributes:
        config: the TCAConfig.
        cdf: float64 ``[H_kv, b + 1]``, cumulative budget distributions.
        layer_idx: index of the layer.
        link: mailbox through which a ``TCACache`` layer reaches this
            module's attention call (transformers does not pass the cache).
    """

    config: TCAConfig
    cdf: torch.Tensor
    layer_idx: int
    link: CacheLink = field(default_factory=CacheLink, compare=False, repr=False)
    config_json: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "config_json", json.dumps(self.config.to_dict(), sort_keys=True))


def tca_select(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, cdf_hk: torch.Tensor, config: TCAConfig,
               scaling: float) -> Selection:
    """``select`` with every knob taken from ``config`` (shapes as in ``tca_prefill_attention``)."""
    return select(q_bhsd, k_bhsd, cdf_hk, scaling=scaling, block_size=config.block_size,
                  window=config.window, alpha=config.alpha, normalize=config.normalize_redundancy,
                  num_queries=config.num_observation_queries, aggregation=config.gqa_aggregation,
                  capacity_multiple=KERNEL_BLOCK, guard_floor=config.guard_floor,
                  pool_kernel=config.pool_kernel, span=config.span,
                  num_spread=config.spread_observation_queries, anchor_blocks=config.anchor_blocks)


def _prefill_inputs(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor,
                    cdf_hk: torch.Tensor, config: TCAConfig, scaling: float
                    ) -> tuple[Selection, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Selection, ``[packed; full]`` keys and values, and BlockMask indices for one layer."""
    length, d = q_bhsd.shape[2], q_bhsd.shape[3]
    sel = tca_select(q_bhsd, k_bhsd, cdf_hk, config, scaling)
    gather_idx = sel.positions.clamp(max=length - 1).unsqueeze(-1).expand(-1, -1, -1, d)
    k_all = torch.cat([k_bhsd.gather(2, gather_idx), k_bhsd], dim=2)
    v_all = torch.cat([v_bhsd.gather(2, gather_idx), v_bhsd], dim=2)
    return sel, k_all, v_all, tca_block_indices(sel.positions, length, config.window, q_bhsd.shape[1])


def tca_prefill_attention(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor,
                          cdf_hk: torch.Tensor, config: TCAConfig, scaling: float,
                          return_lse: bool = False, return_selection: bool = False,
                          kernel_options: dict[str, Any] | None = None) -> Any:
    """TCA prefill attention for one layer.

    Args:
        q_bhsd: ``[B, H_q, L, D]`` queries; k_bhsd, v_bhsd: ``[B, H_kv, L, D]``.
            Query head ``h`` uses KV head ``h // (H_q // H_kv)``.
        cdf_hk: float64 ``[H_kv, b + 1]`` budget distributions.
        config: TCAConfig; requires ``L > config.window``.
        scaling: softmax scale.
        return_lse: also return the float32 ``[B, H_q, L]`` log-sum-exp of
            every query's scores over its kept keys, and the ``Selection``
            (FlexAttention supports this on CUDA only; ``mass.py`` has the
            device-independent computation).
        return_selection: return ``(out, selection)`` (ignored with return_lse).
        kernel_options: FlexAttention kernel options (default: per device).

    Returns:
        ``[B, H_q, L, D]`` in the input dtype, ``(out, selection)`` or
        ``(out, lse, selection)``.
    """
    hq, length = q_bhsd.shape[1], q_bhsd.shape[2]
    hkv = k_bhsd.shape[1]
    # On CUDA the selection and block-index build are ~60 small kernels whose
    # launches cost more than their work (2.5 ms at 32K): compile them into a
    # few. FlexAttention stays a separate compiled call (see prefill_attention_op).
    prepare = _prefill_inputs
    if q_bhsd.is_cuda and not torch.compiler.is_compiling():
        prepare = compiled(_prefill_inputs)
    sel, k_all, v_all, indices = prepare(q_bhsd, k_bhsd, v_bhsd, cdf_hk, config, scaling)
    block_mask = packed_block_mask(sel.positions, indices, length, config.window, hq)
    result = flex(q_bhsd, k_all, v_all, block_mask, scale=scaling, enable_gqa=hq != hkv,
                  return_lse=return_lse, kernel_options=kernel_options)
    if return_lse:
        out, lse = result
        return out, lse, sel
    return (result, sel) if return_selection else result


@functools.lru_cache(maxsize=64)
def _config_from_json(text: str) -> TCAConfig:
    return TCAConfig.from_dict(json.loads(text))


# Inside an outer torch.compile the prefill runs as one opaque custom op, whose
# body calls the separately compiled selection and FlexAttention. Tracing both
# into one inductor graph failed on CUDA with torch 2.11 (codegen: "list
# indices must be integers or slices, not NoneType"; scripts/gpu_compile_probe.py),
# the op keeps the outer graph free of that risk and costs no graph break.
@torch.library.custom_op("tca_flex::prefill_attention", mutates_args=())
def prefill_attention_op(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor,
                         cdf_hk: torch.Tensor, config_json: str, scaling: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tca_prefill_attention`` as a torch custom op.

    ``config_json`` is ``json.dumps(config.to_dict())``. Returns the output and
    the selection's ``positions`` and ``counts`` (the pruned cache needs them).
    """
    out, sel = tca_prefill_attention(q_bhsd, k_bhsd, v_bhsd, cdf_hk, _config_from_json(config_json), scaling,
                                     return_selection=True)
    return out, sel.positions, sel.counts


@prefill_attention_op.register_fake
def _(q_bhsd, k_bhsd, v_bhsd, cdf_hk, config_json, scaling):
    bsz, hkv, length = k_bhsd.shape[0], k_bhsd.shape[1], k_bhsd.shape[2]
    capacity = -(-global_region_length(length, _config_from_json(config_json).window) // KERNEL_BLOCK) * KERNEL_BLOCK
    return (torch.empty_like(q_bhsd), k_bhsd.new_empty((bsz, hkv, capacity), dtype=torch.long),
            k_bhsd.new_empty((bsz, hkv), dtype=torch.long))


def _check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    if query.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"tca_flex supports {[str(t) for t in SUPPORTED_DTYPES]}, got {query.dtype}; "
                        "cast the model with model.to(torch.bfloat16) or model.float()")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query, key and value dtypes differ ({query.dtype}, {key.dtype}, {value.dtype}); "
                        "cast the whole model to one dtype")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} KV heads")


def _check_decode_mask(attention_mask: torch.Tensor | None) -> None:
    # The pruned cache has no padding slots, so a mask that hides tokens
    # cannot be honoured. Checked eagerly only: reading mask values inside a
    # compiled step would be a data-dependent branch.
    if attention_mask is None or torch.compiler.is_compiling():
        return
    hides = ~attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    if hides.any():
        raise ValueError("TCACache does not support padded batches: run unpadded sequences (batch size 1, "
                         "or equal lengths without padding)")


def tca_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None,
                          dropout: float = 0.0, scaling: float | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers ``AttentionInterface`` entry point.

    Shapes: query ``[B, H_q, Lq, D]``, key/value ``[B, H_kv, Lk, D]`` (the
    cache already updated); returns ``([B, Lq, H_q, D], None)``.
    """
    layer: TCALayer | None = getattr(module, "_tca_layer", None)
    if layer is None:
        raise RuntimeError(
            f"{type(module).__name__} runs with attn_implementation='tca' but was not prepared by "
            "tca_flex.apply(model); call tca_flex.apply on the model instead of setting the name by hand"
        )
    cache_layer = layer.link.take(key)
    if cache_layer is not None and cache_layer.prefilled:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if cache_layer.chunk_pending:  # several new tokens on top of the pruned cache
            out = cache_layer.chunk_step(query, scale, attention_mask)
        else:
            _check_decode_mask(attention_mask)
            out = cache_layer.decode_step(query, scale)
        return out.transpose(1, 2).contiguous(), None
    q_len, k_len = query.shape[2], key.shape[2]
    sparse = q_len == k_len and k_len > layer.config.dense_up_to
    if not sparse:
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                     scaling=scaling, **kwargs)
        if cache_layer is not None:
            cache_layer.finish_prefill(key, value, None)
        return out
    _check_inputs(query, key, value)
    if attention_mask is not None:
        raise ValueError(
            "tca_flex got an attention mask for a sparse prefill: padded or packed batches are not "
            "supported by TCA selection. Run unpadded sequences (batch size 1, or equal lengths "
            "without padding). Under torch.compile, a forward with use_cache=False makes transformers "
            "assume packed sequences: keep use_cache=True (the default)."
        )
    if dropout and module.training:
        raise ValueError("tca_flex is inference-only: call model.eval() before running TCA")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out, positions, counts = prefill_attention_op(query, key, value, layer.cdf, layer.config_json, scale)
    if cache_layer is not None:
        # prune now: peak memory never holds every layer in full
        cache_layer.finish_prefill(key, value, Selection(positions=positions, counts=counts))
    return out.transpose(1, 2).contiguous(), None
