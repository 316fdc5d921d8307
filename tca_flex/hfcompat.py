"""The KV cache's argument name across transformers versions.

transformers renamed ``past_key_values`` to ``cache`` (``forward``,
``generate`` and the model outputs; the old name is deprecated, due to go in
5.40 for ``forward`` and 6.0 for ``generate``). 5.2 takes only the old name,
5.24 warns on it, so code that must run across the rename passes the cache
through ``cache_kwargs``, reads it back with ``output_cache``, and finds it
in a hooked module's keyword arguments with ``kwargs_cache``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch


@functools.cache
def _cache_name(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``, whichever ``model`` takes."""
    return {_cache_name(type(model)): cache}


def output_cache(out: Any) -> Any:
    """The cache a model output returns (``out.cache``, or ``out.past_key_values`` before the rename)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def kwargs_cache(kwargs: dict[str, Any]) -> Any:
    """The cache in a forward call's keyword arguments under either name (None: no cache passed)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")
