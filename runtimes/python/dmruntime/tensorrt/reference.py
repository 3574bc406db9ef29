"""A TensorRT bundle's engine graphs on the CPU (``Bundle.open(path, device="cpu")``): ONNX Runtime
runs the very FP16 ONNX TensorRT would get; where it has no FP16 kernel for an op, the same graph
widened to FP32 (the simulated quantized model), with a warning saying so."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

from ..engine import OnnxEngine
from ..errors import BundleError

FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto


def to_float32(model):
    """The FP16 typing undone: every FP16 initializer, Constant and Cast back to FP32 (the typing
    pass's Casts become FP32 -> FP32 no-ops): the same Q/DQ graph in FP32 arithmetic."""
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for init in g.initializer:
        if init.data_type == FLOAT16:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype("float32"), init.name))
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == FLOAT16:
                a.i = FLOAT
            if n.op_type == "Constant" and a.name == "value" and a.t.data_type == FLOAT16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype("float32"), a.t.name))
    del g.value_info[:]
    return out


class ReferenceEngine(OnnxEngine):
    """OnnxEngine over an engine's FP16 graph (basic graph optimisations: ONNX Runtime 1.31's QDQ
    rewrites break FP16 int8 graphs), falling back to the graph in FP32 when ONNX Runtime cannot
    load the FP16 one. ``widened`` says which ran."""

    def __init__(self, path, sample_shape, threads: int = 0):
        super().__init__(path, sample_shape, threads=threads, basic_optimizations=True)
        self.widened = False

    def _create_session(self):
        try:
            return super()._create_session()
        except BundleError as e:
            return self._widened_session(e)

    def _widened_session(self, error: BundleError):
        try:
            import onnx
            import onnxruntime as ort
        except ImportError:
            raise BundleError(f"{error}\nONNX Runtime cannot run this FP16 engine graph on the CPU; running it in FP32 "
                              "needs the onnx package (pip install onnx)") from error
        try:
            model = to_float32(onnx.load(str(self.path)))
        except Exception:  # not an ONNX file at all (onnx raises protobuf's DecodeError): the first error says so
            raise error from None
        warnings.warn(f"ONNX Runtime cannot run {self.path.name} in FP16 on the CPU ({str(error).splitlines()[0][:200]}); "
                      "running the same graph in FP32 (the simulated quantized model) instead", stacklevel=3)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if self.threads:
            opts.intra_op_num_threads = self.threads
        with tempfile.TemporaryDirectory(prefix="dmruntime-fp32-") as tmp:
            path = Path(tmp) / self.path.name  # external data: big graphs pass protobuf's 2 GB
            onnx.save(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=1024)
            session = ort.InferenceSession(str(path), opts, providers=list(self.providers))
        self.widened = True
        return session
