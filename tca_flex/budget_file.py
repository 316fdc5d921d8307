"""The budget file: versioned JSON for ``HeadBudgets``, checked field by field on load.

Layout (``format_version`` 1): a header (``format``, ``format_version``,
``fingerprint``, ``config``, ``notes``, ``num_layers``, ``num_kv_heads``), then
``heads``, one row per (layer, KV head) in that order, written one per line::

    {"layer": 0, "kv_head": 1, "candidate": 3, "expected_kept_fraction": 0.41,
     "retained_mass": 0.93, "probs": [0.0, 0.02, ...]}

``probs`` is what selection uses. ``candidate`` and ``retained_mass`` record
what calibration chose and measured (``null``: unknown); they never change
attention. ``expected_kept_fraction`` is derived from ``probs``
(``sum_k k p(k) / block_size``) for people reading the file: on load it must
match ``probs`` (editing it alone would change nothing) and may be left out.

Every load error is a ``ValueError`` that names the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import torch

from .config import TCAConfig

BUDGETS_FORMAT = "tca_flex.head_budgets"
BUDGETS_FORMAT_VERSION = 1
HEADER_FIELDS = ("format", "format_version", "fingerprint", "config", "notes", "num_layers", "num_kv_heads",
                 "heads")
ROW_FIELDS = ("layer", "kv_head", "candidate", "expected_kept_fraction", "retained_mass", "probs")
DERIVED_ROW_FIELDS = ("expected_kept_fraction",)
# A fingerprint (integration.model_fingerprint) is empty (hand-made budgets) or
# has all of these: a partial one would silently skip checks against the model.
FINGERPRINT_TYPES: dict[str, tuple[type, ...]] = {
    "model_type": (str,), "architecture": (str,), "num_layers": (int,), "num_kv_heads": (int, type(None)),
    "head_dim": (int, type(None)), "name_or_path": (str, type(None))}
# TCAConfig fields added after format-1 files were first written, with the value
# that reproduces a file without them (the behaviour before the field existed).
# Every other config field must be in the file: a default would silently stand
# in for the knob the budgets were calibrated with.
CONFIG_FIELDS_ADDED_LATER: dict[str, Any] = {"anchor_blocks": 0, "grace_blocks": 0,
                                             "cache_spread_observation_queries": None}
# How far a stored expected_kept_fraction may be from its probs: both are
# float64 from the same formula, so only a hand edit exceeds this.
DERIVED_TOLERANCE = 1e-9


def expected_kept_fraction(probs: torch.Tensor, block_size: int) -> torch.Tensor:
    """float64 ``[...]``: ``sum_k k p(k) / b`` of ``probs`` ``[..., b + 1]``."""
    k = torch.arange(block_size + 1, dtype=torch.float64)
    return (probs.to(torch.float64) * k).sum(-1) / block_size


def dumps(probs: torch.Tensor, config: TCAConfig, retained_mass: torch.Tensor | None,
          candidate: torch.Tensor | None, fingerprint: dict[str, Any], notes: dict[str, Any]) -> str:
    """The file text (module docstring); floats in ``repr`` precision, so ``loads`` restores them exactly.

    Args:
        probs: float64 ``[layers, kv_heads, b + 1]``.
        retained_mass: float64 ``[layers, kv_heads]`` (NaN: unknown) or None.
        candidate: int64 ``[layers, kv_heads]`` or None.
    """
    layers, heads = probs.shape[0], probs.shape[1]
    expected = expected_kept_fraction(probs, config.block_size)
    header = {"format": BUDGETS_FORMAT, "format_version": BUDGETS_FORMAT_VERSION, "fingerprint": fingerprint,
              "config": config.to_dict(), "notes": notes, "num_layers": layers, "num_kv_heads": heads}
    lines = [json.dumps(header, indent=2)[:-2] + ",", '  "heads": [']
    rows = []
    for layer in range(layers):
        for head in range(heads):
            mass = None if retained_mass is None else float(retained_mass[layer, head])
            row = {"layer": layer, "kv_head": head,
                   "candidate": None if candidate is None else int(candidate[layer, head]),
                   "expected_kept_fraction": float(expected[layer, head]),
                   "retained_mass": None if mass is None or math.isnan(mass) else mass,
                   "probs": probs[layer, head].tolist()}
            rows.append("    " + json.dumps(row, allow_nan=False))
    lines.append(",\n".join(rows))
    lines.append("  ]\n}\n")
    return "\n".join(lines)


class _Refused(ValueError):
    """A field's problem, before the file name is added."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"field {key!r} appears twice in one object")
        out[key] = value
    return out


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _int(value: Any, where: str, lo: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Refused(f"field {where} must be an integer, got {_kind(value)} {value!r}")
    if lo is not None and value < lo:
        raise _Refused(f"field {where}={value} must be >= {lo}")
    return value


def _number(value: Any, where: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Refused(f"field {where} must be a number, got {_kind(value)} {value!r}")
    if not lo <= value <= hi:  # NaN fails too
        raise _Refused(f"field {where}={value!r} must be a finite number in [{lo}, {hi}]")
    return float(value)


def _object(value: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    if not isinstance(value, dict):
        raise _Refused(f"field {where} must be an object, got {_kind(value)}")
    missing = [f for f in required if f not in value]
    unknown = sorted(set(value) - set(required) - set(optional))
    if missing or unknown:
        what = "; ".join(p for p in (f"missing {missing}" if missing else "",
                                     f"unknown {unknown}" if unknown else "") if p)
        raise _Refused(f"field {where}: {what} (fields are {list(required) + list(optional)})")
    return value


def fingerprint_problem(fingerprint: Any) -> str | None:
    """What is wrong with a fingerprint (``None``: nothing): empty, or every ``FINGERPRINT_TYPES`` field typed."""
    if fingerprint == {}:
        return None
    try:
        _object(fingerprint, "fingerprint", tuple(FINGERPRINT_TYPES))
    except _Refused as err:
        return str(err)
    for name, types in FINGERPRINT_TYPES.items():
        value = fingerprint[name]
        if isinstance(value, bool) or not isinstance(value, types):
            allowed = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            return f"field fingerprint.{name} must be {allowed}, got {_kind(value)} {value!r}"
    return None


def _fingerprint(value: Any) -> dict[str, Any]:
    problem = fingerprint_problem(value)
    if problem:
        raise _Refused(problem)
    return dict(value)


def _config(value: Any) -> TCAConfig:
    names = tuple(f.name for f in dataclasses.fields(TCAConfig))
    required = tuple(n for n in names if n not in CONFIG_FIELDS_ADDED_LATER)
    data = _object(value, "config", required, optional=tuple(CONFIG_FIELDS_ADDED_LATER))
    try:
        return TCAConfig(**{**CONFIG_FIELDS_ADDED_LATER, **data})
    except ValueError as err:
        raise _Refused(f"field config: {err}") from None


def _rows(value: Any, layers: int, heads: int, block_size: int) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _Refused(f"field heads must be a list, got {_kind(value)}")
    if len(value) != layers * heads:
        raise _Refused(f"field heads has {len(value)} rows; num_layers x num_kv_heads = {layers} x {heads} "
                       f"needs {layers * heads}")
    required = tuple(f for f in ROW_FIELDS if f not in DERIVED_ROW_FIELDS)
    for i, row in enumerate(value):
        where = f"heads[{i}]"
        _object(row, where, required, optional=DERIVED_ROW_FIELDS)
        at = (_int(row["layer"], f"{where}.layer"), _int(row["kv_head"], f"{where}.kv_head"))
        if at != divmod(i, heads):
            raise _Refused(f"field {where} is (layer, kv_head) = {at}, expected {divmod(i, heads)}: rows go in "
                           "layer, then KV head order")
        probs = row["probs"]
        if not isinstance(probs, list) or len(probs) != block_size + 1:
            size = len(probs) if isinstance(probs, list) else _kind(probs)
            raise _Refused(f"field {where}.probs must be a list of block_size + 1 = {block_size + 1} "
                           f"numbers, got {size}")
        for k, p in enumerate(probs):
            _number(p, f"{where}.probs[{k}]", 0.0, 1.0)
        if row["candidate"] is not None:
            _int(row["candidate"], f"{where}.candidate", lo=-1)
        if row["retained_mass"] is not None:
            _number(row["retained_mass"], f"{where}.retained_mass", 0.0, 1.0)
        if "expected_kept_fraction" in row:
            _number(row["expected_kept_fraction"], f"{where}.expected_kept_fraction", 0.0, 1.0)
    return value


def _tensors(rows: list[dict[str, Any]], layers: int, heads: int, block_size: int) -> dict[str, Any]:
    probs = torch.tensor([r["probs"] for r in rows], dtype=torch.float64)
    sums = probs.sum(-1)
    bad = (sums - 1.0).abs() > 1e-6  # HeadBudgets' own tolerance
    if bad.any():
        i = int(bad.nonzero()[0])
        raise _Refused(f"field heads[{i}].probs sums to {float(sums[i])!r}, not 1")
    expected = expected_kept_fraction(probs, block_size)
    for i, row in enumerate(rows):
        stored = row.get("expected_kept_fraction")
        if stored is not None and abs(stored - float(expected[i])) > DERIVED_TOLERANCE:
            raise _Refused(f"field heads[{i}].expected_kept_fraction={stored!r} does not match its probs "
                           f"({float(expected[i])!r}); it is derived from probs and read by people only: edit "
                           "probs instead, or delete the field")
    masses, cands = [r["retained_mass"] for r in rows], [r["candidate"] for r in rows]
    if any(c is None for c in cands) and not all(c is None for c in cands):
        raise _Refused("field candidate must be given for every head or for none (null)")
    mass = None if all(m is None for m in masses) else torch.tensor(
        [math.nan if m is None else m for m in masses], dtype=torch.float64).view(layers, heads)
    cand = None if cands[0] is None else torch.tensor(cands, dtype=torch.int64).view(layers, heads)
    return {"probs": probs.view(layers, heads, block_size + 1), "retained_mass": mass, "candidate": cand}


def loads(text: str, source: str) -> dict[str, Any]:
    """Parse and check a budget file; returns ``HeadBudgets`` keyword arguments.

    Args:
        text: the file's text.
        source: how errors name the file (its path).

    Raises:
        ValueError: naming ``source`` and the field, for anything but a valid
            file of this format version.
    """
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}): the "
                         "file is truncated or corrupt; save the budgets again or re-run calibration") from None
    except _Refused as err:
        raise ValueError(f"{source}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != BUDGETS_FORMAT:
        raise ValueError(f"{source} is not a tca_flex budget file (expected format={BUDGETS_FORMAT!r})")
    version = data.get("format_version")
    if isinstance(version, bool) or version != BUDGETS_FORMAT_VERSION:
        raise ValueError(f"{source} has budget format_version={version!r}, but this tca_flex reads only version "
                         f"{BUDGETS_FORMAT_VERSION}; re-run calibration (python -m tca_flex.calibration ...) to "
                         "make a current file")
    try:
        _object(data, "(top level)", HEADER_FIELDS)
        layers, heads = _int(data["num_layers"], "num_layers", 1), _int(data["num_kv_heads"], "num_kv_heads", 1)
        config = _config(data["config"])
        fingerprint = _fingerprint(data["fingerprint"])
        if not isinstance(data["notes"], dict):
            raise _Refused(f"field notes must be an object, got {_kind(data['notes'])}")
        rows = _rows(data["heads"], layers, heads, config.block_size)
        tensors = _tensors(rows, layers, heads, config.block_size)
    except _Refused as err:
        raise ValueError(f"{source}: {err}") from None
    return {**tensors, "config": config, "fingerprint": fingerprint, "notes": dict(data["notes"])}
