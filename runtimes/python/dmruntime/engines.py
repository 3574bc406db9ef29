"""What runs a bundle's engines: one ``EngineRuntime`` per value of the manifest's
``engine.runtime``, registered in :data:`ENGINE_RUNTIMES`.

Adding a runtime is one module with an ``EngineRuntime`` subclass plus one line here. Its module is
imported only when a bundle names it, so optional runtimes (OpenVINO, TensorRT) cost nothing when
they are not used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import BundleError, InputError
from .schema import ENGINE, Spec

# manifest engine.runtime -> "module:class" of its EngineRuntime
ENGINE_RUNTIMES = {
    "onnxruntime": "dmruntime.engine:OnnxRuntime",
    "openvino": "dmruntime.openvino_engine:OpenVinoRuntime",
    "tensorrt": "dmruntime.tensorrt.engines:TensorRTRuntime",
}


DEVICES = ("cuda", "cpu")  # every device some registered runtime runs on


class Engine(Protocol):
    """One engine file: the UNet for the groups that name it. An engine whose batch is bounded
    (TensorRT's static profiles) also has ``max_batch``."""

    def predict(self, sample: np.ndarray, timestep: int | np.ndarray, extra: dict | None = None,
                cond: dict | None = None) -> np.ndarray:
        """The model output for a batch; ``extra``: the group's inputs (its quantization
        parameters, for engines shared by groups); ``cond``: conditioning inputs, validated."""

    def release(self) -> None:
        """Free activation memory between uses (a no-op where the runtime keeps none)."""


@dataclass(frozen=True)
class EngineContext:
    """What an EngineRuntime may read to open a bundle's engines."""

    root: Path
    manifest: dict
    sample_shape: tuple[int, ...]
    conditioning: object  # dmruntime.Conditioning
    stored: dict = field(default_factory=dict)  # stored weight key -> expanded array (weights.npz)
    threads: int = 0
    cache_dir: str | Path | None = None
    options: dict = field(default_factory=dict)  # runtime-specific (openvino_config, ...)


class EngineRuntime:
    """How one kind of engine is checked and opened. Subclasses set ``name`` and ``devices`` (the
    first is the default) and implement :meth:`open`."""

    name = ""
    devices: tuple[str, ...] = ("cpu",)
    schema: Spec = ENGINE  # of the manifest's "engine" entry (checked before ``check``)

    def check(self, manifest: dict) -> None:
        """Runtime-specific manifest checks (raise BundleError); warnings allowed."""

    def device(self, requested: str | None) -> str:
        """The device to run on: ``requested``, or this runtime's default."""
        if requested is None:
            return self.devices[0]
        if requested not in DEVICES:
            raise InputError(f"device must be one of {', '.join(DEVICES)}, got {requested!r}")
        if requested not in self.devices:
            where = {"cuda": "--target tensorrt bundles"}.get(requested, "other bundles")
            raise InputError(f"this bundle runs on {self.name} ({', '.join(self.devices)}); device={requested!r} "
                             f"applies to {where}")
        return requested

    def open(self, ctx: EngineContext, files: list[str], device: str) -> dict[str, Engine]:
        """Engine file name -> Engine, for every file in ``files`` (created lazily where possible)."""
        raise NotImplementedError


def engine_runtime(name: str) -> EngineRuntime:
    """The registered EngineRuntime for a manifest's ``engine.runtime``."""
    where = ENGINE_RUNTIMES.get(name)
    if where is None:
        raise BundleError(f"the bundle's engines run on {name!r}, which this dmruntime does not support "
                          f"(it runs {', '.join(ENGINE_RUNTIMES)}); upgrade dmruntime")
    module, cls = where.split(":")
    return getattr(importlib.import_module(module), cls)()
