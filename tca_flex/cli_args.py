"""argparse helpers shared by the command lines: typed, ranged values and paths checked before any work.

A user mistake ends in ``parser.error`` (one line on stderr, exit code 2)
before a model loads, never in a traceback after minutes of compute.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import TCAConfig, parse_overrides


def int_at_least(lo: int) -> Callable[[str], int]:
    """argparse ``type``: an integer ``>= lo``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    return parse


def float_in(lo: float, hi: float = math.inf) -> Callable[[str], float]:
    """argparse ``type``: a number in ``[lo, hi]`` (NaN refused)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not lo <= value <= hi:
            allowed = f">= {lo}" if hi == math.inf else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return value

    return parse


def output_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be written as a file (``None``: it can); checked before any work."""
    if path.is_dir():
        return f"{path} is a directory; give the path of a file"
    parent = path.parent
    if not parent.is_dir():
        return f"the folder {parent} does not exist"
    if not os.access(path if path.exists() else parent, os.W_OK):
        return f"{path if path.exists() else parent} is not writable"
    return None


def output_dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used (or created) as an output folder (``None``: it can)."""
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a folder"
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, so {path} cannot be created"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable"
    return None


def overrides_or_error(parser: argparse.ArgumentParser, items: list[str], flag: str,
                       reserved: dict[str, str]) -> dict[str, Any]:
    """``config.parse_overrides`` with its errors as ``parser.error``."""
    try:
        return parse_overrides(items, flag, reserved)
    except ValueError as err:
        parser.error(str(err))


def config_or_error(parser: argparse.ArgumentParser, fields: dict[str, Any], flags: dict[str, str]) -> TCAConfig:
    """``TCAConfig(**fields)``, or ``parser.error`` naming the flag that set the bad field.

    Args:
        flags: field -> the flag that set it (``{"tau": "--tau"}``).
    """
    try:
        return TCAConfig(**fields)
    except ValueError as err:
        named = re.match(r"TCAConfig\.(\w+)", str(err))
        flag = flags.get(named.group(1)) if named else None
        parser.error(f"argument {flag}: {err}" if flag else str(err))
