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
- MatMul / Gemm outputs stay float: ORT fuses them into MatMulIntegerToFloat / QGemm;
- weight-only layers (TensorRT's INT4 MatMul / Gemm): an INT4 weight initializer with block
  scales along the input dimension (DequantizeLinear ``block_size``, opset 21), input float;
- constant Conv parameters (ort-cpu, one engine for several groups): ONNX Runtime's fast int8
  convolution needs a constant input zero point and a constant int32 bias, and a bias in units of
  a per-group input scale cannot be constant. So the groups' Conv inputs share one zero point
  (``pins``; each group keeps its own scale) and the bias of such a Conv is added in float after
  its output's DequantizeLinear (into the broadcast operand of the Add that follows, such as the
  time embedding, else as one more input of a Sum), the output quantized before the bias on the
  calibrated range shifted by the bias.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import onnxio
from ..errors import ExportError
from ..frontend.layermap import Layer, LayerMap
from ..frontend.passes import check_graph
from ..quant import QuantWeight, pack_int4, qparams, qparams_at, quantize_weight, weight_axis
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


INT4_BLOCK_SIZES = (128, 64, 32, 16)  # TensorRT's INT4 weight-only blocks (the sizes ModelOpt emits)


def int4_blocks(op_type: str, trans_b: bool, shape) -> tuple[int, int] | None:
    """(block axis, block size) of a MatMul / Gemm weight stored as INT4 blocks along its input
    dimension, or None when no supported block size divides that dimension (then it is stored
    on the int8 grid)."""
    axis = 1 if op_type == "Gemm" and trans_b else 0
    size = next((b for b in INT4_BLOCK_SIZES if shape[axis] % b == 0), None)
    return None if size is None else (axis, size)


def int4_layout(profile: TargetProfile, layer: Layer, bits: int) -> tuple[int, int] | None:
    """(block axis, block size) when ``layer`` at ``bits`` is stored as INT4 weight-only blocks on
    ``profile`` (TensorRT's 4-bit MatMul/Gemm whose input dimension a block size divides), else
    None. The one place that decides it: the lowering, the manifest and the budgets ask here."""
    if not layer.weight or not profile.weight_only(layer.op_type, bits):
        return None
    # the layer map's weight_transposed: stored [in, out] (MatMul, Gemm without transB)
    trans_b = layer.op_type == "Gemm" and not layer.weight_transposed
    return int4_blocks(layer.op_type, trans_b, layer.weight_shape)


def int4_initializers(w: str, qw: QuantWeight, axis: int, block: int) -> list[TensorProto]:
    """``w.q`` as a packed INT4 tensor and ``w.scale`` as block scales (each block takes its
    channel's scale: the same numbers as the per-channel rounding the plan chose)."""
    q = TensorProto(name=f"{w}.q", data_type=TensorProto.INT4, dims=list(qw.q.shape))
    q.raw_data = pack_int4(qw.q).tobytes()
    blocks = list(qw.q.shape)
    blocks[axis] //= block
    shape = [1, 1]
    shape[qw.axis] = -1
    scale = np.broadcast_to(qw.scale.reshape(shape), blocks).astype(np.float32)
    return [q, numpy_helper.from_array(np.ascontiguousarray(scale), f"{w}.scale")]


def _scalar(name: str, value, dtype) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def broadcast_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors whose inferred shape is [N, C, 1, ...] (ONNX shape inference on the graph: a time
    embedding broadcast over the image), where a Conv's bias can be added at no cost."""
    try:
        g = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # onnx raises several of its own kinds; without shapes the bias goes into a Sum
        return set()
    out = set()
    for v in [*g.value_info, *g.input]:
        dims = v.type.tensor_type.shape.dim
        if len(dims) >= 3 and all(d.HasField("dim_value") and d.dim_value == 1 for d in dims[2:]):
            out.add(v.name)
    return out


def float_bias_convs(model: onnx.ModelProto, quant_inputs: dict[str, list[tuple[str, int]]],
                     layer_nodes: set[str]) -> dict[str, str]:
    """Quantized Conv node -> its bias initializer, for the Convs whose output is quantized (ONNX
    Runtime fuses them into QLinearConv): their bias can be added in float after the output."""
    inits = {i.name for i in model.graph.initializer}
    return {n.name: n.input[2] for n in model.graph.node
            if n.name in layer_nodes and n.op_type == "Conv" and len(n.input) > 2 and n.input[2] in inits
            and n.output[0] in quant_inputs}


def lower_group(fp: onnx.ModelProto, layer_map: LayerMap, quantized_nodes: set[str],
                weights: dict[str, QuantWeight], ranges: dict[str, tuple[float, float]],
                profile: TargetProfile, base_dir=None, pins: dict[str, int] | None = None,
                broadcast: set[str] | None = None) -> onnx.ModelProto:
    """The QDQ model of one timestep group: ``ranges`` holds that group's activation ranges.
    ``fp`` may leave its weights on disk (external data in ``base_dir``): the float tensors the
    QDQ model keeps are read in, the quantized ones come from ``weights``. ``pins`` (constant
    Conv parameters, see the module docstring; None: off): tensor -> the zero point it shares
    with the other groups of its engine (the Conv inputs); with it, every Conv that ONNX Runtime
    fuses adds its bias in float. ``broadcast``: :func:`broadcast_tensors` of ``fp``, when the
    caller lowers several groups of one graph (computed here otherwise)."""
    model = onnx.ModelProto()
    model.CopyFrom(fp)
    g = model.graph
    layers = {l.node: l for l in layer_map.layers if l.node in quantized_nodes}
    inits = {i.name: i for i in g.initializer}
    act_dtype = np.uint8 if profile.activation_dtype == "uint8" else np.int8
    sym = profile.activation_symmetric
    new_inits: list[TensorProto] = []

    # Weight-only layers: stored as INT4 blocks, their input read in float.
    int4 = {name: b for name, l in layers.items() if l.weight
            and (b := int4_layout(profile, l, weights[l.weight].bits)) is not None}
    # Which tensors are quantized and which (node name, input index) read them quantized.
    quant_inputs = profile.placement(model, list(layers.values()), set(int4))
    missing = [t for t in quant_inputs if t not in ranges]
    assert not missing, f"no calibration range for {missing[:3]} (calibration and placement disagree)"

    biases = {}  # float bias initializer name -> its array (two Convs' biases merge into one)
    before: dict[str, list[onnx.NodeProto]] = {}  # node name -> nodes to place right before it

    def bias_channels(conv) -> str:
        """The Conv's float bias as a [C, 1, ...] initializer (broadcast over its output)."""
        b = float_bias[conv.name]
        name = f"{b}.c11"
        if name not in biases:
            arr = onnxio.array(inits[b], base_dir).astype(np.float32)
            rank = len(layers[conv.name].weight_shape) - 2
            biases[name] = arr.reshape(-1, *([1] * rank))
            new_inits.append(numpy_helper.from_array(biases[name], name))
        return name

    ranges = dict(ranges)
    float_bias = float_bias_convs(model, quant_inputs, set(layers)) \
        if pins is not None and profile.constant_conv_params else {}
    pins = {t: z for t, z in (pins or {}).items() if t in quant_inputs}
    conv_of_output = {}  # a float-bias Conv's output read only in float -> the Conv
    nodes = []
    for n in g.node:
        nodes.append(n)
        if n.name not in float_bias:
            continue
        t = n.output[0]
        b = onnxio.array(inits[float_bias[n.name]], base_dir)
        shifted = (ranges[t][0] - float(b.max()), ranges[t][1] - float(b.min()))  # quantized before its bias
        if quant_inputs[t]:  # quantized readers want t itself: add the bias, quantize t again for them
            n.output[0] = f"{t}.nobias"
            quant_inputs[f"{t}.nobias"], ranges[f"{t}.nobias"] = [], shifted
            nodes.append(helper.make_node("Add", [f"{t}.nobias", bias_channels(n)], [t], name=f"{t}.Bias"))
        else:
            conv_of_output[t], ranges[t] = n, shifted
    del g.node[:]
    g.node.extend(nodes)
    for t in quant_inputs:
        if t in pins:
            scale, zp = qparams_at(*ranges[t], pins[t]), pins[t]
        else:
            scale, zp = qparams(*ranges[t], bits=8, symmetric=sym)
        new_inits += [_scalar(f"{t}.q_scale", scale, np.float32), _scalar(f"{t}.q_zero_point", zp, act_dtype)]

    graph_outputs = {o.name for o in g.output}
    consumers = onnxio.consumers(g)

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
            elif n.name in int4 and i == 0:
                pass  # weight-only: reads the float tensor itself (to_q at 4 bits beside to_k at 8)
            else:
                float_users.append((n, i))
        if float_users or t in graph_outputs:
            dq = t if t in graph_outputs else f"{t}.dq"
            conv = conv_of_output.get(t)
            if conv is None:
                out.append(helper.make_node("DequantizeLinear", qin, [dq], name=f"{t}.DQ"))
                for n, i in float_users:
                    n.input[i] = dq
            else:  # the Conv's bias, in float after the DequantizeLinear
                out.append(helper.make_node("DequantizeLinear", qin, [f"{t}.nobias"], name=f"{t}.DQ"))
                out += bias_after(conv, f"{t}.nobias", dq, float_users, t in graph_outputs)
        return out

    if float_bias and broadcast is None:
        broadcast = broadcast_tensors(fp)

    def bias_after(conv, src: str, dst: str, float_users, is_output: bool) -> list[onnx.NodeProto]:
        """Add ``conv``'s bias to ``src``. Its one float reader an Add (or a Sum this pass made): into
        its broadcast operand where it has one (the time embedding: no pass over the output), else
        as one more input of a Sum (merged with a bias it holds already). Otherwise an Add writing
        ``dst`` for the readers."""
        c11 = bias_channels(conv)
        if is_output or len(float_users) != 1 or float_users[0][0].op_type not in ("Add", "Sum"):
            for n, i in float_users:
                n.input[i] = dst
            return [helper.make_node("Add", [src, c11], [dst], name=f"{dst}.Bias")]
        n, i = float_users[0]
        n.input[i] = src
        held = [j for j, v in enumerate(n.input) if v in biases]
        small = [j for j, v in enumerate(n.input) if j != i and re.sub(r"\.(dq\d*|nobias)$", "", v) in broadcast]
        if held:  # one bias input for both Convs
            j = held[0]
            name = f"{n.input[j]}+{c11}"
            biases[name] = biases[n.input[j]] + biases[c11]
            new_inits.append(numpy_helper.from_array(biases[name], name))
            n.input[j] = name
            return []
        if small:
            j = small[0]
            operand, biased = n.input[j], f"{n.input[j]}+{c11}"
            n.input[j] = biased  # computed just before the reader (the operand may come after the Conv)
            before.setdefault(n.name, []).append(helper.make_node("Add", [operand, c11], [biased],
                                                                  name=f"{biased}.Bias"))
            return []
        n.op_type = "Sum"
        n.input.append(c11)
        return []

    orig_input0 = {n.name: n.input[0] for n in g.node if n.name in layers}
    new_nodes: list[onnx.NodeProto] = []
    for t in [i.name for i in g.input if i.name in quant_inputs]:
        new_nodes += qdq_nodes(t)
    # Snapshot the original order; qdq_nodes edits consumers' inputs in place.
    for node in list(g.node):
        new_nodes += before.pop(node.name, [])
        layer = layers.get(node.name)
        if layer is not None and layer.weight:
            qw = weights[layer.weight]
            w = layer.weight
            if node.name in int4:  # symmetric: no zero point
                axis, block = int4[node.name]
                new_nodes.append(helper.make_node("DequantizeLinear", [f"{w}.q", f"{w}.scale"], [f"{w}.dq"],
                                                  name=f"{w}.DQ", axis=axis, block_size=block))
            else:
                new_nodes.append(helper.make_node("DequantizeLinear", [f"{w}.q", f"{w}.scale", f"{w}.zero_point"],
                                                  [f"{w}.dq"], name=f"{w}.DQ", axis=qw.axis))
            node.input[1] = f"{w}.dq"
            if node.name in float_bias:
                del node.input[2]  # added in float after the output (bias_after)
            elif profile.quantize_bias and len(node.input) > 2 and node.input[2] and node.input[2] in inits:
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
        if layer.node in int4:
            new_inits += int4_initializers(layer.weight, weights[layer.weight], *int4[layer.node])
        elif layer.weight:
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
    if int4 or profile.float16:  # INT4 and block_size need opset 21, FP16 Q/DQ scales 19
        model = to_opset(model, 21)  # (before the weights are read in: big models pass 2 GB)
    if base_dir is not None:
        onnxio.load_data(model, base_dir)
    check_graph(model, "lower_group")
    return model


def to_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """``model`` converted to the default-domain opset ``version`` (ONNX's version converter;
    its Q/DQ nodes are valid in every opset >= 13, the INT4 ones only from 21)."""
    from onnx import version_converter

    current = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if current >= version:
        return model
    try:
        out = version_converter.convert_version(model, version)
    except Exception as e:  # the converter raises its own RuntimeError / ValueError kinds

        raise ExportError(f"the tensorrt target needs this model's graph at opset {version} (FP16 Q/DQ scales, INT4 "
                          f"blocks), and ONNX's version converter cannot take it from opset {current}: {e}. Build "
                          "for ort-cpu or openvino-cpu, which keep the exported opset") from e
    out.ir_version = max(out.ir_version, 10)
    return out
