"""One dense prefill per prompt for dense and every kvpress press.

A kvpress press compresses a layer's cache after that layer's dense attention
has run, so every later layer sees the dense model's hidden states: the
prefills of dense and of every press are the same computation, and so are
their first tokens. Running that prefill once, and letting each press
compress its own copy of each layer's keys and values, gives the caches that
one prefill per press gives, at a fraction of the time (on the CPU the
prefill is most of a run at 8K). Each method then decodes from its own cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..hfcompat import cache_kwargs
from ..integration import attention_modules
from .methods import Method


def shareable(method: Method) -> bool:
    """Whether ``method`` can run on the shared dense prefill (dense itself, or a press)."""
    return method.family == "dense" or method.press is not None


@torch.no_grad()
def prefill_for_presses(model: torch.nn.Module, input_ids: torch.Tensor, presses: Mapping[str, Any]
                        ) -> tuple[torch.Tensor, Any, dict[str, Any]]:
    """One dense prefill; each press compresses its own copy of every layer's cache.

    Args:
        input_ids: ``[1, L]`` prompt ids.
        presses: name -> a kvpress press (anything with kvpress's
            ``compress(module, hidden_states, keys, values, attentions, kwargs)``).

    Returns:
        ``(logits, dense_cache, {name: compressed cache})``: the last position's
        ``[1, V]`` logits (the same for every method), the dense prefill's full
        ``DynamicCache``, and one ``DynamicCache`` per press.
    """
    from transformers import DynamicCache

    dense = DynamicCache(config=model.config)
    caches = {name: DynamicCache(config=model.config) for name in presses}
    for press in presses.values():
        press.post_init_from_model(model)

    def compress_each(module, args, kwargs, output):
        # The same call kvpress's own forward hook makes, on the dense cache's full keys and values.
        layer = dense.layers[module.layer_idx]
        for name, press in presses.items():
            keys, values = press.compress(module, kwargs["hidden_states"], layer.keys, layer.values,
                                          output[1], kwargs)
            caches[name].update(keys, values, module.layer_idx)
        return output

    modules = attention_modules(model)
    # kvpress's own hooking gives every attention module the decoder's rotary embedding (some presses,
    # ExpectedAttention among them, rotate predicted queries with it); lent here for the call only.
    lent = [m for m in modules if not hasattr(m, "rotary_emb")]
    for module in lent:
        module.rotary_emb = model.model.rotary_emb
    handles = [m.register_forward_hook(compress_each, with_kwargs=True) for m in modules]
    try:
        out = model(input_ids, use_cache=True, **cache_kwargs(model, dense))
    finally:
        for handle in handles:
            handle.remove()
        for module in lent:
            del module.rotary_emb
    return out.logits[:, -1], dense, caches
