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

import functools
from typing import Any

import torch

# transformers' name for the cache argument: "cache" from 5.23 on, "past_key_values" before.
_CACHE_KEYS = ("cache", "past_key_values")


def install(model: torch.nn.Module) -> Any:
    """Wrap ``model.prepare_inputs_for_generation``; returns the wrapper (``uninstall`` checks it),
    or None for a model without one (not a generation model: nothing to do)."""
    original = getattr(model, "prepare_inputs_for_generation", None)
    if original is None:
        return None

    @functools.wraps(original)
    def prepare_inputs_for_generation(*args: Any, **kwargs: Any) -> Any:
        inputs = original(*args, **kwargs)
        prepare_tca_step(inputs)
        return inputs

    model.prepare_inputs_for_generation = prepare_inputs_for_generation
    return prepare_inputs_for_generation


def uninstall(model: torch.nn.Module, wrapper: Any) -> None:
    """Undo ``install``, if the wrapper is still the model's (someone may have replaced it since)."""
    if wrapper is not None and model.__dict__.get("prepare_inputs_for_generation") is wrapper:
        del model.__dict__["prepare_inputs_for_generation"]


def prepare_tca_step(inputs: Any) -> None:
    """``TCACache.prepare_decode_step`` for a step's model inputs that decode one token per row
    over a ``TCACache``; anything else (a prefill, a chunk, another cache) is left alone."""
    from .cache import TCACache

    if not isinstance(inputs, dict):
        return
    cache = next((inputs[key] for key in _CACHE_KEYS if isinstance(inputs.get(key), TCACache)), None)
    new = inputs.get("input_ids")
    if new is None:
        new = inputs.get("inputs_embeds")
    if cache is not None and new is not None and new.dim() >= 2 and new.shape[1] == 1:
        cache.prepare_decode_step()
