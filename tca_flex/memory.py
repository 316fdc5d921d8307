"""Memory accounting of the TCA cache: what is kept vs a dense cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LayerMemory:
    """One layer's cache, summed over batch rows and KV heads.

    Attributes:
        kept_tokens: live (row, head, token) entries.
        dense_tokens: entries a dense cache of the same logical length holds.
        slots: allocated (row, slot) entries of the flat buffers.
        bytes_used: bytes of K, V and the per-slot index tensors.
        bytes_per_token: K + V bytes of one entry.
    """

    kept_tokens: int
    dense_tokens: int
    slots: int
    bytes_used: int
    bytes_per_token: int

    @property
    def dense_bytes(self) -> int:
        return self.dense_tokens * self.bytes_per_token

    @property
    def kept_fraction(self) -> float:
        """Kept entries / dense entries."""
        return self.kept_tokens / self.dense_tokens if self.dense_tokens else 0.0

    @property
    def bytes_fraction(self) -> float:
        """Bytes used / dense bytes."""
        return self.bytes_used / self.dense_bytes if self.dense_tokens else 0.0

    @property
    def overhead(self) -> float:
        """Bytes used / (kept entries x bytes per entry) - 1: the price of headroom and indices."""
        kept = self.kept_tokens * self.bytes_per_token
        return self.bytes_used / kept - 1.0 if kept else 0.0


@dataclass(frozen=True)
class MemoryReport:
    """Per-layer ``LayerMemory`` and their totals (``TCACache.memory_report()``)."""

    layers: list[LayerMemory] = field(default_factory=list)

    @property
    def total(self) -> LayerMemory:
        per_token = self.layers[0].bytes_per_token if self.layers else 0
        return LayerMemory(kept_tokens=sum(m.kept_tokens for m in self.layers),
                           dense_tokens=sum(m.dense_tokens for m in self.layers),
                           slots=sum(m.slots for m in self.layers),
                           bytes_used=sum(m.bytes_used for m in self.layers),
                           bytes_per_token=per_token)

    def format(self) -> str:
        """A small table: per layer and total, kept fraction, bytes used vs dense, overhead."""
        rows = [f"{'layer':>5} {'kept':>9} {'dense':>9} {'kept%':>6} {'MiB used':>9} {'MiB dense':>9} "
                f"{'bytes%':>6} {'overhead':>8}"]
        named = [(str(i), m) for i, m in enumerate(self.layers)] + [("total", self.total)]
        for name, m in named:
            rows.append(f"{name:>5} {m.kept_tokens:>9} {m.dense_tokens:>9} {100 * m.kept_fraction:>5.1f}% "
                        f"{m.bytes_used / 2**20:>9.2f} {m.dense_bytes / 2**20:>9.2f} "
                        f"{100 * m.bytes_fraction:>5.1f}% {100 * m.overhead:>7.1f}%")
        return "\n".join(rows)


def cache_bytes(cache: Any) -> int:
    """Bytes a KV cache holds: what a ``TCACache`` keeps (its ``memory_report``), or the key and
    value tensors of any other transformers cache (``DynamicCache``; a ``StaticCache``'s whole room)."""
    if hasattr(cache, "memory_report"):
        return cache.memory_report().total.bytes_used
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
