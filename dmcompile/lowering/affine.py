"""One engine for every timestep group, its groups differing only in scalars fed as inputs.

OpenVINO compiles a QDQ graph's scales into its int8 kernels, so a graph whose scales were inputs
would run in float, and one compiled model per group costs memory per group (each compiled model
holds its own kernels and repacked weights). Instead, the engine quantizes every activation tensor
t with constants (scale S_t, zero point Z_t, the same for all groups) after multiplying it by a
per-group scalar a_g = S_t / s_g (fed as ``t.group_a``): round(a_g x / S_t) + Z_t is the group's
own code round(x / s_g) + Z_t, so the integer kernels see exactly the codes of a per-group engine
whose zero point is Z_t. What a quantized layer computes from those codes is a_g times its
product, so its output is multiplied by 1 / a_g (``t.group_inv_a``) and its bias added after that,
in float; float readers of the tensor multiply by 1 / a_g likewise. Each tensor's Z_t is shared by
the groups (``quant.pinned_zero_point``), s_g is the group's smallest scale around it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import onnxio
from ..quant import qparams_at

A, INV = "group_a", "group_inv_a"
WEIGHTED = ("Conv", "Gemm", "MatMul")


def affine_group_graph(qdq: onnx.ModelProto) -> onnx.ModelProto:
    """The engine form of ``qdq`` (a QDQ graph lowered with every quantized tensor's zero point
    pinned, see :func:`lowering.groups.lower_groups`): per quantized tensor t, inputs ``t.group_a``
    and ``t.group_inv_a`` (float scalars), the multiplications and the float biases described in
    the module docstring."""
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    acts = {n.output[0][: -len(".q")] for n in g.node if n.op_type == "QuantizeLinear"}
    dq_of = {n.output[0]: n.input[0][: -len(".q")] for n in g.node
             if n.op_type == "DequantizeLinear" and n.input[0][: -len(".q")] in acts}
    consumers = onnxio.consumers(g)
    # a DQ read only as a quantized layer's input: the layer's output is corrected instead
    dedicated = {d for d in dq_of if consumers.get(d) and all(c.op_type in WEIGHTED and i < 2
                                                                for c, i in consumers[d])}
    extra_inits, nodes = [], []
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.output[0][: -len(".q")] in acts:
            t = n.output[0][: -len(".q")]
            nodes.append(helper.make_node("Mul", [n.input[0], f"{t}.{A}"], [f"{t}.scaled"], name=f"{t}.GroupA"))
            n.input[0] = f"{t}.scaled"
            nodes.append(n)
        elif n.op_type in WEIGHTED and any(v in dedicated for v in n.input[:2]):
            inv = [f"{dq_of[v]}.{INV}" for v in n.input[:2] if v in dedicated]
            bias = _float_bias(n, g, inits, extra_inits)
            out = n.output[0]
            n.output[0] = f"{out}.grouped"
            nodes.append(n)
            src = n.output[0]
            for k, name in enumerate(inv):  # both inputs quantized (attention): both scalars
                dst = out if k == len(inv) - 1 and bias is None else f"{out}.ungrouped{k}"
                nodes.append(helper.make_node("Mul", [src, name], [dst], name=f"{dst}.GroupInv"))
                src = dst
            if bias is not None:
                nodes.append(helper.make_node("Add", [src, bias], [out], name=f"{out}.Bias"))
        elif n.op_type == "DequantizeLinear" and n.output[0] in dq_of and n.output[0] not in dedicated:
            t, out = dq_of[n.output[0]], n.output[0]
            n.output[0] = f"{out}.grouped"
            nodes += [n, helper.make_node("Mul", [n.output[0], f"{t}.{INV}"], [out], name=f"{out}.GroupInv")]
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(_live(nodes, {o.name for o in g.output}))
    g.initializer.extend(extra_inits)
    used = {v for n in g.node for v in n.input}
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    for t in sorted(acts):
        g.input.extend(helper.make_tensor_value_info(f"{t}.{k}", TensorProto.FLOAT, []) for k in (A, INV))
    return model


def _float_bias(node: onnx.NodeProto, g: onnx.GraphProto, inits: dict, extra: list) -> str | None:
    """Take the bias off a quantized layer (its int32 form, or a float one) and return a float
    initializer to add after its output ([C, 1, ...] for a Conv), or None."""
    if len(node.input) < 3 or not node.input[2]:
        return None
    b = node.input[2]
    if b.endswith(".dq") and b[: -len(".dq")] in inits:  # the int32 bias chain of lowering/qdq.py
        b = b[: -len(".dq")]
    value = numpy_helper.to_array(inits[b]).astype(np.float32)
    if node.op_type == "Gemm":
        beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
        value = value * np.float32(beta)
    del node.input[2]
    if node.op_type == "Conv":
        rank = len(inits[node.input[1][: -len(".dq")] + ".q"].dims) - 2 if node.input[1].endswith(".dq") else 2
        value = value.reshape(-1, *([1] * rank))
    name = f"{b}.after"
    extra.append(numpy_helper.from_array(value, name))
    return name


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` without those whose outputs nobody reads (the int32 bias chains left behind)."""
    while True:
        read = {v for n in nodes for v in n.input} | outputs
        kept = [n for n in nodes if any(o in read for o in n.output)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept


def group_scalars(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]]) -> dict[str, np.ndarray]:
    """One group's inputs of an :func:`affine_group_graph` engine: a = S_t / s_g and 1 / a, s_g the
    smallest scale around the engine's zero point Z_t that holds the group's range of t."""
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for i in model.graph.input:
        if not i.name.endswith(f".{A}"):
            continue
        t = i.name[: -len(f".{A}")]
        S = float(numpy_helper.to_array(inits[f"{t}.q_scale"]))
        Z = int(numpy_helper.to_array(inits[f"{t}.q_zero_point"]))
        a = np.float32(S / qparams_at(*ranges[t], Z))
        out[f"{t}.{A}"], out[f"{t}.{INV}"] = np.array(a, np.float32), np.array(np.float32(1) / a, np.float32)
    return out
