"""The package's import graph: no cycles, and no module imports from a floor above its own.

Every import counts, including the lazy ones inside functions: a cycle through a function-level
import is still a cycle in the design.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dmcompile"

# Floors, bottom to top, in pipeline order. A module may import from its own floor or below, never above.
FLOORS = {
    0: ["dmcompile", "dmcompile.errors", "dmcompile.quant", "dmcompile.targets", "dmcompile.budget",
        "dmcompile.config", "dmcompile.scratch", "dmcompile.artifacts", "dmcompile.onnxio", "dmcompile.memory",
        "dmcompile.parallel"],
    1: ["dmcompile.zoo", "dmcompile.frontend", "dmcompile.eval"],
    2: ["dmcompile.calibration"],
    3: ["dmcompile.analysis"],
    4: ["dmcompile.lowering"],
    5: ["dmcompile.backends"],
    6: ["dmcompile.stages", "dmcompile.cache", "dmcompile.compiler", "dmcompile.inspect"],
    7: ["dmcompile.api"],
    8: ["dmcompile.cli"],
}
# Backends only emit: they read lowered graphs, never the algorithms that made them.
BACKENDS_MAY_NOT_IMPORT = ("dmcompile.calibration", "dmcompile.analysis")
# The command line parses arguments and calls the API, nothing else of the package's pipeline.
CLI_MAY_IMPORT = ("dmcompile", "dmcompile.api", "dmcompile.budget", "dmcompile.config", "dmcompile.errors", "dmcompile.targets",
                  "dmcompile.zoo", "dmcompile.artifacts", "dmcompile.eval.grid")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, source: str | None = None) -> set[str]:
    """dmcompile modules imported anywhere in the file (relative imports resolved); ``source``
    stands for the file's text when given."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
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


def floor_violations(g: dict[str, set[str]]) -> list[str]:
    return [f"{m} (floor {floor_of(m)}) imports {d} (floor {floor_of(d)})"
            for m, deps in g.items() for d in sorted(deps) if floor_of(d) > floor_of(m)]


def backend_violations(g: dict[str, set[str]]) -> list[str]:
    return [f"{m} imports {d}" for m, deps in g.items() if m.startswith("dmcompile.backends")
            for d in sorted(deps) if d.startswith(BACKENDS_MAY_NOT_IMPORT)]


def cli_violations(g: dict[str, set[str]]) -> list[str]:
    return [f"dmcompile.cli imports {d}: route it through dmcompile.api"
            for d in sorted(g.get("dmcompile.cli", ())) if d not in CLI_MAY_IMPORT]


def test_no_import_from_a_higher_floor():
    bad = floor_violations(graph())
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
    lazy = "from .. import stages\n\ndef f():\n    from ..lowering.qdq import lower_group\n"
    deps = imports_of(PKG / "compiler" / "steps.py", lazy)
    assert deps == {"dmcompile.stages", "dmcompile.lowering.qdq"}  # qdq is imported inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    with pytest.raises(AssertionError, match="has no floor"):
        floor_of("dmcompile.nowhere")


def test_backends_only_emit():
    bad = backend_violations(graph())
    assert not bad, "\n".join(bad)


def test_cli_only_parses_and_calls_the_api():
    bad = cli_violations(graph())
    assert not bad, "\n".join(bad)


def test_the_rules_catch_the_imports_they_forbid():
    """Each import these rules were written against, planted back, is reported."""
    planted = {
        "dmcompile.lowering.decoder": {"dmcompile.backends.onnxruntime"},
        "dmcompile.analysis.probe": {"dmcompile.lowering.qdq"},
        "dmcompile.backends.openvino": {"dmcompile.calibration.trajectory"},
        "dmcompile.cli": {"dmcompile.api", "dmcompile.stages", "dmcompile.inspect"},
    }
    floors = floor_violations(planted)
    assert len(floors) == 2 and "lowering.decoder" in floors[0] and "analysis.probe" in floors[1]
    assert backend_violations(planted) == ["dmcompile.backends.openvino imports dmcompile.calibration.trajectory"]
    assert [v.split()[2].rstrip(":") for v in cli_violations(planted)] == ["dmcompile.inspect", "dmcompile.stages"]


# Imports of the package's own modules inside functions, and why each cannot sit at the top.
LAZY_OWN_IMPORTS = {
    ("dmcompile.cli", "_api"): "dmcompile.api loads onnx and ONNX Runtime; --help should not wait for them",
}


def lazy_own_imports() -> set[tuple[str, str]]:
    found = set()
    for path in sorted(PKG.rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("dmcompile")):
                        found.add((module_name(path), fn.name))
    return found


def test_own_modules_are_imported_at_the_top():
    assert lazy_own_imports() == set(LAZY_OWN_IMPORTS)
