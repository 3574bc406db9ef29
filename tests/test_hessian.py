"""Layer-input second moments for GPTQ (calibration/hessian.py): im2col agrees with a real Conv."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dmcompile.calibration.hessian import SecondMoment, im2col
from dmcompile.calibration.rounding import weight_matrix


@pytest.mark.parametrize("kernel,strides,pads,dilations", [
    ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    ((1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
    ((3, 2), (1, 2), (0, 1, 2, 0), (2, 1)),
])
def test_im2col_times_weight_matrix_is_onnx_runtimes_conv(kernel, strides, pads, dilations):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    w = rng.standard_normal((5, 3, *kernel)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=list(kernel), strides=list(strides),
                            pads=list(pads), dilations=list(dilations))
    g = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8  # what this ONNX Runtime reads (onnx writes its newest by default)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    cols = im2col(x, kernel, strides, pads, dilations)
    got = (cols @ weight_matrix(w, 0).T).reshape(2, want.shape[2], want.shape[3], 5).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_second_moment_running_mean_and_pooling():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((300, 4)), rng.standard_normal((100, 4)) * 3
    m = SecondMoment(4)
    m.add(a[:150])
    m.add(a[150:])
    np.testing.assert_allclose(m.matrix(), a.T @ a / 300)
    mb = SecondMoment(4)
    mb.add(b)
    np.testing.assert_allclose(SecondMoment.pooled([m, mb], [3, 1]), 0.75 * (a.T @ a / 300) + 0.25 * (b.T @ b / 100))
    sub = SecondMoment(4, max_rows=50, seed=0)
    sub.add(a)
    assert sub.count == 50
    with pytest.raises(ValueError, match="no rows"):
        SecondMoment(3).matrix()
