"""Argument checks shared by the public entry points: one wording for a bad choice or count."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any


def check_choice(name: str, value: Any, choices: Collection[str], hint: str = "") -> None:
    """Raise ``ValueError`` naming ``name``, ``value`` and the allowed ``choices`` unless ``value`` is one of them."""
    if value not in choices:
        extra = f" {hint}" if hint else ""
        raise ValueError(f"{name}={value!r}{extra} is not one of {list(choices)}")


def check_count(name: str, value: Any, *, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= 1 (or None where ``optional``); bools are refused,
    as ``True`` would pass for 1."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "an int >= 1 or None" if optional else "an int >= 1"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
