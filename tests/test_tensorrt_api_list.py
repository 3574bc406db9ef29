"""scripts/check_tensorrt_api.py checks a list of TensorRT / CUDA names against the real bindings
(where they can be installed); this test keeps that list equal to what dmruntime.tensorrt's source
calls, so a new call cannot escape the check."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "runtimes" / "python" / "dmruntime" / "tensorrt"


def _used():
    spec = importlib.util.spec_from_file_location("check_tensorrt_api", ROOT / "scripts" / "check_tensorrt_api.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.USED


def chains(path: Path, roots: dict[str, str]) -> set[tuple[str, str]]:
    """(group, dotted attribute) for every attribute chain rooted at one of ``roots`` (a name or
    ``self.name``), e.g. self.trt.TensorIOMode.INPUT -> ("trt", "TensorIOMode.INPUT")."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        parts, cur = [], node
        while isinstance(cur, ast.Attribute):
            parts.append(cur.attr)
            cur = cur.value
        if not isinstance(cur, ast.Name):
            continue
        parts.append(cur.id)
        parts.reverse()  # e.g. ["self", "trt", "TensorIOMode", "INPUT"]
        for n in (2, 1):
            root = ".".join(parts[:n])
            if root in roots and len(parts) > n:
                out.add((roots[root], ".".join(parts[n:])))
                break
    # only whole chains: drop the prefixes ast.walk also visits (self.trt.TensorIOMode of ...INPUT)
    return {(g, c) for g, c in out if not any(g == g2 and c2.startswith(c + ".") for g2, c2 in out)}


def test_the_checked_names_are_the_called_names():
    used = _used()
    gpu = chains(PKG / "gpu.py", {"self.trt": "trt", "self.cudart": "cudart", "cudart": "cudart",
                                  "ctx": "IExecutionContext", "engine": "ICudaEngine", "self.runtime": "Runtime"})
    want = {(g, n) for g, names in used.items() if g != "builder" for n in names}
    assert gpu == want, f"called but not checked: {sorted(gpu - want)}; checked but not called: {sorted(want - gpu)}"
    build = chains(PKG / "build.py", {"self.trt": "trt", "trt": "trt", "self.builder": "builder",
                                      "parser": "builder", "config": "builder", "profile": "builder"})
    names = {part for _, c in build for part in c.split(".")}
    listed = set(used["builder"]) | {p for n in used["trt"] for p in n.split(".")}
    assert names <= listed, f"build.py calls {sorted(names - listed)}, which the check does not list"
    source = (PKG / "build.py").read_text()
    assert all(n in source for n in used["builder"]), [n for n in used["builder"] if n not in source]
