"""Perplexity on long natural text, per 1K-token bucket.

Text sources ship with every standard machine, so nothing is downloaded:

- ``pydoc``: Python's own ``pydoc_data.topics`` (the language reference
  topics used by ``help()``, ~465K characters, ~100K tokens), topics joined
  in sorted-key order. Always available; the default.
- ``gpl3``: the GNU GPL v3 text the SmolLM2 budgets were calibrated on,
  shipped as ``tca_flex/data/GPL-3`` (Debian's copy; ~7.7K SmolLM2 tokens,
  so too short for 8K windows).

A sample is a window of ``length + 1`` tokens starting at a seed-dependent
offset; the loss of every predicted token is averaged per bucket of
``bucket`` positions, so losses late in the context stay visible.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

GPL3_PATH = Path(__file__).resolve().parent.parent / "data" / "GPL-3"
SOURCES = ("pydoc", "gpl3")


def natural_text(source: str = "pydoc") -> str:
    """The raw text of ``source`` (one of ``SOURCES``)."""
    if source == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    if source == "gpl3":
        return GPL3_PATH.read_text()
    raise ValueError(f"unknown text source {source!r}; allowed {list(SOURCES)}")


def text_window(token_ids: list[int], length: int, seed: int) -> list[int]:
    """``length + 1`` consecutive tokens at a random (seeded) offset.

    Raises:
        ValueError: the text has fewer than ``length + 1`` tokens.
    """
    if len(token_ids) < length + 1:
        raise ValueError(f"the text has {len(token_ids)} tokens; need {length + 1} for length {length}")
    start = random.Random(seed).randint(0, len(token_ids) - length - 1)
    return token_ids[start:start + length + 1]


def bucket_nll(logits: torch.Tensor, targets: torch.Tensor, bucket: int = 1024) -> list[float]:
    """Mean negative log-likelihood per bucket of positions.

    Args:
        logits: ``[L, V]`` next-token logits for positions ``0..L-1``.
        targets: int64 ``[L]``, the token each position should predict.
        bucket: positions per bucket; the last bucket may be shorter.

    Returns:
        ``ceil(L / bucket)`` mean NLLs in nats (bucket ``j`` covers the
        predictions made at positions ``[j * bucket, (j + 1) * bucket)``).
    """
    nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    return [chunk.mean().item() for chunk in nll.split(bucket)]


def perplexity(nlls: list[float], weights: list[int] | None = None) -> float:
    """``exp`` of the (weighted) mean NLL."""
    weights = weights or [1] * len(nlls)
    return math.exp(sum(n * w for n, w in zip(nlls, weights, strict=True)) / sum(weights))


def bucket_sizes(length: int, bucket: int = 1024) -> list[int]:
    """Number of positions in every bucket of a ``length``-token window."""
    return [min(bucket, length - s) for s in range(0, length, bucket)]
