"""Running a bundle's TensorRT engines: everything around the GPU calls, which go through one
``gpu`` object (``gpu.CudaGpu``; the tests pass a numpy fake).

At load: each engine's plan deserialized once; per batch size (the engines' static optimization
profiles) one set of I/O buffers shared by every engine; per engine and batch size one execution
context without memory of its own; one activation buffer, the largest any context needs, shared
by all of them (they run one at a time, on one stream); one CUDA graph per context, captured
once. Per call: copy the sample, timestep and conditions in (padded up to the profile's batch),
launch the graph of the group's engine, copy eps out.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np

from ..engine import check_sample
from ..errors import BundleError
from .record import check_record, io_specs, manifest_entry, plan_name, profile_for, read_record


def default_gpu():
    from .gpu import CudaGpu

    return CudaGpu()


class TensorRTEngines:
    """The engines of one bundle on one GPU, sharing I/O buffers and activation memory."""

    def __init__(self, gpu, engines: dict, batch_sizes: list[int], sample_shape, conditioning,
                 cuda_graphs: bool = True):
        self.gpu = gpu
        self.batch_sizes = sorted(batch_sizes)
        self.sample_shape = tuple(sample_shape)
        self.conditioning = conditioning
        self.cuda_graphs = cuda_graphs
        self._lock = threading.Lock()
        self._buffers = {}  # batch -> (input specs, output spec, {name: device ptr})
        self._contexts = {}  # (engine, batch) -> context
        self._graphs = {}  # (engine, batch) -> CUDA graph
        self._allocs = []
        need = 0
        self._host = {}  # batch -> {name: host array}, reused by every call
        for b in self.batch_sizes:
            inputs, output = io_specs(sample_shape, conditioning, b)
            ptrs = {s.name: self._alloc(s.nbytes) for s in (*inputs, output)}
            self._buffers[b] = (inputs, output, ptrs)
            self._host[b] = {s.name: np.zeros(s.shape, s.dtype) for s in (*inputs, output)}
        for name, engine in engines.items():
            self._check_io(name, engine)
            profiles = gpu.num_profiles(engine)
            if profiles != len(self.batch_sizes):
                raise BundleError(f"engine {name} has {profiles} optimization profiles, the record lists batch sizes "
                                  f"{self.batch_sizes}; build the engines again")
            for p, b in enumerate(self.batch_sizes):
                inputs, _, ptrs = self._buffers[b]
                ctx, size = gpu.context(engine, p, {s.name: s.shape for s in inputs}, ptrs)
                self._contexts[(name, b)] = ctx
                need = max(need, size)
        # One activation buffer for every context: engines run one after another on one stream.
        self.activation_bytes = need
        self._activations = self._alloc(need)
        for ctx in self._contexts.values():
            gpu.set_memory(ctx, self._activations, need)
        if cuda_graphs:
            for key, ctx in self._contexts.items():
                self._graphs[key] = gpu.capture(ctx)

    def _alloc(self, nbytes: int) -> int:
        ptr = self.gpu.alloc(nbytes)
        self._allocs.append(ptr)
        return ptr

    def _check_io(self, name: str, engine) -> None:
        inputs, output = io_specs(self.sample_shape, self.conditioning, 1)
        got_in, got_out = self.gpu.io_names(engine)
        want_in = [s.name for s in inputs]
        if sorted(got_in) != sorted(want_in) or got_out != [output.name]:
            raise BundleError(f"engine {name} has inputs {sorted(got_in)} and outputs {got_out}; the bundle expects "
                              f"{sorted(want_in)} -> ['eps']: it was built from another model; build the engines again")
        for s in (*inputs, output):
            dtype = self.gpu.dtype(engine, s.name)
            if dtype != s.dtype:
                raise BundleError(f"engine {name} takes {s.name} as {dtype}, the runtime feeds {s.dtype}; "
                                  "build the engines again from this bundle")

    @classmethod
    def load(cls, root: Path, manifest: dict, sample_shape, conditioning, gpu=None,
             cuda_graphs: bool = True) -> TensorRTEngines:
        """The bundle's engines on the GPU, after checking the manifest, the engine record and that
        the plans were built here (this TensorRT, this GPU model, this manifest)."""
        entry = manifest_entry(manifest)
        record = read_record(root)  # before touching CUDA: a missing build is the common case
        gpu = gpu or default_gpu()
        manifest_sha = hashlib.sha256((Path(root) / "manifest.json").read_bytes()).hexdigest()
        check_record(record, entry, manifest_sha, gpu.device, gpu.tensorrt_version)
        engines = {}
        for onnx_file in entry["onnx"]:
            path = Path(root) / plan_name(onnx_file)
            info = record["plans"][onnx_file]
            data = path.read_bytes() if path.is_file() else None
            if data is None or hashlib.sha256(data).hexdigest() != info.get("sha256"):
                raise BundleError(f"TensorRT plan {path} is missing or does not match its sha256 in the engine "
                                  "record; build the engines again")
            engines[onnx_file] = gpu.load(data)
        return cls(gpu, engines, record["batch_sizes"], sample_shape, conditioning, cuda_graphs)

    def engine(self, name: str) -> GroupEngine:
        return GroupEngine(self, name)

    def predict(self, name: str, sample: np.ndarray, timestep, cond: dict | None = None) -> np.ndarray:
        """eps of engine ``name`` for a batch (padded up to the smallest batch profile that holds it)."""
        check_sample(sample, self.sample_shape)
        with self._lock:  # one set of host and device buffers, one stream
            return self._predict(name, sample, timestep, cond)

    def _predict(self, name: str, sample: np.ndarray, timestep, cond: dict | None) -> np.ndarray:
        n = sample.shape[0]
        b = profile_for(n, self.batch_sizes)
        inputs, output, ptrs = self._buffers[b]
        feeds = {"sample": sample, "timestep": np.broadcast_to(np.asarray(timestep, np.int64), (n,))}
        feeds.update(cond or {})
        host = self._host[b]
        for s in inputs:
            host[s.name][:n] = feeds[s.name]
            host[s.name][n:] = 0  # padding rows; their outputs are dropped
            self.gpu.upload(ptrs[s.name], host[s.name])
        if self.cuda_graphs:
            self.gpu.launch(self._graphs[(name, b)])
        else:
            self.gpu.run(self._contexts[(name, b)])
        out = host[output.name]
        self.gpu.download(out, ptrs[output.name])
        return out[:n].copy()

    def close(self) -> None:
        for ptr in self._allocs:
            self.gpu.free(ptr)
        self._allocs = []


class GroupEngine:
    """One engine of a TensorRTEngines, with OnnxEngine's ``predict``."""

    def __init__(self, engines: TensorRTEngines, name: str):
        self.engines, self.name = engines, name

    def predict(self, sample: np.ndarray, timestep, extra: dict | None = None, cond: dict | None = None) -> np.ndarray:
        if extra:
            raise BundleError("TensorRT engines hold their group's scales; they take no group inputs")
        return self.engines.predict(self.name, sample, timestep, cond)

    @property
    def max_batch(self) -> int:
        """The largest batch a call may hold (the engines' largest optimization profile)."""
        return max(self.engines.batch_sizes)

    def release(self) -> None:
        """Nothing to free: all engines share one activation buffer."""
