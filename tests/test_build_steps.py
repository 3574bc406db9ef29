"""The build as data: its step list, the values the steps pass, and docs/ARCHITECTURE.md's table
of it, checked against each other without running a build."""

import ast
import re
from collections import Counter
from pathlib import Path

from dmcompile.backends import BACKENDS, get_backend
from dmcompile.compiler import INPUTS, STEPS, VALUES, build_steps
from dmcompile.targets import PROFILES

ROOT = Path(__file__).resolve().parents[1]


def documented_steps() -> list[tuple[str, str, str]]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = text.split("<!-- build-steps")[1].split("<!-- /build-steps -->")[0]
    rows = []
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.match(r"`(\w+)`", cells[0]) if cells and cells[0] else None
        if m:
            rows.append((m.group(1), cells[1], cells[2]))
    return rows


def test_the_documented_steps_are_the_code_s():
    code = [(s.name, ", ".join(s.reads), s.writes or "") for s in STEPS]
    trt = [(s.name, ", ".join(s.reads), s.writes or "") for s in build_steps("tensorrt")[len(STEPS):]]
    assert documented_steps() == code + trt


def test_every_step_reads_values_written_before_it():
    for profile in PROFILES:
        have = set(INPUTS) | {"lowered", "folder", "cache"}  # lowered: () unless a lower_ step runs
        for step in build_steps(profile):
            missing = [r for r in step.reads if r not in have]
            assert not missing, f"{profile}: step {step.name} reads {missing} before any step writes it"
            if step.writes and not step.writes.startswith("body."):
                assert step.writes in VALUES, f"step {step.name} writes {step.writes}, which VALUES does not type"
                have.add(step.writes)
        assert "manifest" in have


def test_each_profile_has_a_registered_backend_and_the_steps_it_adds():
    for name, profile in PROFILES.items():
        backend = get_backend(profile.backend)
        assert backend.name == profile.backend and profile.backend in BACKENDS
        names = [s.name for s in build_steps(name)]
        assert names[: len(STEPS)] == [s.name for s in STEPS] and len(set(names)) == len(names)
    assert [s.name for s in build_steps("tensorrt")][len(STEPS):] == ["build_plans"]
    assert build_steps("ort-cpu") == STEPS


def test_no_two_public_functions_share_a_name():
    names = Counter()
    where = {}
    for path in sorted((ROOT / "dmcompile").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                names[node.name] += 1
                where.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
    twice = {n: where[n] for n, c in names.items() if c > 1}
    assert not twice, twice


def test_no_backend_is_chosen_by_name_outside_the_registry():
    """Code outside dmcompile/backends/ (and dmruntime's engine registry) asks the registry
    (get_backend, engine_runtime) and the profile; it never compares a runtime's or backend's name
    (a new backend would have to find every such place)."""
    names = set(BACKENDS) | set(PROFILES)
    runtime = ROOT / "runtimes" / "python" / "dmruntime"
    own = {runtime / "engines.py", runtime / "engine.py", runtime / "openvino_engine.py"}  # the runtime's registry
    bad = []
    for path in sorted([*(ROOT / "dmcompile").rglob("*.py"), *runtime.rglob("*.py")]):
        if "backends" in path.parts or "tensorrt" in path.parts or path in own:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                consts += [e.value for c in node.comparators if isinstance(c, (ast.Tuple, ast.List, ast.Set))
                           for e in c.elts if isinstance(e, ast.Constant)]
                if names & {c for c in consts if isinstance(c, str)}:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad
