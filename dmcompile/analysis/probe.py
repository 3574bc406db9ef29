"""One fp32 ONNX session that can quantize any layer, at any bit width, per batch row.

The probe model is the fp32 export with (a) the weights of quantizable layers overridable
(fed fake-quantized per call) and (b) every quantized activation tensor passed through a
float fake-quantizer whose scale, zero point, level count and on/off switch are inputs with
one value per batch row. Rows that switch different tensors on (with different groups'
scales) share one call: that is how the activation sweeps are batched. Fake quantization
here rounds like the deployed QDQ graph (round half to even, clip to [0, levels]).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import onnxio, parallel
from ..calibration.rounding import RoundToNearest
from ..errors import ModelError
from ..frontend.layermap import Layer, LayerMap, inferred_shapes
from ..quant import dequantize, qparams

SEP = "|"


def probe_model(fp: onnx.ModelProto, weights: list[str], tensors: dict[str, int]) -> onnx.ModelProto:
    """``weights``: initializers made overridable; ``tensors``: activation name -> rank."""
    m = onnx.ModelProto()
    m.CopyFrom(fp)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    for w in weights:
        g.input.append(helper.make_tensor_value_info(w, inits[w].data_type, list(inits[w].dims)))
    outputs = {o.name for o in g.output}
    new_nodes = []
    fq = {}
    for t, rank in tensors.items():
        src, dst = (t + SEP + "raw", t) if t in outputs else (t, t + SEP + "fq")
        shape = f"{t}{SEP}shape"
        g.initializer.append(numpy_helper.from_array(np.array([-1] + [1] * (rank - 1), np.int64), shape))
        p = {k: f"{t}{SEP}{k}" for k in ("s", "z", "n", "on")}
        for name in p.values():
            g.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["rows"]))
        r = {k: f"{v}{SEP}r" for k, v in p.items()}
        nodes = [helper.make_node("Reshape", [p[k], shape], [r[k]]) for k in p]
        o = f"{t}{SEP}"
        nodes += [
            helper.make_node("Div", [src, r["s"]], [o + "d"]),
            helper.make_node("Round", [o + "d"], [o + "r"]),
            helper.make_node("Add", [o + "r", r["z"]], [o + "a"]),
            helper.make_node("Min", [o + "a", r["n"]], [o + "hi"]),
            helper.make_node("Relu", [o + "hi"], [o + "q"]),
            helper.make_node("Sub", [o + "q", r["z"]], [o + "c"]),
            helper.make_node("Mul", [o + "c", r["s"]], [o + "dq"]),
            helper.make_node("Sub", [o + "dq", src], [o + "e"]),
            helper.make_node("Mul", [o + "e", r["on"]], [o + "me"]),
            helper.make_node("Add", [src, o + "me"], [dst]),
        ]
        fq[t] = (src, dst, nodes)
    for node in g.node:
        for i, v in enumerate(node.input):
            if v in fq and v not in outputs:
                node.input[i] = fq[v][1]
    for node in list(g.node):
        for j, out in enumerate(node.output):
            if out in fq and out in outputs:
                node.output[j] = fq[out][0]
    pending = dict(fq)
    for t in [i.name for i in g.input if i.name in pending]:
        new_nodes += pending.pop(t)[2]
    for node in g.node:
        new_nodes.append(node)
        for out in node.output:
            key = out.removesuffix(SEP + "raw")
            if key in pending:
                new_nodes += pending.pop(key)[2]
    assert not pending, f"tensors without a producer: {list(pending)[:3]}"
    del g.node[:]
    g.node.extend(new_nodes)
    return m


@dataclass
class Probe:
    """Sessions over the probe models plus what is needed to feed them. Three variants of the
    graph, each built on first use: weights overridable only (weight sweeps), fake-quantizers
    only (activation sweeps), both (whole-model checks); the fake-quantizers cost about as
    much as the UNet itself, so sweeps that do not need them do not run them."""

    fp: object  # onnx.ModelProto
    layers: tuple[Layer, ...]  # quantizable layers with weights
    weights: dict[str, np.ndarray]  # fp32 weight per layer.weight
    tensors: tuple[str, ...]
    ratio: dict[str, int]  # tensor -> dim0 / batch rows
    ranks: dict[str, int]
    threads: int = 0
    cond_names: tuple[str, ...] = ()  # conditioning inputs fed with every call
    base_dir: object = None  # folder of ``fp``'s external data, if it has any
    rounder: object = None  # a calibration.rounding method: how weights are rounded (None: to nearest)
    source: object = None  # the model file ``fp`` was read from (workers without ``fp`` read it there)

    def __post_init__(self):
        self._sessions = {}
        if self.rounder is None:
            self.rounder = RoundToNearest()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_sessions"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._sessions = {}

    def for_workers(self, ship_bytes: int | None = None) -> "Probe":
        """What Ray workers get (jobs bring their weight feeds; the rounding stays here): the
        graph with its weights through the object store when they are small
        (``parallel.portable``), else only the path of the model file, ``source``."""
        fp, base_dir = parallel.portable(self.fp, self.base_dir, ship_bytes) if self.source is not None else \
            (self.fp, self.base_dir)
        return dataclasses.replace(self, fp=fp, base_dir=base_dir, weights={}, rounder=None)

    def opened(self) -> "Probe":
        """This probe, its graph read from ``source`` first if it came without one (a worker)."""
        if self.fp is None:
            self.fp, self.base_dir = parallel.opened(None, self.source, self.base_dir)
        return self

    def session(self, *, with_weights: bool, with_acts: bool):
        key = (with_weights, with_acts)
        if key not in self._sessions:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.log_severity_level = 3  # overridable weights are intended: no warning per initializer
            if self.threads:
                so.intra_op_num_threads = self.threads
            m = probe_model(self.fp, [l.weight for l in self.layers] if with_weights else [],
                            self.ranks if with_acts else {})
            self._sessions[key] = onnxio.session(m, so, base_dir=self.base_dir)
        return self._sessions[key]

    def weight_feed(self, layer: Layer, bits: int | None, groups: tuple[int, ...] | None = None) -> dict:
        """The fake-quantized weight of one layer, rounded as the build stores it (``bits``
        None: full precision; ``groups``: the timestep groups whose moments GPTQ uses)."""
        if bits is None:
            return {}
        return {layer.weight: dequantize(self.rounder.quantize(layer, self.weights[layer.weight], bits, groups))}

    def error_power(self, layer: Layer, bits: int) -> float:
        """The rounding's error power at ``bits`` (the RD model's P(b))."""
        return self.rounder.error_power(layer, self.weights[layer.weight], bits)

    def run(self, x: np.ndarray, t: np.ndarray, weights: dict | None = None, acts: dict | None = None,
            cond: dict | None = None) -> np.ndarray:
        """UNet output for rows (x, t) and, for conditional models, their conditions ``cond``
        (input name -> one row per row of x). ``acts``: tensor -> (s, z, n, on) per-row arrays."""
        if set(cond or {}) != set(self.cond_names):
            raise ModelError(f"the probe takes conditioning {list(self.cond_names)}, got {sorted(cond or {})}")
        feeds = {"sample": x, "timestep": t, **(cond or {})}
        if acts:
            rows = len(x)
            off = (np.ones(rows, np.float32), np.zeros(rows, np.float32), np.full(rows, 255.0, np.float32),
                   np.zeros(rows, np.float32))
            for name in self.tensors:
                vals = acts.get(name, off)
                for k, v in zip(("s", "z", "n", "on"), vals):
                    feeds[f"{name}{SEP}{k}"] = np.repeat(np.asarray(v, np.float32), self.ratio[name])
        feeds.update(weights or {})
        return self.session(with_weights=bool(weights), with_acts=bool(acts)).run(["eps"], feeds)[0]


def act_params(lo: float, hi: float, bits: int, rows: int) -> tuple[np.ndarray, ...]:
    """Per-row (scale, zero point, levels, on) of an asymmetric ``bits`` quantizer over [lo, hi]."""
    s, z = qparams(lo, hi, bits=bits)
    return (np.full(rows, s, np.float32), np.full(rows, z, np.float32), np.full(rows, 2**bits - 1, np.float32),
            np.ones(rows, np.float32))


def make_probe(fp: onnx.ModelProto, layer_map: LayerMap, tensors: list[str], sample_shape, threads: int = 0,
               conditioning=None, base_dir=None, rounder=None, source=None) -> Probe:
    """The probe; tensor ranks and batch ratios come from the fp32 model's shapes at batch 2 and 3
    (symbolic shape inference, a run for what it cannot infer).
    ``conditioning`` (dmruntime's Conditioning): the model's conditioning inputs, fed dummies
    in the shape runs and the recorded conditions in every later call. ``base_dir``: where
    ``fp``'s external data is, if it leaves its weights on disk."""
    layers = tuple(l for l in layer_map.layers if l.weight)
    inits = {i.name: i for i in fp.graph.initializer}
    weights = {l.weight: onnxio.array(inits[l.weight], base_dir).astype(np.float32) for l in layers}
    shapes, missing = {}, []
    for b in (2, 3):
        feeds = {"sample": np.zeros((b, *sample_shape), np.float32), "timestep": np.zeros(b, np.int64),
                 **(conditioning.dummy(b) if conditioning else {})}
        # inferred where symbolic shape inference can (running an SD-sized UNet with every tensor as
        # an output at batch 3 passed 22 GB); the rest from a run with those as outputs
        known = {k: tuple(np.shape(v)) for k, v in feeds.items()} | \
            {k: tuple(v) for k, v in inferred_shapes(fp, feeds, base_dir).items()}
        shapes[b] = {t: known[t] for t in tensors if t in known}
        missing = sorted(set(missing) | {t for t in tensors if t not in known})
    if missing:
        m = onnx.ModelProto()
        m.CopyFrom(fp)
        have = {o.name for o in m.graph.output}
        m.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in missing if t not in have)
        sess = onnxio.session(m, base_dir=base_dir)
        for b in (2, 3):
            feeds = {"sample": np.zeros((b, *sample_shape), np.float32), "timestep": np.zeros(b, np.int64),
                     **(conditioning.dummy(b) if conditioning else {})}
            shapes[b].update({t: v.shape for t, v in zip(missing, sess.run(missing, feeds))})
        del sess
    ratio, ranks = {}, {}
    for t in tensors:
        d2, d3 = shapes[2][t][0], shapes[3][t][0]
        if d2 % 2 or d3 % 3 or d2 // 2 != d3 // 3:
            raise ModelError(f"activation tensor {t} has leading dimension {d2} at batch 2 and {d3} at batch 3: it "
                             "does not scale with the batch, which per-row quantization of the probe needs; this "
                             "model is not supported for RD analysis (report its config)")
        ratio[t], ranks[t] = d2 // 2, len(shapes[2][t])
    return Probe(fp, layers, weights, tuple(tensors), ratio, ranks, threads,
                 conditioning.names if conditioning else (), base_dir, rounder, source)
