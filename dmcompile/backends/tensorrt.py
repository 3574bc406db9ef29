"""TensorRT backend: one strongly typed, explicitly quantized ONNX per engine, and the engine
build where TensorRT exists.

Each engine file is a timestep group's QDQ graph (symmetric int8 Q/DQ on the inputs of Conv /
Gemm / MatMul, INT4 weight-only blocks, float biases, attention float) typed FP16 outside its
quantized ops (``lowering/fp16.py``); engines of one bundle share their weights through one
``weights.bin`` (``shared_weights.py``, as OpenVINO's). TensorRT's parser reads the ONNX and
its external data; ``dmruntime.tensorrt.build`` turns each file into a serialized engine (a
plan) on the GPU machine. The files are checked against ``tensorrt_rules`` as they are written:
a graph TensorRT would refuse or run unfused is a build error, not a bundle.

What has run here: the lowering, the rule checks, ONNX Runtime on the CPU over these same FP16
graphs. What has not: TensorRT itself (its builder cannot be installed in this environment).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
from dmruntime import Bundle
from dmruntime.tensorrt.record import PLANS_FOLDER

from .. import onnxio
from ..lowering.fp16 import float16_share, to_float16, to_float32
from ..memory import MemoryModel
from .base import Backend, EngineJob, EngineSet, Step
from .shared_weights import WEIGHTS_FILE, emit_qdq_engines
from .tensorrt_rules import check_explicit_quantization

TENSORRT_VERSION_REQUIRED = "10.0"  # strongly typed networks, INT4 blocks, INT64 inputs
BATCH_SIZES = (1, 2, 4, 8)  # samples per call; guided models also get twice each (both branches)
BUILD_COMMAND = "python -m dmruntime.tensorrt.build {bundle}"


def finish_engine(model: onnx.ModelProto, residual_skip: bool = True) -> onnx.ModelProto:
    """A lowered group graph made TensorRT's: FP16-typed, checked against its rules (raises
    ValueError listing what breaks them: a lowering bug, never the user's). ``residual_skip``:
    the profile's ``quantize_residual_skip``."""
    typed = to_float16(model)
    problems = check_explicit_quantization(typed, residual_skip)
    if problems:
        raise ValueError(f"the TensorRT lowering broke {len(problems)} of TensorRT's rules, first: {problems[0]}")
    return typed


def engine_report(model: onnx.ModelProto) -> dict:
    """What TensorRT is given to run in integer kernels, read from the graph (no TensorRT here):
    {"integer": {op: n}, "float": {op: n}, "ratio", "int4_weight_only", "fp16": {...}}.
    A weighted op is integer when its input 0 and weight are dequantized; weight-only INT4 counts
    apart (its arithmetic is FP16)."""
    g = model.graph
    producer = onnxio.producers(g)
    inits = {i.name: i for i in g.initializer}

    def dq(name):
        p = producer.get(name)
        return p if p is not None and p.op_type == "DequantizeLinear" else None

    integer, floats, int4 = Counter(), Counter(), Counter()
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        w = dq(n.input[1]) if len(n.input) > 1 else None
        w_init = inits.get(w.input[0]) if w is not None else None
        if w_init is not None and w_init.data_type == onnx.TensorProto.INT4:
            int4[n.op_type] += 1
        elif w is not None and dq(n.input[0]) is not None:
            integer[n.op_type] += 1
        else:
            floats[n.op_type] += 1
    total = sum(integer.values()) + sum(floats.values()) + sum(int4.values())
    return {"integer": dict(sorted(integer.items())), "float": dict(sorted(floats.items())),
            "int4_weight_only": dict(sorted(int4.items())), "ratio": sum(integer.values()) / total if total else 1.0,
            "fp16": float16_share(model)}


def batch_sizes(guided: bool, sizes=BATCH_SIZES) -> list[int]:
    """The engine's batch sizes (one static optimization profile each): the sample batches, and
    for a model with a null condition also their doubles (guidance runs both branches in one call)."""
    return sorted(set(sizes) | ({2 * b for b in sizes} if guided else set()))


def tensorrt_entry(files: list[str], guided: bool) -> dict:
    """The manifest's ``engine.tensorrt`` entry: what the engine build on the GPU machine needs."""
    return {"version_required": f">={TENSORRT_VERSION_REQUIRED}", "strongly_typed": True,
            "precision": "int8 Q/DQ + int4 weight-only, fp16 elsewhere",
            "batch_sizes": batch_sizes(guided), "guidance_batch": 2 if guided else None,
            "onnx": sorted(files), "plans_folder": PLANS_FOLDER,
            "build_command": BUILD_COMMAND.format(bundle="BUNDLE"), "built_here": False}


def tensorrt_available() -> str | None:
    """TensorRT's version when its builder imports here, else None."""
    try:
        import tensorrt
    except Exception:  # ImportError, or a broken install (missing CUDA libraries) raising OSError
        return None
    return getattr(tensorrt, "__version__", "unknown")


def write_build_script(folder: Path) -> str:
    """``build_engines.sh`` in the bundle: the command that finishes the job on the GPU machine."""
    path = Path(folder) / "build_engines.sh"
    path.write_text("#!/bin/sh\n"
                    "# Builds this bundle's TensorRT engines (one per timestep group) on the machine that runs them:\n"
                    "#   pip install './runtimes/python[tensorrt]'   (dmruntime from the dmcompile repository, with\n"
                    "#   TensorRT >= 10 and cuda-bindings; no torch)\n"
                    "# then run this script, or: python -m dmruntime.tensorrt.build BUNDLE [--batch-sizes 1 2 4]\n"
                    'exec python -m dmruntime.tensorrt.build "$(dirname "$0")" "$@"\n')
    path.chmod(0o755)
    return path.name


def build_plans(folder: Path, manifest: dict, progress=None) -> None:
    """TensorRT's plans of the engines, where its builder imports (the build's last step)."""
    if manifest["engine"]["tensorrt"]["built_here"]:
        from dmruntime.tensorrt.build import build_engines  # TensorRT itself: only where it imports

        build_engines(folder, progress=progress and (lambda i, n: progress("tensorrt", i, n)))


class TensorRTBackend(Backend):
    """tensorrt: per group (or run of merged groups) a strongly typed FP16 graph with int8 Q/DQ and
    INT4 weight-only blocks, checked against TensorRT's rules, weights once in weights.bin; the
    plans are built where TensorRT is (here when it imports, else on the GPU machine)."""

    name = "tensorrt"
    # GPU memory, on paper only (never measured here): each engine holds its own copy of the weights
    # (TensorRT engines cannot share them), activations are FP16 (half the fp32 liveness) in one
    # buffer shared by all engines; the CUDA context (some hundred MB) is not counted.
    memory = MemoryModel(weight_copies=1.0, activation_factor=0.5, shared_weights=WEIGHTS_FILE)
    float_weight_bytes = 2  # FP16
    fusion_note = ("int8 Q/DQ layers given to TensorRT (per engine file, read from the ONNX; TensorRT "
                   "has not run here)")

    def emit(self, folder: Path, job: EngineJob, progress=None) -> EngineSet:
        skip = job.profile.quantize_residual_skip
        return emit_qdq_engines(folder, job, lambda model: finish_engine(model, skip),
                                lambda path: engine_report(onnx.load(str(path), load_external_data=False)))

    def engine_entry(self, engines: EngineSet, guided: bool, config) -> dict:
        entry = tensorrt_entry(list(engines.engines), guided)
        entry["built_here"] = tensorrt_available() is not None
        return {"tensorrt": entry}

    def extra_files(self, folder: Path) -> list[str]:
        return [write_build_script(folder)]

    def steps(self) -> tuple[Step, ...]:
        return (Step("build_plans", build_plans, ("folder", "manifest", "progress"), in_folder=True),)

    def notes(self, manifest: dict, path: Path) -> list[str]:
        lines = []
        stored = (manifest.get("plan") or {}).get("stored_int8")
        if stored:
            lines.append(f"note: {len(stored['layers'])} 4-bit layer(s) stored INT8: {stored['why']}")
        trt = manifest["engine"]["tensorrt"]
        if trt["built_here"]:
            lines.append(f"TensorRT engines built into {path}/{trt['plans_folder']}/")
        else:
            lines.append(f"TensorRT is not installed here: the bundle holds the per-group ONNX; on the GPU machine run "
                         f"{path}/build_engines.sh (python -m dmruntime.tensorrt.build {path})")
        return lines

    def fusion(self, bundle, engine: str) -> dict:
        # what the graph gives TensorRT to run in int8 (TensorRT is not here)
        return engine_report(onnx.load(str(bundle.root / engine), load_external_data=False))

    def reference(self, bundle, folder: Path):
        """``bundle`` with every engine graph turned back to FP32 arithmetic (``to_float32``),
        written into ``folder`` and opened on ONNX Runtime: the simulated quantized model its FP16
        engines are compared with."""
        folder = Path(folder)
        engines = {g.engine for g in bundle.groups}
        for name in engines:
            onnxio.save(to_float32(onnx.load(str(bundle.root / name))), folder / name)
        for name in set(bundle.manifest["files"]) - engines - {WEIGHTS_FILE}:  # conditioning, decoder: as they are
            (folder / name).symlink_to(bundle.root / name)
        return Bundle(folder, bundle.manifest, device="cpu", correction=bundle.corrections is not None)
