"""Backends turn lowered QDQ graphs into a runtime's engines, one module each, registered below
by the name a target profile's ``backend`` (and the manifest's ``engine.runtime``) carries.

Adding one: a module with a :class:`~dmcompile.backends.base.Backend` subclass, one line in
:data:`BACKENDS`. Its runtime library is imported inside its methods, so dmcompile works
without it.
"""

from __future__ import annotations

import importlib

from .base import Backend

# name -> "module:class"
BACKENDS = {
    "onnxruntime": "dmcompile.backends.onnxruntime:OnnxRuntimeBackend",
    "openvino": "dmcompile.backends.openvino:OpenVinoBackend",
    "tensorrt": "dmcompile.backends.tensorrt:TensorRTBackend",
}


def get_backend(name: str) -> Backend:
    """The registered backend ``name``; KeyError lists the known ones."""
    if name not in BACKENDS:
        raise KeyError(f"no backend {name!r}; dmcompile has {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)()
