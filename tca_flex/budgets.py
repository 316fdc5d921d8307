"""HeadBudgets: how many tokens each (layer, KV head) keeps per block.

A head's budget is a distribution ``p`` over per-block keep counts
``k in {0..b}`` (calibration picks it; see ``calibration.py``). For a sequence
with ``n`` candidate blocks, the block of rank ``r`` keeps ``Psi[r]`` tokens,
the ``1 - (r + 0.5) / n`` quantile of ``p`` (``TCA_METHOD.md``), so ``Psi``
is non-increasing and its mean approaches ``E[k]`` as ``n`` grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import TCAConfig


@dataclass(frozen=True)
class HeadBudgets:
    """Per-layer, per-KV-head budget distributions.

    Attributes:
        probs: float64 ``[num_layers, num_kv_heads, block_size + 1]``; row
            ``(l, h)`` is ``p(k)``, the probability that a block keeps ``k``
            tokens. Rows sum to 1.
        config: the TCAConfig the budgets were made for (block size, window).
        retained_mass: optional float64 ``[num_layers, num_kv_heads]``, the
            mass each head retained during calibration (NaN where unknown).
        candidate: optional int64 ``[num_layers, num_kv_heads]``, index of the
            chosen calibration candidate (-1 for a dense head).
        fingerprint: description of the model the budgets belong to.
    """

    probs: torch.Tensor
    config: TCAConfig
    retained_mass: torch.Tensor | None = None
    candidate: torch.Tensor | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        b = self.config.block_size
        if self.probs.dim() != 3 or self.probs.shape[-1] != b + 1:
            raise ValueError(
                f"HeadBudgets.probs must have shape [layers, kv_heads, block_size + 1 = {b + 1}], "
                f"got {tuple(self.probs.shape)}"
            )
        if not torch.isfinite(self.probs).all() or (self.probs < 0).any():
            raise ValueError("HeadBudgets.probs must be finite and non-negative")
        sums = self.probs.sum(-1)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-6):
            raise ValueError("every HeadBudgets.probs row must sum to 1")
        object.__setattr__(self, "probs", self.probs.to(torch.float64).cpu())

    @property
    def num_layers(self) -> int:
        return self.probs.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.probs.shape[1]

    @classmethod
    def uniform(cls, num_layers: int, num_kv_heads: int, keep_fraction: float,
                config: TCAConfig | None = None) -> HeadBudgets:
        """Every head keeps ``keep_fraction`` of each block's tokens (on average).

        The fraction ``f * b`` is split between its floor and ceiling so that
        the expected keep count is exactly ``f * b``.
        """
        config = config or TCAConfig()
        if not 0.0 <= keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction={keep_fraction} is out of range: allowed [0, 1]")
        if num_layers < 1 or num_kv_heads < 1:
            raise ValueError(f"need num_layers >= 1 and num_kv_heads >= 1, got {num_layers}, {num_kv_heads}")
        b = config.block_size
        target = keep_fraction * b
        lo = min(int(math.floor(target)), b)
        frac = target - lo
        row = torch.zeros(b + 1, dtype=torch.float64)
        row[lo] = 1.0 - frac
        if frac > 0:
            row[lo + 1] = frac
        probs = row.expand(num_layers, num_kv_heads, b + 1).clone()
        return cls(probs=probs, config=config)

    @classmethod
    def dense(cls, num_layers: int, num_kv_heads: int, config: TCAConfig | None = None) -> HeadBudgets:
        """Every block keeps all its tokens: TCA then equals dense attention."""
        return cls.uniform(num_layers, num_kv_heads, 1.0, config)

    def slice_heads(self, start: int, stop: int) -> HeadBudgets:
        """The budgets of KV heads ``[start, stop)`` of every layer.

        Used under tensor parallelism, where a rank holds a contiguous slice of
        the KV heads; ``retained_mass`` and ``candidate`` are sliced alike.
        """
        if not 0 <= start < stop <= self.num_kv_heads:
            raise ValueError(f"KV head slice [{start}, {stop}) is out of range: allowed "
                             f"0 <= start < stop <= {self.num_kv_heads}")

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:, start:stop].clone()

        return HeadBudgets(probs=cut(self.probs), config=self.config, retained_mass=cut(self.retained_mass),
                           candidate=cut(self.candidate), fingerprint=dict(self.fingerprint))

    def cdf(self, layer: int) -> torch.Tensor:
        """float64 ``[num_kv_heads, block_size + 1]``: cumulative ``p`` of ``layer``."""
        return self.probs[layer].cumsum(-1)

    def expected_per_block(self) -> torch.Tensor:
        """float64 ``[layers, kv_heads]``: ``E[k] = sum_k k p(k)``, tokens kept per block."""
        k = torch.arange(self.config.block_size + 1, dtype=torch.float64)
        return (self.probs * k).sum(-1)

    def keep_fraction(self) -> torch.Tensor:
        """float64 ``[layers, kv_heads]``: expected fraction of global-region tokens kept."""
        return self.expected_per_block() / self.config.block_size
