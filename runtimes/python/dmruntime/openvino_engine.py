"""One OpenVINO engine: a per-group QDQ graph whose activation scales OpenVINO compiles in.

OpenVINO is optional (``pip install 'dmruntime[openvino]'``); it is imported only when a bundle
built for openvino-cpu is opened.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .engine import check_sample
from .engines import EngineContext, EngineRuntime
from .errors import BundleError


def openvino_core(threads: int = 0, cache_dir: str | Path | None = None):
    """An ``openvino.Core`` with OpenVINO's compile cache in ``cache_dir`` (created if missing):
    a second start then imports the compiled models instead of compiling them again."""
    try:
        import openvino as ov
    except ImportError:
        raise BundleError("this bundle's engines run on OpenVINO, which is not installed: "
                          "pip install 'dmruntime[openvino]' (or pip install openvino)") from None
    core = ov.Core()
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        core.set_property({"CACHE_DIR": str(cache_dir)})
    if threads:
        core.set_property("CPU", {"INFERENCE_NUM_THREADS": int(threads)})
    return core


class OpenVinoEngine:
    """An OpenVINO compiled model over one engine file, compiled on first use and reused.

    Same interface as :class:`dmruntime.engine.OnnxEngine`: ``predict(sample, timestep, extra,
    cond)`` -> eps. ``config``: OpenVINO compile properties (the manifest's inference precision,
    or the caller's). :meth:`release` frees the activation memory between uses (the weights stay).
    """

    def __init__(self, path: str | Path, sample_shape: tuple[int, ...], core, config: dict | None = None):
        self.path = Path(path)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.core = core
        self.config = dict(config or {})
        self._compiled = None
        self._request = None

    @property
    def compiled(self):
        """The compiled model (compiled on first use, from the path, so that OpenVINO's compile
        cache applies)."""
        if self._compiled is None:
            try:
                self._compiled = self.core.compile_model(str(self.path), "CPU", self.config)
            except Exception as e:  # OpenVINO raises RuntimeError subclasses for unreadable models
                raise BundleError(f"cannot compile engine {self.path} with OpenVINO: {e}. The file may be corrupt "
                                  "or from a newer dmcompile; rebuild the bundle.") from e
            self._request = self._compiled.create_infer_request()
        return self._compiled

    def predict(self, sample: np.ndarray, timestep: int | np.ndarray, extra: dict | None = None,
                cond: dict | None = None) -> np.ndarray:
        """Run the UNet once (see OnnxEngine.predict); ``extra`` must be empty: OpenVINO
        engines carry their group's scales."""
        check_sample(sample, self.sample_shape)
        if extra:
            raise BundleError(f"{self.path.name} is an OpenVINO engine: it takes no group inputs")
        ts = np.broadcast_to(np.asarray(timestep, dtype=np.int64), (sample.shape[0],)).copy()
        if self._request is None:
            self.compiled  # noqa: B018 (compiles and creates the request)
        self._request.infer({"sample": sample, "timestep": ts, **(cond or {})})
        # the request reuses its output buffer: copy before the next call overwrites it
        return np.array(self._request.get_tensor("eps").data, copy=True)

    def release(self) -> None:
        """Free this engine's activation buffers (reallocated on its next call)."""
        if self._compiled is not None:
            self._compiled.release_memory()


class OpenVinoRuntime(EngineRuntime):
    """OpenVINO engines (``engine.runtime`` "openvino"): one compiled model per engine file, its
    group's scales compiled in; OpenVINO's compile cache in ``ctx.cache_dir``. ``options``:
    ``openvino_config`` adds or replaces compile properties (the manifest's default precision
    hint is the base)."""

    name = "openvino"

    def open(self, ctx: EngineContext, files: list[str], device: str) -> dict[str, OpenVinoEngine]:
        core = openvino_core(ctx.threads, ctx.cache_dir)
        precision = ctx.manifest["engine"].get("inference_precision")
        config = {**({"INFERENCE_PRECISION_HINT": precision} if precision else {}),
                  **(ctx.options.get("openvino_config") or {})}
        return {name: OpenVinoEngine(ctx.root / name, ctx.sample_shape, core, config) for name in files}
