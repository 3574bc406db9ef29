"""TensorRT's explicit-quantization rules (dmcompile/backends/tensorrt_rules.py), checked on small
hand-built graphs: a graph that keeps them passes the ONNX checker and the rules, and each way of
breaking one is reported."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dmcompile.backends.tensorrt_rules import check_explicit_quantization, differ_only_in_scales, dq_weight_axis


def graph(*, zp=0, act_scale=(0.05,), conv_axis=0, q_on_conv_out=False, dq_into_softmax=False,
          int4_block=4, conv_int4=False, act_scale_value=0.05, int32_bias=False, conv_chain=False,
          int4_input_qdq=False, skip_qdq=True):
    """x [1,4,4,4] -> Q/DQ -> Conv (int8 per-channel weight) -> + skip (Q/DQ on the skip only) ->
    reshape [16, 8] -> MatMul with an int4 block-quantized weight -> attention-like
    MatMul(h, h^T) -> Softmax, all float."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def init(name, arr, dtype=None):
        if dtype is not None:
            inits.append(helper.make_tensor(name, dtype, list(arr.shape), arr.ravel().tolist()))
        else:
            inits.append(numpy_helper.from_array(arr, name))

    def qdq(src, name, scale_vals):
        init(f"{name}.s", np.asarray(scale_vals if len(scale_vals) > 1 else scale_vals[0], np.float32))
        init(f"{name}.z", np.asarray(zp, np.int8))
        nodes.append(helper.make_node("QuantizeLinear", [src, f"{name}.s", f"{name}.z"], [f"{name}.q"], name=f"{name}/Q"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}.q", f"{name}.s", f"{name}.z"], [f"{name}.dq"],
                                      name=f"{name}/DQ"))
        return f"{name}.dq"

    xin = qdq("x", "x", list(act_scale) if len(act_scale) > 1 else [act_scale_value])
    # Conv weight [8, 4, 1, 1]: int8 per output channel (axis 0), or int4 (not allowed on Conv)
    if conv_int4:
        init("cw", rng.integers(-8, 8, (8, 4, 1, 1)), TensorProto.INT4)
        init("cw.s", np.full((2, 4, 1, 1), 0.1, np.float32))
        nodes.append(helper.make_node("DequantizeLinear", ["cw", "cw.s"], ["cw.dq"], name="cw/DQ", axis=0, block_size=4))
    else:
        init("cw", rng.integers(-127, 128, (8, 4, 1, 1)).astype(np.int8))
        init("cw.s", np.full(8 if conv_axis == 0 else 4, 0.01, np.float32))
        nodes.append(helper.make_node("DequantizeLinear", ["cw", "cw.s"], ["cw.dq"], name="cw/DQ", axis=conv_axis))
    if int32_bias:  # ONNX Runtime style: int32 bias, scale s_x * s_w computed in the graph
        init("cb.q", np.zeros(8, np.int32))
        nodes.append(helper.make_node("Mul", ["x.s", "cw.s"], ["cb.s"], name="bias_scale"))
        nodes.append(helper.make_node("DequantizeLinear", ["cb.q", "cb.s"], ["cb"], name="cb/DQ", axis=0))
    else:
        init("cb", np.zeros(8, np.float32))
    nodes.append(helper.make_node("Conv", [xin, "cw.dq", "cb"], ["c"], name="conv"))
    if conv_chain:  # the next Conv reads this Conv's output quantized: an input Q/DQ, allowed
        c_in = qdq("c", "c", [0.05])
        init("cw2", rng.integers(-127, 128, (8, 8, 1, 1)).astype(np.int8))
        init("cw2.s", np.full(8, 0.01, np.float32))
        nodes.append(helper.make_node("DequantizeLinear", ["cw2", "cw2.s"], ["cw2.dq"], name="cw2/DQ", axis=0))
        nodes.append(helper.make_node("Conv", [c_in, "cw2.dq"], ["c2"], name="conv2"))
        nodes[-1].output[0] = "c2"
        conv_out_name = "c2"
    else:
        conv_out_name = "c"
    conv_out = qdq(conv_out_name, "co", [0.05]) if q_on_conv_out else conv_out_name
    nodes.append(helper.make_node("Concat", ["x", "x"], ["skip"], name="skip_path", axis=1))  # from the sample
    skip = qdq("skip", "skip", [0.05]) if skip_qdq else "skip"
    nodes.append(helper.make_node("Add", [conv_out, skip], ["r"], name="residual"))
    init("shape", np.asarray([16, 8], np.int64))
    nodes.append(helper.make_node("Transpose", ["r"], ["rt"], perm=[0, 2, 3, 1], name="nhwc"))
    nodes.append(helper.make_node("Reshape", ["rt", "shape"], ["h"], name="tokens"))
    hin = qdq("h", "h", [0.05]) if int4_input_qdq else "h"  # weight-only: the input stays float
    # MatMul weight [8 in, 8 out]: int4, blocks of int4_block along the input dimension (axis 0)
    init("mw", rng.integers(-8, 8, (8, 8)), TensorProto.INT4)
    init("mw.s", np.full((8 // 4, 8), 0.1, np.float32))
    attrs = {"axis": 0} | ({"block_size": int4_block} if int4_block else {})
    nodes.append(helper.make_node("DequantizeLinear", ["mw", "mw.s"], ["mw.dq"], name="mw/DQ", **attrs))
    nodes.append(helper.make_node("MatMul", [hin, "mw.dq"], ["p"], name="proj"))
    nodes.append(helper.make_node("Transpose", ["p"], ["pt"], perm=[1, 0], name="kT"))
    nodes.append(helper.make_node("MatMul", ["p", "pt"], ["scores"], name="attn/QK"))
    scores = qdq("scores", "scores", [0.05]) if dq_into_softmax else "scores"
    nodes.append(helper.make_node("Softmax", [scores], ["y"], name="attn/softmax", axis=-1))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 16])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("kw", [{}, {"conv_chain": True}])
def test_a_graph_that_keeps_the_rules_passes(kw):
    m = graph(**kw)
    onnx.checker.check_model(m, full_check=True)
    assert check_explicit_quantization(m) == []
    # ONNX Runtime on the CPU runs the same explicit-quantization graph (int4 blocks included)
    import onnxruntime as ort

    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    y = s.run(None, {"x": np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)})[0]
    assert y.shape == (16, 16) and np.allclose(y.sum(-1), 1, atol=1e-5)


@pytest.mark.parametrize("kw, words", [
    ({"zp": 3}, "zero point must be a constant 0"),
    ({"act_scale": (0.05, 0.06, 0.07, 0.08)}, "activation scale must be per tensor"),
    ({"conv_axis": 1}, "per-channel weight scale must be on axis 0"),
    ({"q_on_conv_out": True}, "quantizes the output of Conv"),
    ({"int32_bias": True}, "quantized bias"),
    ({"dq_into_softmax": True}, "keep attention float"),
    ({"conv_int4": True}, "INT4 weights are for MatMul/Gemm only"),
    ({"int4_block": None}, "need DequantizeLinear with block_size"),
    ({"int4_input_qdq": True}, "INT4 weights are weight-only"),
    ({"skip_qdq": False}, "needs Q/DQ on its skip input"),
])
def test_each_broken_rule_is_reported(kw, words):
    problems = check_explicit_quantization(graph(**kw))
    assert any(words in p for p in problems), problems


def test_weight_axes_follow_tensorrt():
    assert dq_weight_axis("Conv") == 0
    assert dq_weight_axis("MatMul") == 1 and dq_weight_axis("MatMul", int4=True) == 0
    assert dq_weight_axis("Gemm", trans_b=1) == 0 and dq_weight_axis("Gemm", trans_b=1, int4=True) == 1
    assert dq_weight_axis("Gemm", trans_b=0) == 1
    with pytest.raises(ValueError):
        dq_weight_axis("Add")


def test_group_models_differ_only_in_scales():
    a, b = graph(), graph(act_scale_value=0.07)  # another group: another input scale
    assert differ_only_in_scales(a, b) == []
    c = graph()
    w = next(t for t in c.graph.initializer if t.name == "cb")
    w.CopyFrom(numpy_helper.from_array(np.ones(8, np.float32), "cb"))
    assert any("cb differs" in p for p in differ_only_in_scales(a, c))
    assert differ_only_in_scales(a, graph(q_on_conv_out=True))  # another graph altogether
