"""Run a script or module with Inductor config options set for the whole process.

    python scripts/with_inductor.py combo_kernels=1 -- -m tca_flex.bench --phases e2e ...
    python scripts/with_inductor.py combo_kernels=1 -- scripts/gpu_step_profile.py 4 0.25 32768
    python scripts/with_inductor.py freezing=1 cpp.enable_concat_linear=1 -- -m tca_flex.bench --smoke ...

For benchmarks that compile dense and TCA in one process: an option set here applies to both
(a comparison against the fastest dense step must give dense the same chance). The library
itself never changes Inductor's settings. Values: ``1/0``, ``true/false`` as booleans, integers,
floats, else strings; a dotted name reaches a sub-config (``cpp.enable_concat_linear``); an
unknown option name is refused.
"""

from __future__ import annotations

import runpy
import sys
from typing import Any


def parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("1", "true", "on", "yes"):
        return True
    if lowered in ("0", "false", "off", "no"):
        return False
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def option_owner(config: Any, name: str) -> Any:
    """The (sub-)config holding option ``name`` (dotted: ``cpp.enable_concat_linear``), or None."""
    *path, leaf = name.split(".")
    for part in path:
        config = getattr(config, part, None)
        if config is None:
            return None
    return config if hasattr(config, leaf) else None


def main(argv: list[str]) -> None:
    import torch._inductor.config as inductor_config

    if "--" not in argv or argv.index("--") == len(argv) - 1:
        sys.exit("usage: with_inductor.py NAME=VALUE ... -- (-m MODULE | SCRIPT) [ARGS...]")
    split = argv.index("--")
    options = {}
    for item in argv[:split]:
        name, sep, value = item.partition("=")
        if not sep or option_owner(inductor_config, name) is None:
            sys.exit(f"with_inductor.py: {item!r} is not NAME=VALUE with NAME an option of torch._inductor.config")
        options[name] = parse_value(value)
    target = argv[split + 1:]
    if target[0] == "-m" and len(target) < 2:
        sys.exit("with_inductor.py: -m needs a module name")
    for name, value in options.items():
        setattr(option_owner(inductor_config, name), name.rpartition(".")[2], value)
    print(f"torch._inductor.config: {options}", flush=True)
    if target[0] == "-m":
        sys.argv = [target[1], *target[2:]]
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = target
        runpy.run_path(target[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
