"""The package's import graph: no cycles, and no module imports from a floor above its own.

Every import counts, including the lazy ones inside functions: a cycle through a function-level
import is still a cycle in the design.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dmcompile"

# Floors, bottom to top. A module may import from its own floor or below, never above.
FLOORS = {
    0: ["dmcompile", "dmcompile.errors", "dmcompile.quant", "dmcompile.targets", "dmcompile.budget",
        "dmcompile.config", "dmcompile.artifacts", "dmcompile.onnxio", "dmcompile.memory"],
    1: ["dmcompile.zoo", "dmcompile.frontend"],
    2: ["dmcompile.calibration", "dmcompile.analysis", "dmcompile.lowering", "dmcompile.backends", "dmcompile.eval"],
    3: ["dmcompile.stages"],
    4: ["dmcompile.compiler", "dmcompile.inspect"],
    5: ["dmcompile.api"],
    6: ["dmcompile.cli"],
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """dmcompile modules imported anywhere in the file (relative imports resolved)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "dmcompile")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "dmcompile":
                continue
            for a in node.names:  # `from . import api` imports the module dmcompile.api
                sub = f"{target}.{a.name}"
                out.add(sub if _is_module(sub) else target)
    return {m for m in out if m != me}


def _is_module(name: str) -> bool:
    p = PKG.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def floor_of(module: str) -> int:
    best = None
    for floor, prefixes in FLOORS.items():
        for prefix in prefixes:
            # the package root names itself only; every other prefix covers its submodules
            if module == prefix or (prefix != "dmcompile" and module.startswith(prefix + ".")):
                if best is None or len(prefix) > len(best[1]):
                    best = (floor, prefix)
    assert best is not None, f"{module} has no floor: add it to FLOORS"
    return best[0]


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PKG.rglob("*.py"))}


def test_every_module_has_a_floor():
    for m in graph():
        floor_of(m)


def test_no_import_from_a_higher_floor():
    bad = [f"{m} (floor {floor_of(m)}) imports {d} (floor {floor_of(d)})"
           for m, deps in graph().items() for d in sorted(deps) if floor_of(d) > floor_of(m)]
    assert not bad, "\n".join(bad)


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if d == "dmcompile":  # the package root holds only the version string
                continue
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_checks_catch_what_they_should():
    """The walker sees lazy imports and the cycle finder finds a planted cycle."""
    deps = imports_of(PKG / "compiler.py")
    assert "dmcompile.stages" in deps and "dmcompile.lowering.qdq" in deps  # qdq is imported inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    with pytest.raises(AssertionError, match="has no floor"):
        floor_of("dmcompile.nowhere")
