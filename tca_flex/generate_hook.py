"""``generate``'s per-step input preparation, with a ``TCACache``'s host bookkeeping done there.

``generate`` compiles the model's forward (``mode="reduce-overhead"``: CUDA-graph trees) for a
compileable cache and calls ``prepare_inputs_for_generation`` before every step, outside that
compiled forward. A ``TCACache`` counts the tokens it has seen in Python ints; counted inside
the compiled step, the count is an int input of the graph that changes every step, and CUDA-graph
trees record a new graph for every distinct int input, so no step would replay one.
``install`` wraps the model's ``prepare_inputs_for_generation`` on the instance (the class and
other models keep theirs) so that each one-token step's count and growth check happen there
(``TCACache.prepare_decode_step``); ``uninstall`` gives the original back.

The wrapper also spares those steps the attention mask: for a compileable cache ``generate`` builds
a 4-D mask over every token so far before each step, on the host, eagerly (0.49 ms a step against
0.07 without it at 32K on an H200, transformers 5.17: ``BENCHMARKS.md``), and a ``TCACache``'s
decode never reads it. While a decode step of ``generate``'s loop over a ``TCACache`` is being
prepared, ``preparing_tca_decode`` is true and the "tca" mask function returns no mask; for any
other cache ``generate`` hands the step the 2-D mask, which the wrapper drops. What the
mask could say the cache already knows: it holds no padding (each row's is dropped at the prefill,
whose mask was checked) and ``generate``'s later masks only append visible tokens to the one of the
call's first step, checked there (prefill, chunk or decode).

On CUDA, a cache made without ``reserve_tokens`` is not compileable, so ``generate`` decodes it
eagerly: host-bound, often slower per token than dense attention decoded eagerly (BENCHMARKS.md). The
wrapper says so once per cache, at its first such step, with what turns the fast path on.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import Any

import torch

from . import instance_methods
from .cache import TCACache
from .hfcompat import kwargs_cache

# transformers' name for the cache argument: "cache" from 5.23 on, "past_key_values" before.
_CACHE_KEYS = ("cache", "past_key_values")
_NAME = "prepare_inputs_for_generation"
_preparing = threading.local()  # per thread: servers may run several generate calls at once
_hinted: weakref.WeakSet[TCACache] = weakref.WeakSet()  # caches told they decode eagerly (_hint_eager_decode)


def preparing_tca_decode() -> bool:
    """Whether ``generate`` is preparing a one-token decode step of its loop over a ``TCACache``
    (``install``'s wrapper), in this thread. Always false inside a compiled graph: a step's own
    forward runs after its preparation, and the flag must not become a guard of it."""
    return not torch.compiler.is_compiling() and getattr(_preparing, "decode", False)


def install(model: torch.nn.Module) -> Any:
    """Wrap ``model.prepare_inputs_for_generation``; returns what ``uninstall`` needs, or None for a model
    without one (not a generation model)."""
    return instance_methods.wrap(model, _NAME, _prepare)


def _prepare(module: Any, call: Any, bound: tuple, args: tuple, kwargs: dict[str, Any]) -> Any:
    # generate's decode loop asks for one new token a row and leaves is_first_iteration out; its
    # first step (prefill, or a chunk or a token over a cache kept from an earlier call) passes it as
    # True and gets its mask built and checked (transformers 5.17 to 5.25).
    cache = check_call_cache(module, kwargs_cache(kwargs))
    if cache is not None and kwargs.get("is_first_iteration"):
        _check_new_tokens(cache, args[0] if args else kwargs.get("input_ids"), kwargs)
    decode = (cache is not None and kwargs.get("next_sequence_length") == 1
              and not kwargs.get("is_first_iteration", False))
    if not decode:
        return prepare_tca_step(call(*bound, *args, **kwargs))
    _hint_eager_decode(cache)
    _preparing.decode = True
    try:
        inputs = call(*bound, *args, **kwargs)
    finally:
        _preparing.decode = False
    if isinstance(inputs, dict):
        # For a cache generate does not compile for, transformers hands on the 2-D mask and the
        # forward would build the 4-D one (and the first layer read it back from the device).
        inputs.pop("attention_mask", None)
    return prepare_tca_step(inputs)


def _check_new_tokens(cache: TCACache, input_ids: Any, kwargs: dict[str, Any]) -> None:
    # generate feeds what the cache does not hold yet: a sequence no longer than the cache (a new
    # request on a cache not reset) would reach the model as zero tokens and fail deep inside it.
    held = cache.get_seq_length()
    if (held and isinstance(input_ids, torch.Tensor) and kwargs.get("inputs_embeds") is None
            and input_ids.shape[-1] <= held):
        raise ValueError(f"this TCACache holds {held} tokens and generate got a sequence of {input_ids.shape[-1]}: "
                         "over a cache, generate continues the conversation it holds (pass all of it, the cached "
                         "tokens first). For a new request call cache.reset() first, or make a new TCACache(model)")


def check_call_cache(model: Any, cache: Any) -> TCACache | None:
    """The cache a call of ``model`` got, if a ``TCACache``, once it is checked to be ``model``'s; any
    other, after ``_warn_if_fixed_size``. The generate and forward wrappers call it, outside compiled graphs."""
    if isinstance(cache, TCACache):
        cache.check_model(model)
        return cache
    _warn_if_fixed_size(cache)
    return None


def _warn_if_fixed_size(cache: Any) -> None:
    """Say that a fixed-size cache (transformers' ``StaticCache``, what ``cache_implementation="static"``
    makes) turns TCA off: its keys span the cache's whole length, so no call is a square prefill the
    sparse path can take, and prefill and decode both attend densely. Constant text: Python's default
    filter shows it once a process."""
    if cache is None or isinstance(cache, TCACache) or not getattr(cache, "is_compileable", False):
        return
    warnings.warn("tca_flex: this call got a fixed-size cache (a StaticCache, as generate's "
                  "cache_implementation='static' makes): its keys span the cache's whole length, so TCA cannot run "
                  "and both the prefill and decode attend densely over every token. Pass "
                  "cache=tca_flex.TCACache(model, reserve_tokens=N) instead (generate then compiles and "
                  "graph-replays its decode step on CUDA), or no cache for TCA's prefill over a DynamicCache "
                  "(docs/cache.md)", UserWarning, stacklevel=3)


def _hint_eager_decode(cache: TCACache) -> None:
    # On the CPU generate compiles for no cache: nothing to say there.
    if cache.is_compileable or cache in _hinted or not _on_gpu(cache):
        return
    _hinted.add(cache)
    warnings.warn("tca_flex: generate decodes this TCACache eagerly (it was made without reserve_tokens), which "
                  "is host-bound on a GPU, often slower per token than dense attention decoded eagerly. "
                  "TCACache(model, reserve_tokens=max_new_tokens) lets generate compile the decode step once and "
                  "replay it from CUDA graphs (the first call compiles; tca_flex.warmup(..., generate=True) does it "
                  "ahead): docs/cache.md", UserWarning, stacklevel=2)


def _on_gpu(cache: TCACache) -> bool:
    device = getattr(cache.layers[0], "device", None)  # set by the prefill
    return device is not None and device.type == "cuda"


def _tca_cache(mapping: dict[str, Any]) -> TCACache | None:
    return next((mapping[key] for key in _CACHE_KEYS if isinstance(mapping.get(key), TCACache)), None)


def uninstall(model: torch.nn.Module, installed: Any) -> None:
    """Undo ``install``, if its wrapper is still the model's (someone may have replaced it since)."""
    instance_methods.unwrap(model, _NAME, installed)


def prepare_tca_step(inputs: Any) -> Any:
    """``TCACache.prepare_decode_step`` for a step's model inputs that decode one token per row
    over a ``TCACache``; anything else (a prefill, a chunk, another cache) is left alone. Returns
    ``inputs``."""
    if not isinstance(inputs, dict):
        return inputs
    cache = _tca_cache(inputs)
    new = inputs.get("input_ids")
    if new is None:
        new = inputs.get("inputs_embeds")
    if cache is not None and new is not None and new.dim() >= 2 and new.shape[1] == 1:
        cache.prepare_decode_step()
    return inputs
