"""torch.compile integration: compiled FlexAttention created once per process.

Eager ``flex_attention`` materialises the full score matrix, so outside an
outer ``torch.compile`` we call a lazily compiled copy; inside one we call the
raw function and let the outer compile fuse it (as transformers' own
``WrappedFlexAttention`` does). Nothing here touches torch globals at import.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.nn.attention.flex_attention import flex_attention

logger = logging.getLogger(__name__)

# Dynamo caches every compiled flex wrapper (transformers' too) under one code
# object, with a default limit of 8 entries; each (Q_LEN, KV_LEN) needs one.
_MIN_RECOMPILE_LIMIT = 64

_compiled_flex: Any = None
_compiled_fns: dict[Any, Any] = {}


def _raise_recompile_limit() -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < _MIN_RECOMPILE_LIMIT:
            logger.info("tca_flex: raising torch._dynamo.config.%s to %d", name, _MIN_RECOMPILE_LIMIT)
            setattr(cfg, name, _MIN_RECOMPILE_LIMIT)


def compiled_flex_attention() -> Any:
    """The process-wide compiled ``flex_attention`` (created on first use)."""
    global _compiled_flex
    if _compiled_flex is None:
        _raise_recompile_limit()
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def compiled(fn: Any) -> Any:
    """``torch.compile(fn, dynamic=False, fullgraph=True)``, created once per function."""
    if fn not in _compiled_fns:
        _raise_recompile_limit()
        _compiled_fns[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _compiled_fns[fn]


def compile(model: torch.nn.Module, **kwargs: Any) -> Any:
    """``torch.compile(model, **kwargs)`` for a model prepared by ``tca_flex.apply``.

    Calling ``torch.compile`` yourself works too; this also raises dynamo's
    recompile limit to at least 64 (every distinct prompt length compiles its
    own FlexAttention kernels, and a ``TCACache`` growth re-traces the decode
    step), which is process-wide and so is done here on request, not at
    import. Pass ``TCACache(model, reserve_tokens=N)`` to ``generate`` so a
    generation of up to ``N`` tokens never changes buffer shapes, and keep
    ``use_cache=True`` (the default) in compiled forwards.

    Raises:
        ValueError: the model was not prepared by ``tca_flex.apply`` (compile after apply).
    """
    from .integration import is_applied

    if not is_applied(model):
        raise ValueError("tca_flex.compile: call tca_flex.apply(model) first, then compile")
    _raise_recompile_limit()
    return torch.compile(model, **kwargs)


def kernel_options_for(device: torch.device) -> dict[str, Any] | None:
    """Kernel options for ``device``; ``None`` keeps FlexAttention's defaults.

    On Hopper (compute capability 9.x) the tensor-memory-accelerator loads
    (``USE_TMA``) made TCA prefill attention 6-7% faster at 32K-128K on an H100
    (BENCHMARKS.md, 2026-11-24); elsewhere the defaults stand.
    """
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return {"USE_TMA": True}
    return None


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any, *, scale: float,
         enable_gqa: bool, return_lse: bool = False, kernel_options: dict[str, Any] | None = None) -> Any:
    """FlexAttention that is compiled whether or not the caller is.

    Shapes: q ``[B, H_q, Lq, D]``, k/v ``[B, H_kv, Lk, D]``. ``kernel_options``
    defaults to ``kernel_options_for(q.device)``.
    """
    fn = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention()
    options = kernel_options if kernel_options is not None else kernel_options_for(q.device)
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
              return_lse=return_lse, kernel_options=options)
