"""A small QDQ insertion pass written on the onnx protobuf API.

Why our own pass rather than driving ``onnxruntime.quantization.quantize_static``: the
scales come from our per-group calibration, weights must be quantized once and shared
byte-for-byte by every group model, ORT's quantizer renames shared initializers into names
that collide with exported tensor names, and the fusion rules we need are few and explicit:

- the target profile's placement names the quantized tensors and their quantized readers
  (the same rule calibration used to choose what to record);
- every quantized tensor gets one QuantizeLinear; every quantized reader gets its own
  DequantizeLinear (ORT does not fuse a node whose DQ is shared), float readers share one;
- ort-cpu quantizes Conv outputs too: ORT fuses DQ -> Conv -> Q into QLinearConv only with Q;
- MatMul / Gemm outputs stay float: ORT fuses them into MatMulIntegerToFloat / QGemm.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import onnxio
from ..frontend.layermap import Layer, LayerMap
from ..frontend.passes import check_graph
from ..quant import QuantWeight, qparams, quantize_weight, weight_axis
from ..targets import TargetProfile

__all__ = ["QuantWeight", "lower_group", "quantize_weight", "quantize_weights", "weight_axis"]


def quantize_weights(model: onnx.ModelProto, layers: list[Layer], bits: int = 8) -> dict[str, QuantWeight]:
    """Quantize the weights of ``layers`` once; every group model shares the result."""
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for layer in layers:
        if layer.weight:
            out[layer.weight] = quantize_weight(numpy_helper.to_array(inits[layer.weight]), weight_axis(layer), bits)
    return out


def _scalar(name: str, value, dtype) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def lower_group(fp: onnx.ModelProto, layer_map: LayerMap, quantized_nodes: set[str],
                weights: dict[str, QuantWeight], ranges: dict[str, tuple[float, float]],
                profile: TargetProfile, base_dir=None) -> onnx.ModelProto:
    """The QDQ model of one timestep group: ``ranges`` holds that group's activation ranges.
    ``fp`` may leave its weights on disk (external data in ``base_dir``): the float tensors the
    QDQ model keeps are read in, the quantized ones come from ``weights``."""
    model = onnx.ModelProto()
    model.CopyFrom(fp)
    g = model.graph
    layers = {l.node: l for l in layer_map.layers if l.node in quantized_nodes}
    inits = {i.name: i for i in g.initializer}
    act_dtype = np.uint8 if profile.activation_dtype == "uint8" else np.int8
    sym = profile.activation_symmetric
    new_inits: list[TensorProto] = []

    # Which tensors are quantized and which (node name, input index) read them quantized.
    quant_inputs = profile.placement(model, list(layers.values()))
    missing = [t for t in quant_inputs if t not in ranges]
    assert not missing, f"no calibration range for {missing[:3]} (calibration and placement disagree)"

    for t in quant_inputs:
        scale, zp = qparams(*ranges[t], bits=8, symmetric=sym)
        new_inits += [_scalar(f"{t}.q_scale", scale, np.float32), _scalar(f"{t}.q_zero_point", zp, act_dtype)]

    graph_outputs = {o.name for o in g.output}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in g.node:
        for i, v in enumerate(node.input):
            consumers.setdefault(v, []).append((node, i))

    def qdq_nodes(t: str) -> list[onnx.NodeProto]:
        """Q for tensor t, a dedicated DQ per quantized consumer, one shared DQ for the rest."""
        src = t
        out = []
        if t in graph_outputs:  # the producer writes t.float; the shared DQ writes t again
            src = f"{t}.float"
        out.append(helper.make_node("QuantizeLinear", [src, f"{t}.q_scale", f"{t}.q_zero_point"], [f"{t}.q"],
                                    name=f"{t}.Q"))
        quantized = set(quant_inputs[t])
        float_users = []
        qin = [f"{t}.q", f"{t}.q_scale", f"{t}.q_zero_point"]
        for j, (n, i) in enumerate(consumers.get(t, [])):
            if (n.name, i) in quantized:  # short names: they repeat in every group model
                out.append(helper.make_node("DequantizeLinear", qin, [f"{t}.dq{j}"], name=f"{t}.DQ{j}"))
                n.input[i] = f"{t}.dq{j}"
            else:
                float_users.append((n, i))
        if float_users or t in graph_outputs:
            dq = t if t in graph_outputs else f"{t}.dq"
            out.append(helper.make_node("DequantizeLinear", qin, [dq], name=f"{t}.DQ"))
            for n, i in float_users:
                n.input[i] = dq
        return out

    orig_input0 = {n.name: n.input[0] for n in g.node if n.name in layers}
    new_nodes: list[onnx.NodeProto] = []
    for t in [i.name for i in g.input if i.name in quant_inputs]:
        new_nodes += qdq_nodes(t)
    # Snapshot the original order; qdq_nodes edits consumers' inputs in place.
    for node in list(g.node):
        layer = layers.get(node.name)
        if layer is not None and layer.weight:
            qw = weights[layer.weight]
            w = layer.weight
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{w}.q", f"{w}.scale", f"{w}.zero_point"],
                                              [f"{w}.dq"], name=f"{w}.DQ", axis=qw.axis))
            node.input[1] = f"{w}.dq"
            if profile.quantize_bias and len(node.input) > 2 and node.input[2] and node.input[2] in inits:
                # int32 bias with scale s_x * s_w, computed in the graph from the float bias, the
                # weight scales and this group's s_x; ONNX Runtime's constant folding turns it
                # into the fused kernel's int32 bias, one definition for every group.
                b = node.input[2]
                s_x = f"{orig_input0[node.name]}.q_scale"
                new_nodes += [
                    helper.make_node("Mul", [s_x, f"{w}.scale"], [f"{b}.scale"], name=f"{b}.Scale"),
                    helper.make_node("Div", [b, f"{b}.scale"], [f"{b}.div"], name=f"{b}.Div"),
                    helper.make_node("Round", [f"{b}.div"], [f"{b}.round"], name=f"{b}.Round"),
                    helper.make_node("Cast", [f"{b}.round"], [f"{b}.q"], name=f"{b}.Cast", to=TensorProto.INT32),
                    helper.make_node("DequantizeLinear", [f"{b}.q", f"{b}.scale"], [f"{b}.dq"], name=f"{b}.DQ", axis=0),
                ]
                node.input[2] = f"{b}.dq"
        if node.output and node.output[0] in quant_inputs and node.output[0] in graph_outputs:
            node.output[0] = f"{node.output[0]}.float"
        new_nodes.append(node)
        for o in node.output:
            t = o[: -len(".float")] if o.endswith(".float") and o[: -len(".float")] in graph_outputs else o
            if t in quant_inputs:
                new_nodes += qdq_nodes(t)

    for layer in layers.values():
        if layer.weight:
            qw = weights[layer.weight]
            new_inits += [numpy_helper.from_array(qw.q, f"{layer.weight}.q"),
                          numpy_helper.from_array(qw.scale, f"{layer.weight}.scale"),
                          numpy_helper.from_array(np.zeros(qw.scale.shape, np.int8), f"{layer.weight}.zero_point")]
    del g.node[:]
    g.node.extend(new_nodes)
    used = {v for n in g.node for v in n.input}
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept + [i for i in new_inits if i.name in used])
    if base_dir is not None:
        onnxio.load_data(model, base_dir)
    check_graph(model, "lower_group")
    return model
