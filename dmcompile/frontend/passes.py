"""Named graph passes on exported ONNX models, each followed by an invariant check."""

from __future__ import annotations

from collections import Counter

import onnx

from .. import onnxio
from ..errors import ExportError


def check_graph(model: onnx.ModelProto, what: str, path=None) -> None:
    """Invariants every pass must keep: the ONNX checker passes, names are unique,
    and every node input is a graph input, an initializer or an earlier node's output.
    A model whose weights are (or must be) external data is checked by the ONNX checker from
    its file ``path``; without one, such a graph gets the structural checks only (export
    checks the finished file)."""
    big = not onnxio.fits(model) or bool(onnxio.external_files(model))
    try:
        if big and path is not None:
            onnx.checker.check_model(str(path))
        elif not big:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"after pass {what}: ONNX checker failed: {e}") from e
    g = model.graph
    dup = [n for n, c in Counter(n.name for n in g.node).items() if c > 1]
    assert not dup, f"after pass {what}: duplicate node names {dup[:3]}"
    dup = [n for n, c in Counter(i.name for i in g.initializer).items() if c > 1]
    assert not dup, f"after pass {what}: duplicate initializer names {dup[:3]}"
    known = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    for node in g.node:  # exporters emit nodes in topological order
        missing = [i for i in node.input if i not in known]
        assert not missing, f"after pass {what}: node {node.name} reads undefined {missing}"
        known.update(node.output)


def rename_values(g: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Rename tensors everywhere they appear (node inputs/outputs, initializers, value_info, outputs)."""
    if not renames:
        return
    for node in g.node:
        for i, v in enumerate(node.input):
            if v in renames:
                node.input[i] = renames[v]
        for i, v in enumerate(node.output):
            if v in renames:
                node.output[i] = renames[v]
    for vi in list(g.value_info) + list(g.output) + list(g.initializer):
        if vi.name in renames:
            vi.name = renames[vi.name]


def strip_wrapper_prefix(model: onnx.ModelProto, prefix: str) -> onnx.ModelProto:
    """Pass: drop the export wrapper's attribute name from node and initializer names,
    so names read as the UNet's own module paths (``down_blocks.0.resnets.0.conv1``)."""
    g = model.graph
    node_prefix = f"/{prefix}/"
    for node in g.node:
        if node.name.startswith(node_prefix):
            node.name = "/" + node.name[len(node_prefix):]
    renames = {i.name: i.name[len(prefix) + 1:] for i in g.initializer if i.name.startswith(prefix + ".")}
    for node in g.node:
        for v in node.output:
            if v.startswith(node_prefix):
                renames[v] = "/" + v[len(node_prefix):]
    rename_values(g, renames)
    check_graph(model, "strip_wrapper_prefix")
    return model


def module_of_node(node_name: str) -> str:
    """'/down_blocks.1/attentions.0/to_q/MatMul' -> 'down_blocks.1.attentions.0.to_q'."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[:-1])


def name_anonymous_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Pass: give weights the exporter folded into anonymous initializers (``onnx::MatMul_123``,
    the transposed weight of a Linear applied to 3-D input) the stable name
    ``<module>.weight_t``, so later stages never refer to exporter-generated names."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    renames: dict[str, str] = {}
    for node in g.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        w = node.input[1]
        if w in inits and w.startswith("onnx::") and w not in renames:
            new = f"{module_of_node(node.name)}.weight_t"
            if new not in inits and new not in renames.values():
                renames[w] = new
    rename_values(g, renames)
    check_graph(model, "name_anonymous_weights")
    return model
