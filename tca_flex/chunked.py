"""Run a long prompt through a ``TCACache`` in chunks (``docs/chunked_prefill.md``)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Cache

from .checks import check_count
from .hfcompat import cache_kwargs


@torch.no_grad()
def chunked_prefill(model: torch.nn.Module, input_ids: torch.Tensor, cache: Any, chunk_size: int,
                    **model_kwargs: Any) -> torch.Tensor:
    """Feed ``input_ids`` to ``model`` in chunks of ``chunk_size`` tokens on top of ``cache``.

    With an empty ``TCACache`` the first chunk is an ordinary prefill (TCA when
    longer than ``config.dense_up_to``); every later chunk attends to the kept
    set plus itself and compresses the blocks that leave the window. The same
    call continues a conversation already in the cache. Activations and
    attention scores are bounded by the chunk, not the prompt. To go on with
    ``generate``, prefill all but the last prompt token and pass the whole
    prompt: ``generate`` feeds only what the cache does not hold yet.

    Args:
        model: a model prepared by ``tca_flex.apply`` (any causal LM works
            with a transformers cache).
        input_ids: int64 ``[B, L]``, unpadded rows.
        cache: the cache to fill, e.g. ``tca_flex.TCACache(model)``.
        chunk_size: tokens per forward, ``>= 1``.
        **model_kwargs: passed to every forward (not ``attention_mask``:
            padded rows are not supported).

    Returns:
        ``[B, V]`` logits of the last position.
    """
    check_count("chunk_size", chunk_size)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with length >= 1, got shape {tuple(input_ids.shape)}")
    if not isinstance(cache, Cache):
        # With no cache each chunk would be a prefill of its own, attending to nothing before it.
        raise TypeError(f"chunked_prefill needs the cache to fill (e.g. tca_flex.TCACache(model), or a transformers "
                        f"Cache), got {type(cache).__name__}")
    if "attention_mask" in model_kwargs:
        raise ValueError("chunked_prefill takes unpadded rows only: drop attention_mask (TCACache refuses padding)")
    logits = None
    for start in range(0, input_ids.shape[1], chunk_size):
        out = model(input_ids=input_ids[:, start: start + chunk_size], use_cache=True, logits_to_keep=1,
                    **cache_kwargs(model, cache), **model_kwargs)
        logits = out.logits[:, -1]
    return logits
