"""Graphs a bundle ships beside its UNet engines (the VAE decoder, the text encoders with their
tokenizers), each under a top-level manifest key that names its file(s), inputs and outputs.

Adding one is a module with a ``Component`` subclass plus one line in :data:`COMPONENTS`; the
bundle validates and opens every registered component its manifest lists, the same way.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from .engine import OnnxEngine, run_session
from .errors import BundleError
from .schema import FILE, Obj, Spec, check_entry

# manifest key -> "module:class" of its Component
COMPONENTS = {
    "decoder": "dmruntime.decoder:Decoder",
    "text": "dmruntime.text:TextEncoders",
}


class Component:
    """A named ONNX graph of a bundle: ``inputs`` -> ``outputs``, run on ONNX Runtime, its session
    created on first use. ``entry`` is its manifest record (``file`` at least)."""

    key = ""
    schema: Spec = Obj(required={"file": FILE})  # of its manifest entry
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    def __init__(self, root: Path, entry: dict, input_shape: tuple[int, ...], threads: int = 0):
        self.entry = entry
        self.engine = OnnxEngine(Path(root) / entry["file"], input_shape, threads=threads)

    @classmethod
    def files(cls, entry: dict) -> list[str]:
        """The bundle files this component reads (each must be in the manifest's ``files``)."""
        return [entry.get("file")]

    @classmethod
    def input_shape(cls, manifest: dict) -> tuple[int, ...]:
        """Per-row shape of the first input (checked on every call)."""
        raise NotImplementedError

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call of the graph: input name -> array, to output name -> array."""
        out = run_session(self.engine.session, list(self.outputs), feeds, self.engine.path)
        return dict(zip(self.outputs, out if len(self.outputs) > 1 else [out]))


def component_class(key: str) -> type[Component]:
    module, cls = COMPONENTS[key].split(":")
    return getattr(importlib.import_module(module), cls)


def check_components(manifest: dict, files: dict) -> None:
    """Raise BundleError unless every file a listed component reads is in ``files``."""
    for key in COMPONENTS:
        entry = manifest.get(key)
        if not entry:
            continue
        cls = component_class(key)
        check_entry(cls.schema, entry, key)
        for name in cls.files(entry):
            if name not in files:
                raise BundleError(f"the {key} file {name!r} is not listed in 'files'")


def open_components(root: Path, manifest: dict, threads: int = 0) -> dict[str, Component]:
    """Every registered component the manifest lists, by key."""
    out = {}
    for key in COMPONENTS:
        entry = manifest.get(key)
        if entry:
            cls = component_class(key)
            out[key] = cls(root, entry, cls.input_shape(manifest), threads=threads)
    return out
