"""OpenVINO backend: one QDQ graph per engine, its activation scales compiled in.

OpenVINO's low-precision transformations turn FakeQuantize / QDQ pairs with constant scales
into u8 x i8 Convolution and FullyConnected kernels at compile time; scales fed as inputs would
stop that (as they stop ONNX Runtime's fusion). So each engine is the group's QDQ graph as
``lowering/qdq.py`` writes it, not fused offline: OpenVINO fuses it when the runtime compiles.

Engines of one bundle hold the same int8 weights, so the big initializers are written once, to
``weights.bin``, which every engine's ONNX file references as external data (offset, length);
each engine file keeps only its graph and small constants (scales, zero points).

OpenVINO's CPU plugin repacks weights per compiled model (its weight cache belongs to the
compiled model), so resident memory grows with the number of engines; ``cluster_groups`` merges
adjacent groups into fewer engines (``--max-engines``).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import set_external_data

from ..quant import merge_ranges

WEIGHTS_FILE = "weights.bin"
MIN_EXTERNAL_BYTES = 1024  # smaller tensors (scales, zero points) stay in the graph
ALIGN = 64
# Runtime layer types that multiply: the share of them in u8/i8 is the engine's integer share.
MAC_LAYERS = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul")
INTEGER_PRECISIONS = ("u8", "i8")


def engine_file(index: int) -> str:
    return f"unet_e{index:02d}.onnx"


def cluster_groups(ranges: list[dict[str, tuple[float, float]]], widths: list[tuple], max_engines: int | None
                   ) -> list[list[int]]:
    """Adjacent groups merged, closest activation scales first, until ``max_engines`` remain.

    Distance of two neighbouring clusters: the mean over tensors of |log(scale_a / scale_b)|,
    scale = (hi - lo) of the cluster's merged range (the union of its groups' ranges). Groups
    with different weight widths are never merged (their weights differ). Returns the clusters,
    each a list of group indices in order; without a bound, one cluster per group."""
    clusters = [[g] for g in range(len(ranges))]
    merged = [dict(r) for r in ranges]
    if max_engines is None:
        return clusters

    def width(r):
        return np.array([max(hi - lo, 1e-12) for lo, hi in r.values()])

    def distance(i):
        if widths[clusters[i][0]] != widths[clusters[i + 1][0]]:
            return np.inf
        return float(np.mean(np.abs(np.log(width(merged[i]) / width(merged[i + 1])))))

    while len(clusters) > max_engines:
        d = [distance(i) for i in range(len(clusters) - 1)]
        i = int(np.argmin(d)) if d else 0
        if not d or not np.isfinite(d[i]):
            break  # only groups with different weights are left: they cannot share an engine
        merged[i] = merge_ranges([merged[i], merged[i + 1]])
        clusters[i] += clusters.pop(i + 1)
        merged.pop(i + 1)
    return clusters


class SharedWeights:
    """Writes engines whose big initializers go once into one ``weights.bin`` (deduplicated by
    content), each engine file referencing it by offset."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.offsets: dict[bytes, tuple[int, int]] = {}
        self.size = 0
        self._f = open(self.folder / WEIGHTS_FILE, "wb")

    def add(self, model: onnx.ModelProto, name: str) -> str:
        """Move ``model``'s initializers of MIN_EXTERNAL_BYTES or more to weights.bin, save it as
        ``name``; returns name."""
        for init in model.graph.initializer:
            raw = init.raw_data or onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init)).raw_data
            if len(raw) < MIN_EXTERNAL_BYTES:
                continue
            key = hashlib.sha256(raw).digest() + init.data_type.to_bytes(2, "little")
            if key not in self.offsets:
                pad = -self.size % ALIGN
                self._f.write(b"\0" * pad)
                self.offsets[key] = (self.size + pad, len(raw))
                self._f.write(raw)
                self.size += pad + len(raw)
            offset, length = self.offsets[key]
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                init.ClearField(field)
            set_external_data(init, location=WEIGHTS_FILE, offset=offset, length=length)
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.EXTERNAL
        onnx.save(model, str(self.folder / name))
        return name

    def close(self) -> list[str]:
        self._f.close()
        return [WEIGHTS_FILE]


def compile_model(path: Path, config: dict | None = None):
    """An OpenVINO compiled model of one engine file on the CPU."""
    import openvino as ov

    core = ov.Core()
    return core.compile_model(core.read_model(str(path)), "CPU", config or {})


def runtime_precisions(compiled) -> Counter:
    """(runtime layer type, runtime precision) -> count, for the multiplying layers of a
    compiled model's execution graph."""
    c = Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if kind in MAC_LAYERS:
            c[(kind, info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?")] += 1
    return c


def fusion_report(model: Path | onnx.ModelProto) -> dict:
    """Which multiplying layers OpenVINO's CPU plugin runs in int8 after compiling ``model``
    (an engine file or an in-memory graph), read from the compiled model's runtime graph.
    Returns {"integer": {layer: n}, "float": {layer: n}, "ratio": integer / all}; attention's
    activation MatMuls are float by design on openvino-cpu and count as float when OpenVINO
    keeps them as MatMul layers."""
    if isinstance(model, onnx.ModelProto):
        with tempfile.TemporaryDirectory() as tmp:
            from .. import onnxio

            onnxio.save(model, Path(tmp) / "m.onnx")
            return fusion_report(Path(tmp) / "m.onnx")
    counts = runtime_precisions(compile_model(Path(model), {"INFERENCE_PRECISION_HINT": "f32"}))
    integer, floats = Counter(), Counter()
    for (kind, prec), n in counts.items():
        (integer if prec in INTEGER_PRECISIONS else floats)[kind] += n
    total = sum(integer.values()) + sum(floats.values())
    return {"integer": dict(sorted(integer.items())), "float": dict(sorted(floats.items())),
            "ratio": sum(integer.values()) / total if total else 1.0}


def openvino_version() -> str:
    import openvino

    return openvino.__version__.split("-")[0]
