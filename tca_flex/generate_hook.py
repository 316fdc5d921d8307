"""``generate``'s per-step input preparation, with a ``TCACache``'s host bookkeeping done there.

``generate`` compiles the model's forward (``mode="reduce-overhead"``: CUDA-graph trees) for a
compileable cache and calls ``prepare_inputs_for_generation`` before every step, outside that
compiled forward. A ``TCACache`` counts the tokens it has seen in Python ints; counted inside
the compiled step, the count is an int input of the graph that changes every step, and CUDA-graph
trees record a new graph for every distinct int input, so no step would replay one.
``install`` wraps the model's ``prepare_inputs_for_generation`` on the instance (the class and
other models keep theirs) so that each one-token step's count and growth check happen there
(``TCACache.prepare_decode_step``); ``uninstall`` gives the original back.
"""

from __future__ import annotations

from typing import Any

import torch

from . import instance_methods
from .cache import TCACache

# transformers' name for the cache argument: "cache" from 5.23 on, "past_key_values" before.
_CACHE_KEYS = ("cache", "past_key_values")
_NAME = "prepare_inputs_for_generation"


def install(model: torch.nn.Module) -> Any:
    """Wrap ``model.prepare_inputs_for_generation``; returns what ``uninstall`` needs, or None for a model
    without one (not a generation model)."""
    return instance_methods.wrap(model, _NAME, lambda module, call, bound, args, kwargs:
                                 prepare_tca_step(call(*bound, *args, **kwargs)))


def uninstall(model: torch.nn.Module, installed: Any) -> None:
    """Undo ``install``, if its wrapper is still the model's (someone may have replaced it since)."""
    instance_methods.unwrap(model, _NAME, installed)


def prepare_tca_step(inputs: Any) -> Any:
    """``TCACache.prepare_decode_step`` for a step's model inputs that decode one token per row
    over a ``TCACache``; anything else (a prefill, a chunk, another cache) is left alone. Returns
    ``inputs``."""
    if not isinstance(inputs, dict):
        return inputs
    cache = next((inputs[key] for key in _CACHE_KEYS if isinstance(inputs.get(key), TCACache)), None)
    new = inputs.get("input_ids")
    if new is None:
        new = inputs.get("inputs_embeds")
    if cache is not None and new is not None and new.dim() >= 2 and new.shape[1] == 1:
        cache.prepare_decode_step()
    return inputs
