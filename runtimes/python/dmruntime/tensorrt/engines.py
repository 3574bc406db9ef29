"""The TensorRT entry of dmruntime's engine registry (``engine.runtime`` "tensorrt"): the plans
built on this machine on the GPU (device "cuda", the default), or ONNX Runtime over the engines'
own FP16 ONNX on the CPU (device "cpu": the same quantization, a reference for checks, slow)."""

from __future__ import annotations

from ..engines import EngineContext, EngineRuntime
from ..schema import ENGINE, FILE, Int, List, Obj
from .record import manifest_entry
from .reference import ReferenceEngine
from .runtime import TensorRTEngines


class TensorRTRuntime(EngineRuntime):
    name = "tensorrt"
    devices = ("cuda", "cpu")
    schema = Obj(required={"tensorrt": Obj(required={"batch_sizes": List(Int(1, 4096), min_len=1),
                                                     "onnx": List(FILE, min_len=1)})},
                 optional=ENGINE.optional)

    def check(self, manifest: dict) -> None:
        manifest_entry(manifest)

    def open(self, ctx: EngineContext, files: list[str], device: str) -> dict:
        if device == "cuda":
            engines = TensorRTEngines.load(ctx.root, ctx.manifest, ctx.sample_shape, ctx.conditioning)
            return {name: engines.engine(name) for name in files}
        return {name: ReferenceEngine(ctx.root / name, ctx.sample_shape, threads=ctx.threads) for name in files}
