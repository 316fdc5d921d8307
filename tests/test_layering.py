"""The package's modules import each other top-down: no import cycle, not even through a
function-local import (config/budgets -> selection/masks -> kernels -> attention/cache ->
integration -> public API)."""

import ast
import pathlib

import tca_flex

ROOT = pathlib.Path(tca_flex.__file__).parent


def _imports() -> dict[str, set[str]]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = path.with_suffix("").relative_to(ROOT.parent).parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                # "from . import x" names submodules; "from .x import y" the module x (or x.y).
                named = [f"{target}.{a.name}" for a in node.names]
                edges[name] |= {t for t in (named if node.module is None else [target] + named)
                                if t in modules and t != name}
    return edges


def test_no_import_cycle_among_modules():
    edges = _imports()
    # The package's __init__ re-exports the public API; a module importing the package
    # itself (none does) would show up as an edge to "tca_flex" and is reported below.
    state: dict[str, int] = {}
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(edges[name] - {"tca_flex"}):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(edges):
        if name not in state and name != "tca_flex":
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert not any("tca_flex" in targets for name, targets in edges.items() if name != "tca_flex")


def test_the_checker_sees_function_local_imports(tmp_path, monkeypatch):
    """The check can fail: a cycle through an import inside a function is found."""
    package = tmp_path / "tca_flex"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import g\n")
    (package / "b.py").write_text("def g():\n    from .a import f\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", package)
    edges = _imports()
    assert "tca_flex.a" in edges["tca_flex.b"] and "tca_flex.b" in edges["tca_flex.a"]
