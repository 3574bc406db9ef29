"""TensorRT engines for dmcompile bundles built with ``--target tensorrt`` (optional extra:
``pip install 'dmruntime[tensorrt]'``: TensorRT >= 10 and cuda-bindings; no torch).

- ``python -m dmruntime.tensorrt.build BUNDLE`` builds one engine (plan) per timestep group from
  the bundle's strongly typed ONNX, on the GPU machine that will run them (``build.py``);
- ``Bundle.open(BUNDLE)`` then runs them (``runtime.py``): engines deserialized once, one shared
  activation buffer, static I/O buffers per batch size, one CUDA graph per engine and batch size.

Every call into TensorRT or CUDA at run time goes through ``gpu.CudaGpu`` (``gpu.py``), a small
interface the tests replace with a numpy fake. Never run in this project's environment: TensorRT's
builder cannot be installed there and no GPU was lent; see the README.
"""

from .record import ENGINES_RECORD, PLANS_FOLDER, TensorRTUnavailable

__all__ = ["ENGINES_RECORD", "PLANS_FOLDER", "TensorRTUnavailable"]
