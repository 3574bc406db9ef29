"""What TensorRT's ONNX parser accepts, and what its builder fuses, in an explicitly quantized
graph: the rules the `tensorrt` target's lowering must keep, checked on the ONNX alone (no TensorRT
needed). ``backends/tensorrt.finish_engine`` runs them on every engine it writes.

Sources (TensorRT developer guide, "Explicit Quantization"; onnx-tensorrt's importers;
TensorRT-Model-Optimizer's ONNX passes):
- symmetric quantization only: every Q/DQ zero point is 0 (or absent);
- activations per tensor (scalar scale); weights per output channel: a DequantizeLinear of a
  weight initializer feeding Conv (axis 0), Gemm (axis 0 with transB, else 1) or MatMul (axis 1);
- INT4 weights only for MatMul / Gemm, block-quantized along the input dimension
  (DequantizeLinear with ``block_size``, opset >= 21): MatMul axis 0, Gemm axis 1 with transB else 0;
  weight-only: the layer's input is not quantized;
- placement that fuses: Q/DQ on the inputs of Conv / Gemm / MatMul, not on their outputs; a
  residual Add right after an int8 Conv fuses into it, with Q/DQ on its skip input only (the skip
  may be another Conv's output, e.g. a float shortcut); a Conv output that the next Conv reads
  quantized is that Conv's input, and fine;
- biases stay float (no int32 bias with a computed scale, as ONNX Runtime's QDQ graphs have);
- attention stays float: no DequantizeLinear feeding an activation x activation MatMul
  (Q.K^T, attn.V) or a Softmax, so the fused attention kernel survives;
- the per-group models of one bundle differ only in their scale initializers.
"""

from __future__ import annotations

import numpy as np

from .. import onnxio
from ..targets import float_input_values

__all__ = ["check_explicit_quantization", "differ_only_in_scales", "dq_weight_axis"]

WEIGHTED = ("Conv", "Gemm", "MatMul")
INT4_TYPES = (22, 21)  # TensorProto.INT4, UINT4


def dq_weight_axis(op_type: str, trans_b: int = 0, *, int4: bool = False) -> int:
    """The axis of a weight's per-channel scale (int8: output channels) or of its blocks (int4:
    the input dimension) for TensorRT."""
    if op_type == "Conv":
        return 0
    if op_type == "Gemm":
        out_axis = 0 if trans_b else 1
    elif op_type == "MatMul":
        out_axis = 1
    else:
        raise ValueError(f"{op_type} has no weight axis")
    return 1 - out_axis if int4 else out_axis


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def check_explicit_quantization(model, residual_skip: bool | None = True) -> list[str]:
    """Every way ``model`` breaks the rules above, one line each (empty: it keeps them).
    ``residual_skip``: True, a residual Add after an int8 Conv must read its skip through Q/DQ;
    False, it must read it as it is (``--no-residual-int8``); None, either."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer, consumers = onnxio.producers(g), onnxio.consumers(g)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    data = float_input_values(model)
    problems = []

    def value(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(n.input) > 2 and n.input[2]:
            zp = value(n.input[2])
            if zp is None or np.any(zp != 0):
                problems.append(f"{n.name}: zero point must be a constant 0 (TensorRT takes symmetric quantization only)")
        if any(r.op_type in WEIGHTED and i == 2 for r, i in consumers.get(n.output[0], [])):
            problems.append(f"{n.name}: quantized bias (ONNX Runtime's int32 bias); TensorRT takes float biases")
            continue
        scale = value(n.input[1])
        if scale is None:
            problems.append(f"{n.name}: scale must be an initializer")
            continue
        src = n.input[0]
        is_weight = n.op_type == "DequantizeLinear" and src in inits
        if not is_weight:
            if scale.size != 1:
                problems.append(f"{n.name}: activation scale must be per tensor, has {scale.size} values")
            if n.op_type == "QuantizeLinear" and src in producer and producer[src].op_type in WEIGHTED and \
                    not _feeds_weighted_input(n, consumers) and not _feeds_residual_skip(n, consumers, producer):
                problems.append(f"{n.name}: quantizes the output of {producer[src].op_type} {producer[src].name} "
                                "for no Conv/Gemm/MatMul; Q/DQ go on their inputs (a residual Add fuses float)")
            continue
        readers = consumers.get(n.output[0], [])
        int4 = inits[src].data_type in INT4_TYPES
        a = _attrs(n)
        for reader, idx in readers:
            if reader.op_type not in WEIGHTED or idx != 1:
                problems.append(f"{n.name}: a dequantized weight must feed input 1 of Conv/Gemm/MatMul, "
                                f"feeds {reader.op_type} {reader.name} input {idx}")
                continue
            if int4:
                if _dq_producer(reader.input[0], producer):
                    problems.append(f"{n.name}: INT4 weights are weight-only in TensorRT; {reader.name}'s input must "
                                    "stay float (no DequantizeLinear)")
                if reader.op_type == "Conv":
                    problems.append(f"{n.name}: INT4 weights are for MatMul/Gemm only (store this Conv's INT8)")
                if "block_size" not in a or opset < 21:
                    problems.append(f"{n.name}: INT4 weights need DequantizeLinear with block_size (opset >= 21)")
            want = dq_weight_axis(reader.op_type, _attrs(reader).get("transB", 0), int4=int4)
            dims = list(inits[src].dims)
            if int4:
                if a.get("axis", 1) != want:
                    problems.append(f"{n.name}: INT4 blocks must run along axis {want} (the input dimension)")
            elif scale.size != 1 and (a.get("axis", 1) != want or scale.size != dims[want]):
                problems.append(f"{n.name}: per-channel weight scale must be on axis {want} "
                                f"({dims[want]} channels), has axis {a.get('axis', 1)} and {scale.size} values")
    # Residual placement: an Add right after an int8 Conv takes its other (skip) input through Q/DQ
    # and the Conv's output without, so TensorRT fuses the Add into the Conv.
    for n in g.node:
        if n.op_type != "Add" or len(n.input) != 2:
            continue
        convs = [i for i, name in enumerate(n.input) if _int8_conv(producer.get(name), producer)]
        if len(convs) != 1:
            continue
        skip = n.input[1 - convs[0]]
        if skip not in data or residual_skip is None:
            continue  # a bias computed without the sample (the time embedding after conv1): no residual
        conv = producer[n.input[convs[0]]].name
        if residual_skip and not _dq_producer(skip, producer):
            problems.append(f"{n.name}: residual Add after int8 Conv {conv} needs Q/DQ on its skip input (TensorRT "
                            "then fuses the Add into the Conv)")
        elif not residual_skip and _dq_producer(skip, producer):
            problems.append(f"{n.name}: residual Add after int8 Conv {conv} reads its skip through Q/DQ, but the "
                            "residual stream was to stay FP16")
    # Attention stays float: nothing dequantized flows straight into Softmax or into a MatMul
    # whose two inputs are both activations.
    for n in g.node:
        if n.op_type == "Softmax" or (n.op_type == "MatMul" and not any(i in inits or _dq_of_init(i, producer, inits)
                                                                           for i in n.input)):
            for name in n.input:
                p = producer.get(name)
                if p is not None and p.op_type == "DequantizeLinear":
                    problems.append(f"{n.name}: {n.op_type} of attention reads a DequantizeLinear ({p.name}); "
                                    "keep attention float so TensorRT fuses it")
    return problems


def _feeds_weighted_input(q, consumers: dict) -> bool:
    """Whether the QuantizeLinear ``q`` exists for a quantized reader: one of its DequantizeLinears
    feeds input 0 of a Conv/Gemm/MatMul (TensorRT then fuses the Q into the producer's output)."""
    for dq, _ in consumers.get(q.output[0], []):
        if dq.op_type == "DequantizeLinear" and any(r.op_type in WEIGHTED and i == 0
                                                    for r, i in consumers.get(dq.output[0], [])):
            return True
    return False


def _int8_conv(node, producer: dict) -> bool:
    """A Conv whose input and weight are both dequantized."""
    return node is not None and node.op_type == "Conv" and all(_dq_producer(i, producer) for i in node.input[:2])


def _feeds_residual_skip(q, consumers: dict, producer: dict) -> bool:
    """Whether the QuantizeLinear ``q`` quantizes the skip input of a residual Add whose other input
    is an int8 Conv's output (a float Conv's output may be that skip: a shortcut kept float)."""
    for dq, _ in consumers.get(q.output[0], []):
        for add, i in consumers.get(dq.output[0], []):
            if dq.op_type == "DequantizeLinear" and add.op_type == "Add" and len(add.input) == 2 and \
                    _int8_conv(producer.get(add.input[1 - i]), producer):
                return True
    return False


def _dq_producer(name: str, producer: dict) -> bool:
    p = producer.get(name)
    return p is not None and p.op_type == "DequantizeLinear"


def _dq_of_init(name: str, producer: dict, inits: dict) -> bool:
    p = producer.get(name)
    return p is not None and p.op_type == "DequantizeLinear" and p.input[0] in inits


def differ_only_in_scales(a, b) -> list[str]:
    """Where two per-group models differ other than in Q/DQ scale initializers (empty: they
    are one engine's graph with different scales, as TensorRT's per-group engines must be)."""
    from onnx import numpy_helper

    def scales(m):
        return {n.input[1] for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}

    out = []
    na, nb = a.graph.node, b.graph.node
    if [(n.op_type, list(n.input), list(n.output)) for n in na] != [(n.op_type, list(n.input), list(n.output)) for n in nb]:
        out.append("the graphs differ in their nodes")
    sa, sb = scales(a), scales(b)
    ia = {t.name: t for t in a.graph.initializer}
    ib = {t.name: t for t in b.graph.initializer}
    if set(ia) != set(ib):
        out.append(f"initializers differ: {sorted(set(ia) ^ set(ib))[:5]}")
    for name in sorted(set(ia) & set(ib)):
        if name in sa or name in sb:
            continue
        if not np.array_equal(numpy_helper.to_array(ia[name]), numpy_helper.to_array(ib[name])):
            out.append(f"initializer {name} differs and is not a Q/DQ scale")
    return out
