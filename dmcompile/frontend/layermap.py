"""The layer map: every Conv / Gemm / MatMul node of the exported graph, tied to its torch
module, weight initializer, weight shape and MACs per sample.

Identities come from export (node name scopes and parameter names), never from matching
tensor values. Shapes come from running the graph once at batch 1 with the inputs and
outputs of those nodes exposed, so MACs are exact for any architecture.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from .. import onnxio
from ..errors import ArtifactError
from .passes import module_of_node

LAYER_MAP_SCHEMA_VERSION = 1
QUANTIZABLE_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class Layer:
    """One quantizable node. ``weight`` is None for activation x activation MatMuls
    (attention scores); ``module`` is the torch module path the node came from."""

    node: str
    op_type: str
    module: str
    weight: str | None
    weight_shape: list[int] | None
    weight_transposed: bool
    activation_input: str
    output_shape: list[int]
    macs: int

    @property
    def params(self) -> int:
        return int(np.prod(self.weight_shape)) if self.weight_shape else 0


@dataclass(frozen=True)
class LayerMap:
    model_id: str
    layers: tuple[Layer, ...]

    def to_dict(self) -> dict:
        return {"schema_version": LAYER_MAP_SCHEMA_VERSION, "model_id": self.model_id,
                "total_macs": self.total_macs, "layers": [asdict(l) for l in self.layers]}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerMap":
        if d.get("schema_version") != LAYER_MAP_SCHEMA_VERSION:
            raise ArtifactError(f"layer map schema_version {d.get('schema_version')!r} is not supported (this "
                                f"dmcompile reads {LAYER_MAP_SCHEMA_VERSION}); export the model again")
        return cls(d["model_id"], tuple(Layer(**l) for l in d["layers"]))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> "LayerMap":
        """Read layer_map.json; ArtifactError if it is missing, corrupt or of another schema."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"cannot read layer map {path}: {e}; export the model again") from e

    @property
    def total_macs(self) -> int:
        return sum(l.macs for l in self.layers)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for l in self.layers:
            out[l.op_type] = out.get(l.op_type, 0) + 1
        return out


def inferred_shapes(model: onnx.ModelProto, feeds: dict, base_dir=None) -> dict[str, list[int]]:
    """Shapes ONNX Runtime's symbolic shape inference finds with the inputs fixed to ``feeds``'
    shapes (every tensor of diffusers' UNets, without running them); {} where it fails. Weights
    kept as external data (in ``base_dir``) go in as inputs of their shape, small ones read."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    m = onnx.ModelProto()
    m.CopyFrom(model)
    kept = []
    for init in m.graph.initializer:
        if not uses_external_data(init):
            kept.append(init)
        elif base_dir is not None and int(np.prod(init.dims)) <= 4096:  # constants the shapes may hang on
            load_external_data_for_tensor(init, str(base_dir))
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
            kept.append(init)
        else:
            m.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    for inp in m.graph.input:
        if inp.name in feeds:
            del inp.type.tensor_type.shape.dim[:]
            for d in np.shape(feeds[inp.name]):
                inp.type.tensor_type.shape.dim.add().dim_value = int(d)
    try:
        inferred = SymbolicShapeInference.infer_shapes(m, auto_merge=False, guess_output_rank=False)
    except Exception:  # an op it does not know: the probe below runs the graph instead
        return {}
    out = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = [int(d.dim_value) for d in dims]
    return out


def _shapes(model: onnx.ModelProto, names: list[str], feeds: dict, base_dir=None) -> dict[str, list[int]]:
    """Shapes of ``names`` at ``feeds``: inferred where symbolic inference finds them (running an
    SDXL-sized UNet with its attention scores as outputs did not fit in 24 GB), the rest probed."""
    known = {k: list(np.shape(v)) for k, v in feeds.items()} | inferred_shapes(model, feeds, base_dir)
    missing = [n for n in names if n not in known]
    return known | (_probe_shapes(model, missing, feeds, base_dir) if missing else {})


def _probe_shapes(model: onnx.ModelProto, names: list[str], feeds: dict, base_dir=None) -> dict[str, list[int]]:
    """Run the graph once with the shape of each of ``names`` added as an output; return the
    shapes. ``base_dir``: where the model's external data lives, if it has any."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    shape_of = {n: f"{n}/dmcompile_shape" for n in dict.fromkeys(names)}
    for n, s in shape_of.items():
        probe.graph.node.append(onnx.helper.make_node("Shape", [n], [s], name=s))
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(s))
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = onnxio.session(probe, opts, base_dir=base_dir)
    values = sess.run(list(shape_of.values()), feeds)
    return {n: [int(d) for d in v] for n, v in zip(shape_of, values)}


def _macs(op: str, node: onnx.NodeProto, shapes: dict, w_shape: list[int] | None) -> int:
    out = shapes[node.output[0]]
    if op == "Conv":
        cout, cin_g, *kernel = w_shape
        return int(np.prod(out)) * cin_g * int(np.prod(kernel))
    a = shapes[node.input[0]]
    if op == "Gemm":
        trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
        k = a[0] if trans_a else a[1]
        return int(np.prod(out)) * k
    return int(np.prod(out)) * a[-1]  # MatMul: every output element is a K-long dot product


def build_layer_map(model: onnx.ModelProto, model_id: str, sample_shape: tuple[int, ...],
                    module_names: set[str] | None = None, extra_feeds: dict | None = None,
                    base_dir=None, feeds: dict | None = None) -> LayerMap:
    """Layer map of an exported UNet (inputs ``sample``, ``timestep`` and ``extra_feeds``: the
    conditioning at batch 1), shapes at batch 1. ``base_dir``: the folder of the model's
    external data, if it has any. ``feeds``: every input at batch 1, for other graphs (the
    VAE decoder)."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    targets = [n for n in g.node if n.op_type in QUANTIZABLE_OPS]
    probe_names = sorted({v for n in targets for v in (n.input[0], n.input[1], n.output[0]) if v not in inits})
    if feeds is None:
        feeds = {"sample": np.zeros((1, *sample_shape), np.float32), "timestep": np.array([500], np.int64),
                 **(extra_feeds or {})}
    shapes = _shapes(model, probe_names, feeds, base_dir)
    layers = []
    for node in targets:
        w = node.input[1] if node.input[1] in inits else None
        w_shape = list(inits[w].dims) if w else None
        module = module_of_node(node.name)
        if module_names is not None:
            while module and module not in module_names:  # nearest enclosing torch module
                module = module.rpartition(".")[0]
        transposed = bool(w) and (w.endswith(".weight_t") or node.op_type == "MatMul")
        layers.append(Layer(node=node.name, op_type=node.op_type, module=module, weight=w, weight_shape=w_shape,
                            weight_transposed=transposed, activation_input=node.input[0],
                            output_shape=shapes[node.output[0]], macs=_macs(node.op_type, node, shapes, w_shape)))
    return LayerMap(model_id, tuple(layers))
