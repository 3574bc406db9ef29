"""A model run in pieces, for recording many of its tensors per call without holding them all.

ONNX Runtime keeps every graph output of a run until the run ends, fetched or not, so a model
with thousands of recorded tensors as outputs holds them all at once (SDXL's UNet at 1024 x 1024:
more than 20 GB per guided call). Cut into consecutive ranges of nodes, each range its own
session (its own weights: nothing is loaded twice), a call runs range after range and hands out
each range's recorded tensors before the next runs; only the tensors later ranges read are kept.

The recorded tensors come out in producer order (graph inputs first, then the order of the
nodes computing them) whatever the number of pieces, so consumers that draw random numbers per
tensor draw the same ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx

from .. import onnxio
from ..frontend.layermap import inferred_shapes

PIECE_BYTES = 2 << 30  # recorded bytes per piece (one call's rows); more pieces cost little time

_ORT_TYPES = {"tensor(float)": onnx.TensorProto.FLOAT, "tensor(float16)": onnx.TensorProto.FLOAT16,
              "tensor(double)": onnx.TensorProto.DOUBLE, "tensor(int64)": onnx.TensorProto.INT64,
              "tensor(int32)": onnx.TensorProto.INT32, "tensor(bool)": onnx.TensorProto.BOOL,
              "tensor(bfloat16)": onnx.TensorProto.BFLOAT16, "tensor(int8)": onnx.TensorProto.INT8,
              "tensor(uint8)": onnx.TensorProto.UINT8}


def reads(node: onnx.NodeProto) -> list[str]:
    """The values ``node`` reads: its inputs and what its subgraphs (If, Loop) take from outside."""
    out = [i for i in node.input if i]
    for attr in node.attribute:
        for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | \
                {i.name for i in g.initializer}
            out += [v for n in g.node for v in reads(n) if v not in inner]
    return out


def producer_order(model: onnx.ModelProto, names) -> list[str]:
    """``names`` sorted by the position of the node that computes each (graph inputs first;
    stable otherwise): the order :class:`PiecewiseSession` hands them out in."""
    pos = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    return sorted(names, key=lambda n: pos.get(n, -1))


def cut(model: onnx.ModelProto, sizes: dict[str, int], budget: int) -> list[int]:
    """Node indices where pieces start (0 first): consecutive ranges whose outputs among
    ``sizes`` (bytes of each recorded tensor) stay within ``budget`` (a node past it alone is a
    piece of its own)."""
    starts, acc = [0], 0
    for i, n in enumerate(model.graph.node):
        b = sum(sizes.get(o, 0) for o in n.output)
        if acc and acc + b > budget:
            starts.append(i)
            acc = 0
        acc += b
    return starts


@dataclass
class _Piece:
    session: object
    inputs: list[str]
    fetch: list[str]
    hand_out: list[str]  # recorded tensors and model outputs it computes, in producer order


class PiecewiseSession:
    """``model`` (weights as external data in ``base_dir``, or inside) with ``recorded`` as
    outputs, cut where ``starts`` says (:func:`cut`); ``run(feeds)`` yields one dict per piece:
    its recorded tensors (the first also the recorded graph inputs) and the model outputs it
    computes."""

    def __init__(self, model: onnx.ModelProto, recorded, starts: list[int], options=None, base_dir=None):
        g = model.graph
        self.recorded = producer_order(model, dict.fromkeys(recorded))
        self.outputs = [o.name for o in g.output]
        self.starts = list(starts)
        inits = {i.name: i for i in g.initializer}
        graph_inputs = {i.name: i for i in g.input}
        ends = [*self.starts[1:], len(g.node)]
        later_reads: list[set[str]] = [set() for _ in ends]
        seen: set[str] = set()
        for k in range(len(ends) - 1, -1, -1):
            later_reads[k] = set(seen)
            seen.update(v for n in g.node[self.starts[k]:ends[k]] for v in reads(n))
        types = {i.name: i.type.tensor_type.elem_type for i in g.input}
        wanted = set(self.recorded) | set(self.outputs)
        self.pieces: list[_Piece] = []
        for k, (a, b) in enumerate(zip(self.starts, ends)):
            nodes = g.node[a:b]
            made = [o for n in nodes for o in n.output if o]
            here = set(made)
            read = list(dict.fromkeys(v for n in nodes for v in reads(n)))
            inputs = [v for v in read if v not in inits and v not in here]
            fetch = [o for o in made if o in wanted or o in later_reads[k]]
            hand_out = [n for n in self.recorded if n in here] + [o for o in self.outputs if o in here]
            if k == 0:
                hand_out = [n for n in self.recorded if n in graph_inputs and n not in inits] + hand_out
            piece = onnx.helper.make_model(
                onnx.helper.make_graph(
                    list(nodes), f"{g.name}_piece{k}",
                    [onnx.helper.make_tensor_value_info(v, types[v], None) for v in inputs],
                    [onnx.helper.make_empty_tensor_value_info(o) for o in fetch],
                    [inits[v] for v in dict.fromkeys(read) if v in inits]),
                opset_imports=model.opset_import, ir_version=model.ir_version)
            piece.functions.extend(model.functions)
            session = onnxio.session(piece, options, base_dir=base_dir)
            for o in session.get_outputs():
                types[o.name] = _ORT_TYPES.get(o.type, onnx.TensorProto.FLOAT)
            self.pieces.append(_Piece(session, inputs, fetch, list(dict.fromkeys(hand_out))))
        self._last_read = {}
        for k, p in enumerate(self.pieces):
            for v in p.inputs:
                self._last_read[v] = k

    def run(self, feeds: dict) -> Iterator[dict[str, np.ndarray]]:
        live = dict(feeds)
        for k, p in enumerate(self.pieces):
            got = dict(zip(p.fetch, p.session.run(p.fetch, {v: live[v] for v in p.inputs})))
            share = {n: got[n] if n in got else live[n] for n in p.hand_out}
            live.update((v, got[v]) for v in p.fetch if self._last_read.get(v, -1) > k)
            for v in [v for v in live if self._last_read.get(v, -1) <= k]:
                del live[v]  # read by no later piece
            del got
            yield share


def recorded_sizes(model: onnx.ModelProto, recorded, feeds: dict, base_dir=None) -> dict[str, int]:
    """Bytes of each recorded tensor at ``feeds`` (float32 assumed), from ONNX Runtime's
    symbolic shape inference; tensors it cannot size count as the median of those it can."""
    shapes = {k: np.shape(v) for k, v in feeds.items()} | inferred_shapes(model, feeds, base_dir)
    sizes = {n: 4 * int(np.prod(shapes[n])) for n in recorded if n in shapes}
    fill = int(np.median(list(sizes.values()))) if sizes else 0
    return {n: sizes.get(n, fill) for n in recorded}


def open_session(model: onnx.ModelProto, recorded, feeds: dict, options=None, base_dir=None,
                 budget: int | None = None) -> PiecewiseSession:
    """A :class:`PiecewiseSession` cut for one call of ``feeds``' shapes to hold at most about
    ``budget`` (default ``PIECE_BYTES``) of recorded tensors at a time."""
    sizes = recorded_sizes(model, recorded, feeds, base_dir)
    return PiecewiseSession(model, recorded, cut(model, sizes, budget or PIECE_BYTES), options, base_dir)
