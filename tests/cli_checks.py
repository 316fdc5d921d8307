"""A shared check for the command lines: a user's mistake ends in one line, before any model loads."""

from collections.abc import Callable

import pytest


def refused_before_loading(main: Callable[[list[str]], object], base: list[str], extra: list[str], prog: str,
                           capsys) -> str:
    """Run ``main(base)`` (must reach the model loader, which the caller made raise ``AssertionError``)
    and ``main(base + extra)`` (must exit 2 with a one-line ``prog: error:``); return that line."""
    with pytest.raises(AssertionError, match="model loaded"):  # the base arguments themselves are fine
        main(base)
    with pytest.raises(SystemExit) as exit_:
        main(base + extra)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith(f"python -m {prog}: error: ")
    return last
