"""Lowering a build's timestep groups (or clusters of them) one QDQ graph at a time."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx

from .. import onnxio
from ..frontend.layermap import Layer, LayerMap
from ..quant import FLOAT_BITS, merge_ranges, pinned_zero_point
from ..targets import TargetProfile
from .affine import affine_group_graph
from .qdq import broadcast_tensors, lower_group


def lower_groups(fp: Path, layer_map: LayerMap, quantized: set[str], weight_layers: Sequence[Layer],
                 profile: TargetProfile, bits: np.ndarray, per_group_rounding: bool, rounder,
                 clusters: list[list[int]], ranges: list[dict], progress=None, constant_conv_params: bool = False,
                 affine_groups: bool = False) -> Iterator[tuple[int, tuple, onnx.ModelProto]]:
    """Per cluster (a list of groups with equal widths ``bits[g]``): (cluster index, its weights'
    key: (widths, rounding scope), its QDQ graph with the union of its groups' activation
    ``ranges``), yielded one at a time so that only one unfused graph is held; graphs with equal
    keys hold byte-identical weights. Weights of ``fp``'s export are rounded by ``rounder`` (a
    method of ``calibration.rounding``), each (weight, width, scope) once; the scope is the
    cluster's groups with ``per_group_rounding``, else all (pooled). A width of ``FLOAT_BITS``
    leaves that layer float in that graph. ``progress(step, i, n)`` after each graph.
    ``constant_conv_params`` (one engine fed every cluster's scales): each Conv input gets one zero
    point for all clusters and those Convs add their bias in float (``lowering/qdq.py``).
    ``affine_groups`` (one cluster of all groups): every quantized tensor's zero point pinned over
    the groups, the graph in the form whose groups differ only in fed scalars
    (``lowering/affine.py``; the groups' inputs: ``affine.group_scalars``)."""
    # The graph only: a big model's weights stay on disk until quantized one at a time.
    fp_proto = onnxio.load(fp / "model.onnx", weights=False)
    inits = {i.name: i for i in fp_proto.graph.initializer}
    merged = [merge_ranges([ranges[g] for g in members]) for members in clusters]
    pins = conv_input_pins(fp_proto, quantized, merged) if constant_conv_params else None
    broadcast = broadcast_tensors(fp_proto) if constant_conv_params else None  # once, not per group
    if affine_groups:
        assert len(clusters) == 1, "an affine engine serves every group"
        pins = {t: pinned_zero_point([r[t] for r in ranges]) for t in sorted(ranges[0])}
    cache: dict[tuple, object] = {}  # each weight quantized once per width and scope
    for c, members in enumerate(clusters):
        widths = bits[members[0]]
        assert all((bits[g] == widths).all() for g in members), "a cluster mixes weight widths"
        scope = tuple(int(g) for g in members) if per_group_rounding else None
        weights = {}
        floats = {layer.node for layer, b in zip(weight_layers, widths) if b == FLOAT_BITS}
        for layer, b in zip(weight_layers, widths):
            if b == FLOAT_BITS:  # kept in float in these groups (allow_float)
                continue
            key = (layer.weight, int(b), scope)
            if key not in cache:
                cache[key] = rounder.quantize(layer, onnxio.array(inits[layer.weight], fp), int(b), scope)
            weights[layer.weight] = cache[key]
        model = lower_group(fp_proto, layer_map, set(quantized) - floats, weights, merged[c], profile, fp, pins,
                            broadcast)
        yield c, (tuple(int(b) for b in widths), scope), affine_group_graph(model) if affine_groups else model
        if progress:
            progress("lower", c + 1, len(clusters))


def conv_input_pins(model: onnx.ModelProto, quantized: set[str], ranges: list[dict]) -> dict[str, int]:
    """Each quantized Conv's input tensor -> one zero point for all of ``ranges`` (the groups or
    clusters that will share an engine), ``quant.pinned_zero_point``."""
    convs = {n.input[0] for n in model.graph.node if n.op_type == "Conv" and n.name in quantized}
    return {t: pinned_zero_point([r[t] for r in ranges]) for t in sorted(convs) if t in ranges[0]}
