"""The only code that calls TensorRT and CUDA at run time: a narrow interface the runtime uses
(``runtime.py``) and the tests replace with a numpy fake.

Written against TensorRT 10's Python API (``IRuntime.deserialize_cuda_engine``,
``ICudaEngine.create_execution_context(ExecutionContextAllocationStrategy.USER_MANAGED)``,
``IExecutionContext.set_optimization_profile_async / set_input_shape / set_tensor_address /
update_device_memory_size_for_shapes / set_device_memory / execute_async_v3``) and cuda-bindings'
runtime API (``cudaMalloc``, ``cudaMemcpyAsync``, stream capture into a CUDA graph,
``cudaGraphInstantiate``, ``cudaGraphLaunch``). It has never run: no GPU with TensorRT was
available where it was written; the first run on a GPU machine is its test
(``benchmarks/bench_tensorrt.py``). Its names and signatures were checked against TensorRT 11.4's
Python bindings and cuda-bindings 13.5 (``scripts/check_tensorrt_api.py``, which imports the
lean runtime's bindings and reads the builder's: both install without a GPU).
"""

from __future__ import annotations

import numpy as np

from .record import TensorRTUnavailable


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-bindings >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise TensorRTUnavailable("cuda-bindings is not installed: pip install 'dmruntime[tensorrt]' "
                                      "(or open the bundle with device='cpu')") from None
    return cudart


def import_tensorrt():
    """The tensorrt module, or TensorRTUnavailable saying how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise TensorRTUnavailable("TensorRT is not installed: pip install 'dmruntime[tensorrt]' on a machine with an "
                                  "NVIDIA GPU (or open the bundle with device='cpu' to run its ONNX on ONNX Runtime)"
                                  ) from None
    except OSError as e:  # the wheel is there, its CUDA libraries are not
        raise TensorRTUnavailable(f"TensorRT is installed but cannot load ({e}); install the CUDA runtime it was "
                                  "built for") from None
    return tensorrt


class CudaGpu:
    """One CUDA device and stream, and TensorRT's runtime on it."""

    def __init__(self, device: int = 0):
        self.trt = import_tensorrt()
        self.cudart = _cudart()
        err, count = self.cudart.cudaGetDeviceCount()
        if err != self.cudart.cudaError_t.cudaSuccess or count == 0:
            raise TensorRTUnavailable("no NVIDIA GPU is visible (cudaGetDeviceCount found none); TensorRT engines "
                                      "need one (or open the bundle with device='cpu')")
        self._check(self.cudart.cudaSetDevice(device))
        self.stream = self._check(self.cudart.cudaStreamCreateWithFlags(self.cudart.cudaStreamNonBlocking))
        self.stream_handle = int(self.stream)  # TensorRT takes the stream as an integer handle
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        prop = self._check(self.cudart.cudaGetDeviceProperties(device))
        name = prop.name.decode(errors="replace").rstrip("\0") if isinstance(prop.name, bytes) else str(prop.name)
        self.device = {"name": name, "compute_capability": f"{prop.major}.{prop.minor}"}
        self.tensorrt_version = self.trt.__version__

    def _check(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA call failed: {err}")
        return rest[0] if len(rest) == 1 else (tuple(rest) or None)

    # memory
    def alloc(self, nbytes: int) -> int:
        return int(self._check(self.cudart.cudaMalloc(max(int(nbytes), 1))))

    def free(self, ptr: int) -> None:
        self._check(self.cudart.cudaFree(ptr))

    def upload(self, ptr: int, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host)
        self._check(self.cudart.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes,
                                                self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))

    def download(self, host: np.ndarray, ptr: int) -> None:
        self._check(self.cudart.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes,
                                                self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        self.synchronize()

    def synchronize(self) -> None:
        self._check(self.cudart.cudaStreamSynchronize(self.stream))

    # engines
    def load(self, plan: bytes):
        engine = self.runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise TensorRTUnavailable("TensorRT could not deserialize an engine (built by another TensorRT version "
                                      "or GPU?); build the engines again on this machine")
        return engine

    def io_names(self, engine) -> tuple[list[str], list[str]]:
        """(input names, output names) of an engine."""
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        return inputs, [n for n in names if n not in inputs]

    def dtype(self, engine, name: str) -> str:
        return np.dtype(self.trt.nptype(engine.get_tensor_dtype(name))).name

    def num_profiles(self, engine) -> int:
        return engine.num_optimization_profiles

    def context(self, engine, profile: int, shapes: dict[str, tuple], addresses: dict[str, int]):
        """An execution context without its own activation memory, bound to one optimization
        profile, input shapes and I/O addresses; returns (context, activation bytes it needs)."""
        ctx = engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if not ctx.set_optimization_profile_async(profile, self.stream_handle):
            raise RuntimeError(f"TensorRT refused optimization profile {profile}")
        for name, shape in shapes.items():
            if not ctx.set_input_shape(name, tuple(shape)):
                raise RuntimeError(f"TensorRT refused shape {tuple(shape)} for input {name} in profile {profile}")
        for name, ptr in addresses.items():
            if not ctx.set_tensor_address(name, ptr):
                raise RuntimeError(f"TensorRT refused the address of {name}")
        return ctx, int(ctx.update_device_memory_size_for_shapes())

    def set_memory(self, ctx, ptr: int, nbytes: int) -> None:
        ctx.set_device_memory(ptr, nbytes)

    def run(self, ctx) -> None:
        if not ctx.execute_async_v3(self.stream_handle):
            raise RuntimeError("TensorRT execute_async_v3 failed (see TensorRT's log above)")

    def capture(self, ctx):
        """A CUDA graph of one ``run(ctx)`` (run once before: TensorRT defers some work to the
        first enqueue, which must not land in the graph)."""
        self.run(ctx)
        self.synchronize()
        cudart = self.cudart
        self._check(cudart.cudaStreamBeginCapture(self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
        self.run(ctx)
        graph = self._check(cudart.cudaStreamEndCapture(self.stream))
        return self._check(cudart.cudaGraphInstantiate(graph, 0))

    def launch(self, graph) -> None:
        self._check(self.cudart.cudaGraphLaunch(graph, self.stream))

    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory."""
        return tuple(int(x) for x in self._check(self.cudart.cudaMemGetInfo()))
