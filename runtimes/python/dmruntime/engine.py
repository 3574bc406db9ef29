"""One ONNX Runtime engine: a UNet that maps (sample, timestep) to the model output."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .engines import EngineContext, EngineRuntime
from .errors import BundleError, InputError


class OnnxEngine:
    """An ONNX Runtime session over one engine file, created on first use and then reused.

    Inputs: ``sample`` float32 [B, C, H, W], ``timestep`` int64 [B], and for quantized
    bundles the current group's parameters; output ``eps`` is the model output.
    """

    def __init__(self, path: str | Path, sample_shape: tuple[int, ...], threads: int = 0,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",), external: dict | None = None,
                 basic_optimizations: bool = False):
        self.path = Path(path)
        # TensorRT's FP16 Q/DQ graphs on the CPU (tensorrt/reference.py): ONNX Runtime 1.31's
        # extended (QDQ) optimizations build an invalid QuantizeLinear from them (int8 output, uint8
        # zero point); basic ones are exact rewrites, and that path is a reference, not a fast one.
        self.basic_optimizations = basic_optimizations
        self.external = external or {}  # initializer name -> array, for initializers stored outside the file
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.threads = threads
        self.providers = providers
        self._session = None
        self._lock = threading.Lock()  # one session even when threads ask at once (run is thread-safe)

    @property
    def session(self):
        with self._lock:
            if self._session is None:
                self._session = self._create_session()
        return self._session

    def _create_session(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.basic_optimizations:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if self.threads:
            opts.intra_op_num_threads = self.threads
        if self.external:
            # OrtValues wrap the arrays without copying; they must outlive the session.
            self._values = [ort.OrtValue.ortvalue_from_numpy(v) for v in self.external.values()]
            opts.add_external_initializers(list(self.external), self._values)
        try:
            return ort.InferenceSession(str(self.path), opts, providers=list(self.providers))
        except Exception as e:  # ORT raises several private types for unreadable models
            raise BundleError(f"cannot load engine {self.path}: {e}. The file is corrupt or truncated, or the "
                              "manifest does not describe it; rebuild the bundle.") from e

    def predict(self, sample: np.ndarray, timestep: int | np.ndarray, extra: dict | None = None,
                cond: dict | None = None) -> np.ndarray:
        """Run the UNet once. ``timestep`` is one training timestep or one per batch row;
        ``extra`` holds further inputs (a timestep group's quantization parameters);
        ``cond`` the conditioning inputs (validated by the caller), one row per sample."""
        check_sample(sample, self.sample_shape)
        ts = np.broadcast_to(np.asarray(timestep, dtype=np.int64), (sample.shape[0],)).copy()
        feeds = {"sample": sample, "timestep": ts}
        if cond:
            feeds.update(cond)
        if extra:
            feeds.update(extra)
        return run_session(self.session, ["eps"], feeds, self.path)

    def release(self) -> None:
        """Nothing to free: ONNX Runtime's arena keeps its buffers for the next call."""


def run_session(session, outputs: list[str], feeds: dict, path: Path) -> list[np.ndarray] | np.ndarray:
    """``session.run``; its failures on inputs dmruntime has validated mean that the manifest and
    the engine disagree (an input the graph lacks, another dtype): a BundleError saying so."""
    try:
        out = session.run(outputs, feeds)
    except MemoryError:
        raise
    except Exception as e:  # ORT's InvalidArgument / Fail are private types
        raise BundleError(f"engine {path.name} refused its inputs ({str(e).strip()[:300]}): the manifest does not "
                          "describe this engine; rebuild the bundle") from e
    return out[0] if len(outputs) == 1 else out


def check_sample(sample, sample_shape: tuple[int, ...], finite: bool = True) -> None:
    """Raise InputError unless ``sample`` is a float32 array of shape [B, *sample_shape] (and,
    with ``finite``, holds no NaN or inf: the engines check that, once per call)."""
    if not isinstance(sample, np.ndarray):
        raise InputError(f"sample must be a numpy array, got {type(sample).__name__}")
    if sample.dtype != np.float32:
        raise InputError(f"sample must be float32, got {sample.dtype}; use sample.astype(np.float32)")
    if sample.ndim != 1 + len(sample_shape) or tuple(sample.shape[1:]) != tuple(sample_shape):
        raise InputError(f"sample must have shape [B, {', '.join(map(str, sample_shape))}], got {list(sample.shape)}")
    if sample.shape[0] == 0:
        raise InputError("sample has no rows (batch 0): pass at least one")
    if finite and not np.isfinite(sample).all():  # quantization would hide them: the output looks fine
        raise InputError("sample holds NaN or inf values; the engines quantize their input, so the output would "
                         "look valid: check what produced it")


class OnnxRuntime(EngineRuntime):
    """ONNX Runtime engines (``engine.runtime`` "onnxruntime"): fused int8 graphs, low-bit weights
    stored outside them and handed to every session that uses them."""

    name = "onnxruntime"

    def check(self, manifest: dict) -> None:
        _warn_if_older_onnxruntime(manifest)

    def open(self, ctx: EngineContext, files: list[str], device: str) -> dict[str, OnnxEngine]:
        engines = ctx.manifest.get("engines") or {}
        out = {}
        for name in files:
            ext = {init: ctx.stored[key] for init, key in
                   (engines.get(name) or {}).get("external_weights", {}).items()}
            out[name] = OnnxEngine(ctx.root / name, ctx.sample_shape, threads=ctx.threads, external=ext)
        return out


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("+")[0].split(".")[:2] if p.isdigit())


def _warn_if_older_onnxruntime(manifest: dict) -> None:
    """Fused engines hold ONNX Runtime's own contrib ops (QGemm, MatMulIntegerToFloat, ...),
    written by the ONNX Runtime that built the bundle; an older one may not know them."""
    built = (manifest.get("engine") or {}).get("onnxruntime_version")
    if not built:
        return
    import warnings

    import onnxruntime

    if _version(onnxruntime.__version__) < _version(built):
        warnings.warn(f"bundle engines were fused by onnxruntime {built}; this is {onnxruntime.__version__}. "
                      "If loading fails, install onnxruntime>={built} or rebuild the bundle here.", stacklevel=5)
