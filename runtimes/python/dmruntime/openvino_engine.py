"""One OpenVINO engine: a QDQ graph whose activation scales OpenVINO compiles in (one per group,
or one for all groups fed each group's scalars: dmcompile's ``lowering/affine.py``).

OpenVINO is optional (``pip install 'dmruntime[openvino]'``); it is imported only when a bundle
built for openvino-cpu is opened.
"""

from __future__ import annotations

import hashlib
import json
import threading
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
    Thread-safe: an infer request is busy while it runs, so each thread gets its own.
    """

    def __init__(self, path: str | Path, sample_shape: tuple[int, ...], core, config: dict | None = None):
        self.path = Path(path)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.core = core
        self.config = dict(config or {})
        self._compiled = None
        self._local = threading.local()  # this thread's infer request
        self._lock = threading.Lock()  # compiling, and release_memory against running requests
        self._running = 0

    @property
    def compiled(self):
        """The compiled model (compiled on first use, from the path, so that OpenVINO's compile
        cache applies)."""
        with self._lock:
            if self._compiled is None:
                try:
                    self._compiled = self.core.compile_model(str(self.path), "CPU", self.config)
                except Exception as e:  # OpenVINO raises RuntimeError subclasses for unreadable models
                    raise BundleError(f"cannot compile engine {self.path} with OpenVINO: {e}. The file may be "
                                      "corrupt or from a newer dmcompile; rebuild the bundle.") from e
        return self._compiled

    def _request(self):
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def predict(self, sample: np.ndarray, timestep: int | np.ndarray, extra: dict | None = None,
                cond: dict | None = None) -> np.ndarray:
        """Run the UNet once (see OnnxEngine.predict); ``extra``: the group's scalars of an engine
        that serves every group (none where each engine carries its group's scales)."""
        check_sample(sample, self.sample_shape)
        ts = np.broadcast_to(np.asarray(timestep, dtype=np.int64), (sample.shape[0],)).copy()
        request = self._request()
        with self._lock:
            self._running += 1
        try:
            request.infer({"sample": sample, "timestep": ts, **(cond or {}), **(extra or {})})
            # the request reuses its output buffer: copy before the next call overwrites it
            return np.array(request.get_tensor("eps").data, copy=True)
        except (RuntimeError, TypeError, ValueError, KeyError) as e:
            raise BundleError(f"engine {self.path.name} refused its inputs ({str(e).strip()[:300]}): the manifest "
                              "does not describe this engine; rebuild the bundle") from e
        finally:
            with self._lock:
                self._running -= 1

    def release(self) -> None:
        """Free this engine's activation buffers (reallocated on its next call); skipped while
        another thread's request runs on them."""
        with self._lock:
            if self._compiled is not None and not self._running:
                self._compiled.release_memory()


class OpenVinoRuntime(EngineRuntime):
    """OpenVINO engines (``engine.runtime`` "openvino"): one compiled model per engine file, its
    group's scales compiled in; OpenVINO's compile cache in ``ctx.cache_dir``, one subfolder per
    compile config. ``options``:
    ``openvino_config`` adds or replaces compile properties (the manifest's default precision
    hint is the base)."""

    name = "openvino"

    def open(self, ctx: EngineContext, files: list[str], device: str) -> dict[str, OpenVinoEngine]:
        precision = ctx.manifest["engine"].get("inference_precision")
        config = {**({"INFERENCE_PRECISION_HINT": precision} if precision else {}),
                  **(ctx.options.get("openvino_config") or {})}
        # one cache folder per compile config: a bf16 compile sharing a cache folder with an f32
        # compile of the same file gave other outputs than an uncached one (digits16) and crashed
        # (the SD 1.5 UNet); in folders of their own both match their uncached compiles
        key = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
        core = openvino_core(ctx.threads, None if ctx.cache_dir is None else Path(ctx.cache_dir) / f"config-{key}")
        return {name: OpenVinoEngine(ctx.root / name, ctx.sample_shape, core, config) for name in files}
