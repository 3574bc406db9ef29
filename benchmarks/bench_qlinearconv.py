"""ONNX Runtime's QLinearConv alone, at the Conv shapes of ddpm-cifar10-32 (batch 8) and the SD 1.5
UNet (batch 2, 64 x 64 latents): the input zero point and int32 bias as constants (the path ort-cpu's
shared engine takes by default: MLAS's symmetric int8 convolution) against the same fed as inputs
(``--conv-params per-group``: the generic im2col + QGEMM path). Scales are fed in both, as in the
bundles. Interleaved in one process, medians, ratio fed / constant (> 1: constants are faster).

    python benchmarks/bench_qlinearconv.py --repeats 20

Says whether the CPU or the model's size decides which Conv path is faster (benchmarks/README.md).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import timing_parser
from benchmarks.machine import cpu_line

# (label, batch, in channels, out channels, height = width, kernel)
SHAPES = [
    ("cifar 128x32x32 3x3", 8, 128, 128, 32, 3),
    ("cifar 256x16x16 3x3", 8, 256, 256, 16, 3),
    ("cifar 256x8x8 3x3", 8, 256, 256, 8, 3),
    ("cifar 256x16x16 1x1", 8, 256, 256, 16, 1),
    ("sd15 320x64x64 3x3", 2, 320, 320, 64, 3),
    ("sd15 640x32x32 3x3", 2, 640, 640, 32, 3),
    ("sd15 1280x16x16 3x3", 2, 1280, 1280, 16, 3),
    ("sd15 1280x8x8 3x3", 2, 1280, 1280, 8, 3),
    ("sd15 640x32x32 1x1", 2, 640, 640, 32, 1),
]


def conv_model(cin: int, cout: int, k: int, fed: bool, rng: np.random.Generator):
    """One QLinearConv; ``fed``: x zero point and bias are graph inputs, else initializers."""
    from onnx import TensorProto, helper, numpy_helper

    w = rng.integers(-127, 128, size=(cout, cin, k, k), dtype=np.int8)
    inits = [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.full(cout, 0.01, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(cout, np.int8), "w_zp"),
             numpy_helper.from_array(np.uint8(128), "y_zp")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", cin, "H", "W"]),
              helper.make_tensor_value_info("x_scale", TensorProto.FLOAT, []),
              helper.make_tensor_value_info("y_scale", TensorProto.FLOAT, [])]
    zp = np.uint8(128)
    bias = rng.integers(-1000, 1000, size=cout, dtype=np.int32)
    if fed:
        inputs += [helper.make_tensor_value_info("x_zp", TensorProto.UINT8, []),
                   helper.make_tensor_value_info("b", TensorProto.INT32, [cout])]
    else:
        inits += [numpy_helper.from_array(zp, "x_zp"), numpy_helper.from_array(bias, "b")]
    node = helper.make_node("QLinearConv", ["x", "x_scale", "x_zp", "w", "w_scale", "w_zp", "y_scale", "y_zp", "b"],
                            ["y"], pads=[k // 2] * 4)
    graph = helper.make_graph([node], "qconv", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    extra = {"x_zp": np.array(zp), "b": bias} if fed else {}
    return model.SerializeToString(), extra


def main() -> None:
    p = timing_parser(__doc__, repeats=20, models=())
    args = p.parse_args()
    import onnxruntime as ort

    print(cpu_line())
    print(f"{'shape':<24} {'constant ms':>12} {'fed ms':>9} {'fed / constant':>15}")
    rng = np.random.default_rng(0)
    for label, n, cin, cout, hw, k in SHAPES:
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        runs = {}
        for fed in (False, True):
            blob, extra = conv_model(cin, cout, k, fed, rng)
            sess = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
            feed = {"x": rng.integers(0, 256, size=(n, cin, hw, hw), dtype=np.uint8),
                    "x_scale": np.array(0.02, np.float32), "y_scale": np.array(0.05, np.float32), **extra}
            sess.run(None, feed)
            runs[fed] = (sess, feed, [])
        for _ in range(args.repeats):
            for fed, (sess, feed, times) in runs.items():
                t = time.perf_counter()
                sess.run(None, feed)
                times.append(time.perf_counter() - t)
        const, fed = (statistics.median(runs[f][2]) * 1e3 for f in (False, True))
        print(f"{label:<24} {const:>12.2f} {fed:>9.2f} {fed / const:>14.2f}x", flush=True)


if __name__ == "__main__":
    main()
