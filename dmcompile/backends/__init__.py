"""Backends turn lowered ONNX models into engines a runtime loads. Optional backends
(TensorRT) are imported lazily, so dmcompile works without them."""
