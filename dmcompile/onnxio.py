"""ONNX files of any size: protobuf cannot hold a message past 2 GB, so a model whose weights
pass that (the Stable Diffusion UNet's fp32 weights are 3.4 GB) keeps them as ONNX external
data, one ``<file>.data`` next to the graph. Every stage reads, writes and opens ONNX Runtime
sessions through here, so that big and small models take the same code paths.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

PROTOBUF_LIMIT = 2**31 - 1
HEADROOM = 256 << 20  # graph structure and attributes on top of the weights
DATA_SUFFIX = ".data"


def data_bytes(model: onnx.ModelProto) -> int:
    """Bytes of weight data held inside the message (external data not counted)."""
    return sum(len(t.raw_data) + 4 * len(t.float_data) + 8 * len(t.int64_data) + 4 * len(t.int32_data)
               for t in model.graph.initializer)


def fits(model: onnx.ModelProto) -> bool:
    """Whether the model serializes to one protobuf message."""
    return data_bytes(model) + HEADROOM < PROTOBUF_LIMIT


def external_files(model: onnx.ModelProto) -> list[str]:
    """The external data files the model's initializers refer to (relative to the model)."""
    files = set()
    for t in model.graph.initializer:
        if uses_external_data(t):
            files.update(e.value for e in t.external_data if e.key == "location")
    return sorted(files)


def array(tensor: onnx.TensorProto, base_dir: str | Path | None = None):
    """A tensor's values as numpy, read from its external data file in ``base_dir`` if it has one
    (the tensor itself is not changed)."""
    from onnx import numpy_helper

    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    t = onnx.TensorProto()
    t.CopyFrom(tensor)
    load_external_data_for_tensor(t, str(base_dir))
    t.data_location = onnx.TensorProto.DEFAULT
    del t.external_data[:]
    return numpy_helper.to_array(t)


def load_data(model: onnx.ModelProto, base_dir: str | Path) -> onnx.ModelProto:
    """Bring the external data of ``model``'s initializers (files in ``base_dir``) into the
    message, in place: for graphs that keep a few of a big model's tensors."""
    for t in model.graph.initializer:
        if uses_external_data(t):
            load_external_data_for_tensor(t, str(base_dir))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
    return model


def load(path: str | Path, *, weights: bool = True) -> onnx.ModelProto:
    """Read an ONNX file; ``weights=False`` leaves external data on disk (references kept),
    for graph edits that do not touch the weights."""
    return onnx.load(str(path), load_external_data=weights)


def save(model: onnx.ModelProto, path: str | Path, *, keep: bool = True) -> list[str]:
    """Write ``model`` to ``path``; past protobuf's limit its weights go to ``<name>.data`` next
    to it. Returns the file names written. The in-memory model is left as it was unless
    ``keep=False`` (then a big model's bytes move to disk without a second copy in memory)."""
    path = Path(path)
    if fits(model) or external_files(model):
        onnx.save(model, str(path))
        return [path.name]
    data = path.name + DATA_SUFFIX
    m = model
    if keep:
        m = onnx.ModelProto()
        m.CopyFrom(model)  # onnx's writer moves the bytes out of the message it saves
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024)
    return [path.name, data]


def files_of(path: str | Path) -> list[str]:
    """The file names an ONNX file on disk consists of (itself and its external data)."""
    path = Path(path)
    return [path.name, *external_files(load(path, weights=False))]


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same bytes, no copy; the session never sees the source folder
    except OSError:
        shutil.copyfile(src, dst)


def session(model: onnx.ModelProto | str | Path, options=None, *, base_dir: str | Path | None = None,
            providers=("CPUExecutionProvider",), **kw):
    """An ONNX Runtime InferenceSession over a file or a ModelProto of any size. Small protos
    go in as bytes; one past 2 GB, or one whose weights are external data in ``base_dir`` (as
    :func:`load` with ``weights=False`` leaves them), goes through a temporary folder (data
    files hard-linked, not copied)."""
    import onnxruntime as ort

    if isinstance(model, (str, Path)):
        return ort.InferenceSession(str(model), options, providers=list(providers), **kw)
    ext = external_files(model)
    if not ext and fits(model):
        return ort.InferenceSession(model.SerializeToString(), options, providers=list(providers), **kw)
    if ext and base_dir is None:
        raise ValueError("a model with external data needs base_dir, the folder its data files are in")
    with tempfile.TemporaryDirectory(prefix="dmcompile-onnx-") as d:
        path = Path(d) / "model.onnx"
        for name in ext:
            _link(Path(base_dir) / name, Path(d) / name)
        save(model, path)
        return ort.InferenceSession(str(path), options, providers=list(providers), **kw)


def producers(graph) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that computes it."""
    return {o: n for n in graph.node for o in n.output}


def consumers(graph) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """Tensor name -> (node, input index) of every node that reads it, in graph order."""
    out: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            out.setdefault(name, []).append((node, i))
    return out
