"""TCAConfig: every knob of TCA-Attention in one frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .checks import check_choice

CONFIG_VERSION = 1
# Decode's grace in ``TCAConfig.accurate()``: long_recall answers at 4K read up to ~100 tokens behind the
# window's start; 128 tokens of grace kept every one of them level with no compression at all
# (EVALUATION.md, 2026-12-04), 64 did not (one prompt of ten).
ACCURATE_GRACE_TOKENS = 128

_GQA_AGGREGATIONS = ("mean", "max")
_MASS_CRITERIA = ("column_mean", "lse")


@dataclass(frozen=True)
class SelectionConfig:
    """The knobs of the online selection, as one object: what ``selection.select``, the
    float64 reference (``reference.reference_keep``) and the tests take.

    ``TCAConfig.selection`` makes one from a validated config (the names are
    the selection's own; ``TCAConfig``'s docstring explains each knob).
    """

    block_size: int = 128
    window: int = 4096
    alpha: float = 0.5
    normalize: bool = False
    num_queries: int = 1
    aggregation: str = "mean"
    guard_floor: float | None = None
    pool_kernel: int = 1
    span: int = 0
    num_spread: int = 0
    anchor_blocks: int = 0


@dataclass(frozen=True)
class TCAConfig:
    """Settings of TCA-Attention; defaults are the paper's (LLaMA-3.1-8B at 128K).

    Attributes:
        block_size: tokens per selection block ``b``; budgets are counted per block.
        window: local window ``w``; query ``i`` always sees keys ``(i - w, i]``.
        tau: calibration target, the attention mass each head must retain.
        alpha: balance between block mass and spread in the redundancy score.
        num_candidates: ``M``, budget configurations tried during calibration.
        sigma: spread of the log-Gaussian candidate distributions.
        gqa_aggregation: how the ``g`` query heads of one KV head are combined
            into one importance row (``"mean"`` or ``"max"``).
        num_observation_queries: ``m``, how many last queries define importance.
        normalize_redundancy: divide block mass by its maximum so that both
            terms of the redundancy score live on ``[0, 1]``.
        min_sparse_length: prompts no longer than ``max(window, this)`` are
            prefilled exactly dense; decode over a ``TCACache`` still compresses
            each block as it leaves the window.
        mass_criterion: calibration's retained-mass measure: the paper's
            ``"column_mean"`` or the exact per-query ``"lse"``.
        mass_quantile: with ``"lse"``, the quantile of per-query retained mass
            that must reach ``tau`` (``None``: the mean).
        guard_floor: opt-in runtime guard (``None``: off). After selection, a
            KV head whose last query keeps less than this mass in any of its
            ``g`` query heads adds its most important dropped tokens until
            every one of them keeps at least this mass (see
            ``selection.guard_keep``); costs tokens only where needed.
        pool_kernel: odd; inside each block, tokens are ranked by importance
            averaged over this many neighbours, so contiguous spans survive
            (SnapKV-style; 1 = the paper's raw ranking).
        span: every kept global token also keeps ``span`` neighbours on each
            side (whole phrases survive in the pruned cache; 0 = the paper's).
        spread_observation_queries: this many extra observation queries, evenly
            spread over the prompt, add the attention they pay to keys beyond
            their local window to the importance (0 = the paper's last-query
            importance). Why: the last queries' attention serves the end of
            the prompt only; earlier queries then lose up to 99% of their
            mass in the sparse prefill (EVALUATION.md, 2026-11-24 probe 4).
        anchor_blocks: prompts with fewer global blocks than this take their
            per-rank budgets from the ladder of ``anchor_blocks`` blocks, cut
            from the bottom to the same total (``selection.budget_ladder``):
            the top-ranked blocks keep what they would at the calibration
            length. Set it to the calibration length's block count. Why: the
            quantile ladder gives rank ``r`` the ``1 - (r + 0.5) / n``
            quantile, so at 2K (``n = 24``) the second-ranked block keeps
            ~20 of 64 tokens where at 8K (``n = 120``) it keeps ~63, and a
            needle's digits are cut (EVALUATION.md, 2026-12-02). Helps sparse
            budgets (tau 0.5-0.7: +21 points at 2K and 4K); at tau 0.9 it empties
            too many low-ranked blocks. 0 = the quantile ladder at every length
            (docs/method.md, "The budget ladder").
        grace_blocks: decode (and appended chunks) compress a block only once
            it lies this many blocks past the window, not as soon as it leaves
            it (0 = the paper's). Each head's ring of exact tokens holds these
            blocks too (``grace_blocks * block_size`` more slots per head).
            Why: an answer that copies text from the prompt's end reads a few
            tokens behind the window's start, so the block that just left is
            the one being copied, and its top-``t`` under the current query
            lose the rest of it (EVALUATION.md, 2026-12-04: ``long_recall``).
        cache_spread_observation_queries: ``None`` (the paper's, default;
            ``accurate()`` sets 0): the pruned cache keeps what the prefill
            attended to. A number: the cache keeps a second selection at the
            same budgets, made with this many spread observation queries
            instead of ``spread_observation_queries`` (0 = the last queries
            alone); the prefill is unchanged. Why: the spread observers make
            the prefill serve every query, but they also rank filler the answer
            never reads above what the question points at; the cache only
            serves what comes after the prompt (EVALUATION.md, 2026-12-05:
            "The cache's own selection").
    """

    block_size: int = 128
    window: int = 4096
    tau: float = 0.9
    alpha: float = 0.5
    num_candidates: int = 14
    sigma: float = 0.5
    gqa_aggregation: str = "mean"
    num_observation_queries: int = 1
    normalize_redundancy: bool = False
    min_sparse_length: int = 0
    mass_criterion: str = "column_mean"
    mass_quantile: float | None = None
    guard_floor: float | None = None
    pool_kernel: int = 1
    span: int = 0
    spread_observation_queries: int = 0
    anchor_blocks: int = 0
    grace_blocks: int = 0
    cache_spread_observation_queries: int | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        _check_int("block_size", self.block_size, 1, 4096)
        _check_int("window", self.window, self.block_size, None,
                   hint="the local window must cover at least one block")
        _check_float("tau", self.tau, 0.0, 1.0)
        _check_float("alpha", self.alpha, 0.0, 1.0)
        _check_int("num_candidates", self.num_candidates, 1, 1024)
        _check_float("sigma", self.sigma, 1e-6, 100.0)
        _check_choice("gqa_aggregation", self.gqa_aggregation, _GQA_AGGREGATIONS)
        _check_int("num_observation_queries", self.num_observation_queries, 1, 65536)
        if not isinstance(self.normalize_redundancy, bool):
            raise ValueError(f"TCAConfig.normalize_redundancy must be a bool, got {self.normalize_redundancy!r}")
        _check_int("min_sparse_length", self.min_sparse_length, 0, None)
        _check_choice("mass_criterion", self.mass_criterion, _MASS_CRITERIA)
        if self.mass_quantile is not None:
            _check_float("mass_quantile", self.mass_quantile, 0.0, 1.0)
            if self.mass_criterion != "lse":
                # column_mean has no per-query masses to take a quantile of: it would be ignored.
                raise ValueError(f"TCAConfig.mass_quantile={self.mass_quantile} applies to mass_criterion='lse' only "
                                 f"(got {self.mass_criterion!r}); set mass_quantile=None or mass_criterion='lse'")
        if self.guard_floor is not None:
            _check_float("guard_floor", self.guard_floor, 0.0, 1.0)
        _check_int("pool_kernel", self.pool_kernel, 1, 1025)
        _check_int("span", self.span, 0, 512)
        _check_int("spread_observation_queries", self.spread_observation_queries, 0, 65536)
        _check_int("anchor_blocks", self.anchor_blocks, 0, 1 << 20)
        _check_int("grace_blocks", self.grace_blocks, 0, 1024)
        if self.cache_spread_observation_queries is not None:
            _check_int("cache_spread_observation_queries", self.cache_spread_observation_queries, 0, 65536)
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"TCAConfig.pool_kernel={self.pool_kernel} must be odd (centred on the token)")
        if isinstance(self.version, bool) or self.version != CONFIG_VERSION:
            raise ValueError(
                f"TCAConfig.version={self.version} is not supported by this tca_flex "
                f"(expects {CONFIG_VERSION}); re-create the config or re-run calibration."
            )

    @property
    def selection(self) -> SelectionConfig:
        """The selection knobs (everything but calibration's and the version)."""
        return SelectionConfig(block_size=self.block_size, window=self.window, alpha=self.alpha,
                               normalize=self.normalize_redundancy, num_queries=self.num_observation_queries,
                               aggregation=self.gqa_aggregation, guard_floor=self.guard_floor,
                               pool_kernel=self.pool_kernel, span=self.span,
                               num_spread=self.spread_observation_queries, anchor_blocks=self.anchor_blocks)

    @property
    def cache_selection(self) -> SelectionConfig | None:
        """The knobs of the cache's own selection, or ``None`` where the cache keeps the prefill's."""
        spread = self.cache_spread_observation_queries
        if spread is None or spread == self.spread_observation_queries:
            return None
        return dataclasses.replace(self.selection, num_spread=spread)

    @property
    def compress_window(self) -> int:
        """Tokens behind the newest one past which decode compresses a block: the window plus the grace."""
        return self.window + self.grace_blocks * self.block_size

    @property
    def dense_up_to(self) -> int:
        """Longest sequence that runs exactly dense."""
        return max(self.window, self.min_sparse_length)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TCAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TCAConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> TCAConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def accurate(cls, **overrides: Any) -> TCAConfig:
        """The selection knobs that keep answers intact in the pruned KV cache.

        The paper's selection (the class defaults) ranks by the last query
        only and calibrated budgets then spread tokens almost evenly over
        blocks, so a multi-token answer rarely survives pruning
        (EVALUATION.md, 2026-12-02: 0-20% answer agreement with dense at 2K).
        These settings keep TCA's structure and change only its knobs:
        ``sigma=2.0`` (wide candidate ladders: top-ranked blocks keep many
        tokens, low-ranked ones few), ``alpha=0`` (rank blocks by mass),
        ``num_observation_queries=32`` (the question, not only its last token),
        ``pool_kernel=7`` (keep spans), ``spread_observation_queries=32``
        (serve the whole prompt, which lets calibration pass with fewer
        tokens) and a grace of ``ACCURATE_GRACE_TOKENS`` (decode compresses a
        block only once it lies that many tokens, in whole blocks, past the
        window, so a long answer copying the prompt's end keeps what it is
        reading: ``grace_blocks = 2`` at block size 64, 1 at 128) and
        ``cache_spread_observation_queries=0`` (the pruned cache keeps what
        the question's last 32 queries read, at the same budgets: +2.1 points
        on long answers and +1.8 on the needle tasks over keeping the prefill's
        selection, 2K-8K, H200; EVALUATION.md, 2026-12-05). The shipped SmolLM2
        budgets use them. Budgets must be calibrated with the same knobs
        (``grace_blocks`` and ``cache_spread_observation_queries`` excepted:
        calibration never decodes).
        """
        block = overrides.get("block_size", cls.block_size)
        # An invalid block size gets no grace here: __post_init__ then refuses it with its own message.
        grace = -(-ACCURATE_GRACE_TOKENS // block) if isinstance(block, int) and block > 0 else 0
        knobs: dict[str, Any] = dict(sigma=2.0, alpha=0.0, num_observation_queries=32, pool_kernel=7,
                                     spread_observation_queries=32, grace_blocks=grace,
                                     cache_spread_observation_queries=0)
        return cls(**{**knobs, **overrides})


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_overrides(items: list[str], flag: str = "option", reserved: dict[str, str] | None = None
                    ) -> dict[str, Any]:
    """``["alpha=0", "normalize_redundancy=true", "mass_quantile=none"]`` -> TCAConfig kwargs.

    Values take the type of the field's default (optional floats accept
    ``none``; booleans ``true/false``, ``1/0``, ``yes/no``, ``on/off``).
    Command lines use it for ``FIELD=VALUE`` overrides; ranges are checked
    when the TCAConfig is built.

    Args:
        items: ``FIELD=VALUE`` strings.
        flag: how errors name the option (``"--option"``).
        reserved: fields that have their own flag (``{"tau": "--tau"}``):
            refused here, so that the two cannot silently disagree.

    Raises:
        ValueError: naming ``flag`` and the item: an unknown field, one given
            twice or reserved, or a value that does not parse as its type.
    """
    fields = {f.name: f for f in dataclasses.fields(TCAConfig)}
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"{flag} {item!r}: expected FIELD=VALUE with FIELD in {sorted(fields)}")
        if reserved and name in reserved:
            raise ValueError(f"{flag} {item!r}: {name} has its own flag, use {reserved[name]}")
        if name in out:
            raise ValueError(f"{flag} {item!r}: {name} is given twice")
        out[name] = _parse_value(fields[name], raw.strip(), f"{flag} {item!r}")
    return out


# The type of an optional field's value (its default, None, does not say it).
_OPTIONAL_TYPES = {"float | None": float, "int | None": int}


def _parse_value(field: dataclasses.Field, raw: str, where: str) -> Any:
    """``raw`` as the type of the field (of its default; an optional field's ``none`` is None)."""
    low = raw.lower()
    default = field.default
    kind = _OPTIONAL_TYPES[field.type] if default is None else type(default)
    try:
        if kind is bool:
            if low not in _TRUE + _FALSE:
                raise ValueError(raw)
            return low in _TRUE
        if default is None and low == "none":
            return None
        return kind(raw)  # int, float, str
    except ValueError:
        what = {bool: "true or false", int: "an integer", float: "a number"}.get(kind, "text")
        raise ValueError(f"{where}: {field.name} takes {what}{' or none' if default is None else ''}, "
                         f"got {raw!r}") from None


def _check_int(name: str, value: Any, lo: int, hi: int | None, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"TCAConfig.{name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        allowed = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        extra = f" ({hint})" if hint else ""
        raise ValueError(f"TCAConfig.{name}={value} is out of range: allowed {allowed}{extra}")


def _check_float(name: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"TCAConfig.{name} must be a number, got {value!r}")
    if not lo <= float(value) <= hi:
        raise ValueError(f"TCAConfig.{name}={value} is out of range: allowed [{lo}, {hi}]")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    check_choice(f"TCAConfig.{name}", value, allowed)
