"""OpenVINO backend: one QDQ graph per engine, its activation scales compiled in.

OpenVINO's low-precision transformations turn FakeQuantize / QDQ pairs with constant scales
into u8 x i8 Convolution and FullyConnected kernels at compile time; scales fed as inputs would
stop that (as they stop ONNX Runtime's fusion). So each engine is the group's QDQ graph as
``lowering/qdq.py`` writes it, not fused offline: OpenVINO fuses it when the runtime compiles.

Engines of one bundle hold the same int8 weights, so the big initializers are written once, to
``weights.bin``, which every engine's ONNX file references as external data (offset, length);
each engine file keeps only its graph and small constants (scales, zero points)
(``shared_weights.py``, also TensorRT's).

OpenVINO's CPU plugin repacks weights per compiled model (its weight cache belongs to the
compiled model), so resident memory grows with the number of engines: ``--max-engines`` merges
adjacent groups into fewer engines (``cluster_groups``), and ``--shared-engine`` runs every group
on one engine whose groups differ only in scalars fed as inputs (``lowering/affine.py``:
constant-scale quantizers after a per-group multiplication, the products corrected after the
integer kernels; ``group_XX.npz`` per group as on ort-cpu). That engine costs speed (measured:
OpenVINO no longer fuses a SiLU with the quantizer after it when a fed multiplication sits
between them, 1.09-1.18x per call on ddpm-cifar10-32), so it is the choice for memory, not the default.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import onnx

from .. import onnxio
from ..lowering.affine import group_scalars
from ..memory import MemoryModel
from .base import Backend, EngineJob, EngineSet, write_group_inputs
from .shared_weights import SharedWeights, emit_qdq_engines

ENGINE_FILE = "unet.onnx"

# Runtime layer types that multiply: the share of them in u8/i8 is the engine's integer share.
MAC_LAYERS = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul")
INTEGER_PRECISIONS = ("u8", "i8")


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


def openvino_fusion_report(model: Path | onnx.ModelProto) -> dict:
    """Which multiplying layers OpenVINO's CPU plugin runs in int8 after compiling ``model``
    (an engine file or an in-memory graph), read from the compiled model's runtime graph.
    Returns {"integer": {layer: n}, "float": {layer: n}, "ratio": integer / all}; attention's
    activation MatMuls are float by design on openvino-cpu and count as float when OpenVINO
    keeps them as MatMul layers."""
    if isinstance(model, onnx.ModelProto):
        with tempfile.TemporaryDirectory() as tmp:
            onnxio.save(model, Path(tmp) / "m.onnx")
            return openvino_fusion_report(Path(tmp) / "m.onnx")
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


class OpenVinoBackend(Backend):
    """openvino-cpu: per group (or run of merged groups) its QDQ graph, scales in it, weights once in
    weights.bin; the integer share read from OpenVINO's compiled runtime graph."""

    name = "openvino"
    # Fitted to two measured bundles (bench_runtime.py, peak RSS at batch 8): per compiled model 22 MB
    # + 2.5 bytes per int8 weight byte (digits16 K=10: 426 MB, ddpm-cifar10-32 K=10: 1356 MB); the
    # CPU plugin repacks weights per compiled model, each copying weights.bin.
    memory = MemoryModel(weight_copies=2.5, engine_mb=22.0, base_mb=146.0, shared_weights="weights.bin")
    fusion_note = ("int8 layers of OpenVINO's compiled runtime graph (per engine file; its groups' "
                   "scales are compiled in)")

    def emit(self, folder: Path, job: EngineJob, progress=None) -> EngineSet:
        K = job.groups
        same_weights = all((job.bits[g] == job.bits[0]).all() for g in range(K)) and not job.per_group_rounding
        if K == 1 or not (job.profile.scalar_group_inputs and job.shared_engine) or not same_weights:
            return emit_qdq_engines(folder, job, None, openvino_fusion_report)
        # one engine, its groups' scalars fed (lowering/affine.py)
        _, _, model = next(iter(job.lower([list(range(K))], job.ranges, affine_groups=True)))
        params = [group_scalars(model, job.ranges[g]) for g in range(K)]
        writer = SharedWeights(folder)
        try:
            name = writer.add(model, ENGINE_FILE)
        finally:
            files = writer.close()
        del model
        return EngineSet((name,), (name,) * K, tuple(params), {name: 0},
                         {name: openvino_fusion_report(folder / name)}, [name, *files, *write_group_inputs(folder, params)])

    def engine_entry(self, engines: EngineSet, guided: bool, config) -> dict:
        # the compile hint for the layers left float (the runtime passes it to OpenVINO)
        return {"openvino_version": openvino_version(), "inference_precision": config.float_precision}

    def fusion(self, bundle, engine: str) -> dict:
        return openvino_fusion_report(bundle.root / engine)
