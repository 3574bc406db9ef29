"""Strong FP16 typing of a lowered graph, as TensorRT's strongly typed networks want it.

TensorRT 10 builds a strongly typed network with the types the ONNX carries (11 requires it):
a graph meant to run in FP16 outside its int8 kernels must say FP16 itself. This pass decides
the type of every float value by where its data comes from:

- values computed from a float graph input (the sample, text embeddings) are FP16 ("hot"),
  propagated through every op except Shape / Size, whose outputs are metadata;
- values computed only from integer inputs (the timestep's sinusoidal embedding and the time
  MLP, class-label embeddings) stay FP32: the sinusoid of t up to 1000 needs FP32 (FP16's
  spacing at 1000 is 0.5), and these are vectors per sample, cheap in FP32;
- constants (initializers, Constant nodes, a weight's DequantizeLinear) take their readers'
  type: converted when every reader is FP16, cast otherwise; Resize's roi and scales stay FP32;
- graph inputs and outputs stay FP32: a Cast at each boundary (the runtime feeds what it fed
  before), and a Cast where an FP32 value enters FP16 code (the time embedding's Add).

Q/DQ scales of FP16 values become FP16 (DequantizeLinear's output type is its scale's type,
opset >= 19). The result passes ONNX's strict type inference.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from .. import onnxio
from ..targets import float_input_values

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
KEEP_FLOAT32_INPUTS = {"Resize": (1, 2)}  # roi and scales are float32 whatever the data's type
FP16_MAX = float(np.finfo(np.float16).max)


def _without_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every initializer's type and shape but none of its bytes: what type
    inference needs, small enough to serialize when the weights pass protobuf's 2 GB."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    g = light.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    for init in model.graph.initializer:
        g.initializer.append(TensorProto(name=init.name, data_type=init.data_type, dims=init.dims))
    return light


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(_without_data(model))
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    types.update({i.name: i.data_type for i in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def float16_plan(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """(hot, constant): the values computed from float graph inputs (FP16 after the pass) and
    the values computed from constants alone (they take their readers' type)."""
    const = {i.name for i in model.graph.initializer} | {""}
    for n in model.graph.node:
        if all(i in const for i in n.input):
            const.update(n.output)
    return float_input_values(model), const - {""}


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` (opset >= 19) typed FP16 as described above; inputs and outputs keep
    their FP32 types. Raises ValueError when a constant does not fit FP16's range."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    types = _types(out)
    hot, const = float16_plan(out)
    graph_inputs = {i.name for i in g.input}
    graph_outputs = {o.name for o in g.output}
    inits = {i.name: i for i in g.initializer}
    producer = onnxio.producers(g)
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in g.node:
        for i, v in enumerate(n.input):
            readers.setdefault(v, []).append((n, i))

    def wants_fp16(node: onnx.NodeProto, i: int) -> bool:
        return i not in KEEP_FLOAT32_INPUTS.get(node.op_type, ())

    converted: set[str] = set()  # constants made FP16 in place
    casts: dict[str, str] = {}  # value -> its FP16 cast
    new_casts: list[tuple[str, onnx.NodeProto]] = []  # (value it follows, Cast node)

    def half_in_place(v: str) -> bool:
        """Make constant ``v`` FP16 where it is defined, if every reader wants FP16."""
        if v in converted:
            return True
        if not all(n.name in fp16_nodes and wants_fp16(n, i) for n, i in readers.get(v, [])) or v in graph_outputs:
            return False
        if v in inits:
            arr = numpy_helper.to_array(inits[v])
            if np.any(np.abs(arr) > FP16_MAX):
                raise ValueError(f"constant {v} holds values beyond FP16's range ({np.abs(arr).max():.3g}); "
                                 "keep its layer in float32 or use another target")
            inits[v].CopyFrom(numpy_helper.from_array(arr.astype(np.float16), v))
        else:
            p = producer[v]
            if p.op_type == "Constant":
                attr = next(a for a in p.attribute if a.name == "value")
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
            else:  # a constant subgraph (a weight's DequantizeLinear): its float inputs follow
                fp16_nodes.add(p.name)
                for i, src in enumerate(p.input):
                    if types.get(src) == FLOAT and wants_fp16(p, i) and not half_in_place(src):
                        return False
        converted.add(v)
        return True

    def cast_of(v: str) -> str:
        if v not in casts:
            casts[v] = f"{v}.fp16"
            new_casts.append((v, helper.make_node("Cast", [v], [casts[v]], name=f"{v}.ToFP16", to=FLOAT16)))
        return casts[v]

    fp16_nodes = {n.name for n in g.node if any(o in hot for o in n.output)}
    for n in list(g.node):
        if n.name not in fp16_nodes or n.op_type == "Constant":
            continue
        if n.op_type == "Cast":
            for a in n.attribute:
                if a.name == "to" and a.i == FLOAT:
                    a.i = FLOAT16
        for i, v in enumerate(n.input):
            if types.get(v) != FLOAT or not wants_fp16(n, i) or (v in hot and v not in graph_inputs):
                continue
            if v in const and half_in_place(v):
                continue
            n.input[i] = cast_of(v)  # an FP32 graph input, FP32 code's output, or a shared constant
    # Float graph outputs computed in FP16: the producer writes NAME.fp16, a Cast writes NAME.
    tail = []
    for o in g.output:
        if o.name in hot and types.get(o.name) == FLOAT:
            half = f"{o.name}.fp16"
            for n in g.node:
                n.output[:] = [half if x == o.name else x for x in n.output]
                n.input[:] = [half if x == o.name else x for x in n.input]
            tail.append(helper.make_node("Cast", [half], [o.name], name=f"{o.name}.ToFP32", to=FLOAT))
    # Each Cast right after what it casts (inputs first), keeping the graph in topological order.
    after: dict[str, list[onnx.NodeProto]] = {}
    for v, c in new_casts:
        after.setdefault(v, []).append(c)
    nodes = [c for i in g.input for c in after.get(i.name, [])]
    nodes += [c for i in g.initializer for c in after.get(i.name, [])]
    for n in g.node:
        nodes.append(n)
        for o in n.output:
            nodes += after.get(o, [])
    del g.node[:]
    g.node.extend(nodes + tail)
    del g.value_info[:]
    onnx.shape_inference.infer_shapes(_without_data(out), strict_mode=True)  # every node's types agree
    return out


def float16_share(model: onnx.ModelProto) -> dict:
    """How much of a typed graph runs in FP16: {"fp16_nodes", "fp32_nodes", "casts"} over nodes
    with float outputs (Q/DQ and shape arithmetic aside)."""
    types = _types(model)
    fp16 = fp32 = 0
    for n in model.graph.node:
        kinds = {types.get(o) for o in n.output}
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Cast", "Constant"):
            continue
        fp16 += FLOAT16 in kinds
        fp32 += FLOAT in kinds and FLOAT16 not in kinds
    casts = sum(n.op_type == "Cast" and n.name.endswith((".ToFP16", ".ToFP32")) for n in model.graph.node)
    return {"fp16_nodes": fp16, "fp32_nodes": fp32, "casts": casts}



def to_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """The inverse typing (every FP16 constant, cast and type back to FP32): the simulated
    quantized model an FP16 engine is compared with. Defined in dmruntime, which falls back to it
    where ONNX Runtime has no FP16 kernel."""
    from dmruntime.tensorrt.reference import to_float32 as widen

    return widen(model)
