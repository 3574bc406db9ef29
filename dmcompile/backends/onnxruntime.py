"""ONNX Runtime backend: group models with shared external weights, and a fusion report."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import onnx
from onnx import numpy_helper

WEIGHTS_FILE = "weights.bin"
ALIGN = 4096  # page-aligned offsets let ONNX Runtime memory-map external data


def shared_initializers(models: list[onnx.ModelProto]) -> list[str]:
    """Initializer names whose bytes are identical in every model (stored once on disk)."""
    first = {i.name: i for i in models[0].graph.initializer}
    shared = []
    for name, init in first.items():
        raw = numpy_helper.to_array(init).tobytes()
        if len(raw) < 64:
            continue  # scales and zero points: inline is smaller than a reference
        if all(any(i.name == name and numpy_helper.to_array(i).tobytes() == raw for i in m.graph.initializer)
               for m in models[1:]):
            shared.append(name)
    return shared


def save_group_models(models: list[onnx.ModelProto], names: list[str], folder: Path) -> tuple[list[str], dict]:
    """Save models as ``names`` in ``folder``; initializers shared by all of them go once into
    weights.bin, referenced by offset from each model. Returns the files written and the
    manifest's ``shared_weights`` entry (name, dtype, shape, offset, length of each tensor),
    from which the runtime builds one set of weights for all its sessions without parsing ONNX."""
    shared = shared_initializers(models)
    offsets: dict[str, tuple[int, int]] = {}
    table = []
    with open(folder / WEIGHTS_FILE, "wb") as f:
        inits = {i.name: i for i in models[0].graph.initializer}
        for name in shared:
            raw = numpy_helper.to_array(inits[name]).tobytes()
            pad = (-f.tell()) % ALIGN
            f.write(b"\0" * pad)
            offsets[name] = (f.tell(), len(raw))
            arr = numpy_helper.to_array(inits[name])
            table.append({"name": name, "dtype": str(arr.dtype), "shape": list(arr.shape),
                          "offset": f.tell(), "length": len(raw)})
            f.write(raw)
    for model, fname in zip(models, names):
        for init in model.graph.initializer:
            if init.name in offsets:
                off, length = offsets[init.name]
                init.ClearField("raw_data")
                for field in ("float_data", "int32_data", "int64_data", "double_data"):
                    init.ClearField(field)
                del init.external_data[:]
                for k, v in (("location", WEIGHTS_FILE), ("offset", str(off)), ("length", str(length))):
                    init.external_data.add(key=k, value=v)
                init.data_location = onnx.TensorProto.EXTERNAL
        onnx.save(model, str(folder / fname))
    if not shared:
        (folder / WEIGHTS_FILE).unlink()
        return list(names), {}
    return [*names, WEIGHTS_FILE], {"file": WEIGHTS_FILE, "tensors": table}


INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger"}
FLOAT_OPS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul"}


def fusion_report(model_path: Path) -> dict:
    """Op counts after ONNX Runtime's graph optimisation: how many quantizable nodes run as
    integer kernels. Returns {"integer": {op: n}, "float": {op: n}, "ratio": integer / all}."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.bin")
        ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(str(Path(tmp) / "opt.onnx"), load_external_data=False).graph.node)
    integer = {k: v for k, v in ops.items() if k in INTEGER_OPS}
    floats = {k: v for k, v in ops.items() if k in FLOAT_OPS}
    total = sum(integer.values()) + sum(floats.values())
    return {"integer": integer, "float": floats, "ratio": (sum(integer.values()) / total) if total else 1.0}
