"""Check the TensorRT and CUDA names dmruntime.tensorrt calls against the real Python bindings,
on a machine without a GPU:

    bash scripts/check_tensorrt_api.sh          # makes a scratch venv, then runs this file there

TensorRT's lean runtime bindings (``tensorrt-lean-cu12-bindings`` + ``-libs``) and cuda-bindings
install from the package registries and import without a GPU, so the runtime half (gpu.py) is
checked by attribute lookup and signature; the full TensorRT bindings (``tensorrt-cu12-bindings``)
install too but do not import without the builder's libraries (NVIDIA's index only), so the
builder half (build.py) is checked against the names its extension module defines.

``USED`` lists what gpu.py and build.py call; ``tests/test_tensorrt_api_list.py`` reads their
source and fails when it and this list disagree, so the list cannot drift from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path

# object the code calls it on -> attribute names (dotted: an attribute's attribute)
USED = {
    "trt": ["Logger.WARNING", "Runtime", "TensorIOMode.INPUT", "nptype",
            "ExecutionContextAllocationStrategy.USER_MANAGED", "__version__"],
    "Runtime": ["deserialize_cuda_engine"],
    "ICudaEngine": ["num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype",
                    "num_optimization_profiles", "create_execution_context"],
    "IExecutionContext": ["set_optimization_profile_async", "set_input_shape", "set_tensor_address",
                          "update_device_memory_size_for_shapes", "set_device_memory", "execute_async_v3"],
    "builder": ["Builder", "create_network", "NetworkDefinitionCreationFlag", "STRONGLY_TYPED", "OnnxParser",
                "parse_from_file", "num_errors", "get_error", "create_builder_config", "set_memory_pool_limit",
                "MemoryPoolType", "WORKSPACE", "create_timing_cache", "set_timing_cache", "get_timing_cache",
                "serialize", "create_optimization_profile", "set_shape", "add_optimization_profile",
                "build_serialized_network"],
    "cudart": ["cudaGetDeviceCount", "cudaError_t.cudaSuccess", "cudaSetDevice", "cudaStreamCreateWithFlags",
               "cudaStreamNonBlocking", "cudaGetDeviceProperties", "cudaMalloc", "cudaFree", "cudaMemcpyAsync",
               "cudaMemcpyKind.cudaMemcpyHostToDevice", "cudaMemcpyKind.cudaMemcpyDeviceToHost",
               "cudaStreamSynchronize", "cudaStreamBeginCapture", "cudaStreamCaptureMode.cudaStreamCaptureModeGlobal",
               "cudaStreamEndCapture", "cudaGraphInstantiate", "cudaGraphLaunch", "cudaMemGetInfo"],
}
# argument counts (after self) of the calls whose order matters
ARITY = {("IExecutionContext", "set_optimization_profile_async"): 2, ("IExecutionContext", "set_device_memory"): 2,
         ("IExecutionContext", "execute_async_v3"): 1, ("IExecutionContext", "set_tensor_address"): 2,
         ("IExecutionContext", "set_input_shape"): 2}


def lookup(obj, dotted: str) -> bool:
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def arities(method) -> set[int]:
    """Argument counts after self of a pybind11 method, one per overload, from its signature
    lines ``name(self: T, a: A, b: B) -> R`` (overloads: ``1. name(...)``)."""
    import re

    name = method.__name__
    out = set()
    for line in (method.__doc__ or "").splitlines():
        m = re.match(rf"\s*(?:\d+\.\s*)?{name}\((.*)\)\s*->", line)
        if m and "*args" not in m.group(1):
            params = [p for p in re.split(r",\s*(?=\w+:)", m.group(1)) if p.strip()]
            out.add(len(params) - 1)
    return out


def main(full_bindings_so: str | None = None) -> int:
    import tensorrt_lean_bindings as trt
    from cuda.bindings import runtime as cudart

    problems = []
    for group, names in USED.items():
        if group == "builder":
            continue
        root = {"trt": trt, "Runtime": trt.Runtime, "ICudaEngine": trt.ICudaEngine,
                "IExecutionContext": trt.IExecutionContext, "cudart": cudart}[group]
        problems += [f"{group}.{n} missing" for n in names if not lookup(root, n)]
    for (group, name), want in ARITY.items():
        got = arities(getattr(getattr(trt, group), name))
        if want not in got:
            problems.append(f"{group}.{name} takes {sorted(got)} arguments, the code passes {want}")
    builder = "not checked (no full bindings given)"
    if full_bindings_so:
        data = Path(full_bindings_so).read_bytes()
        missing = [n for n in USED["builder"] if n.encode() + b"\0" not in data]
        problems += [f"builder: {n} not defined by {Path(full_bindings_so).name}" for n in missing]
        builder = f"{len(USED['builder']) - len(missing)} of {len(USED['builder'])} names found"
    import cuda.bindings

    print(f"TensorRT lean bindings {trt.__version__}, cuda-bindings {cuda.bindings.__version__}; "
          f"runtime names: {sum(len(v) for k, v in USED.items() if k != 'builder')} checked; builder: {builder}")
    for p in problems:
        print("PROBLEM:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
