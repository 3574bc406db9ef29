"""Which layers are quantized: per-layer overrides resolve in one place, layer name first,
then module name (or prefix), then op type, then the global default (quantize)."""

from __future__ import annotations

from ..errors import ConfigError
from ..frontend.layermap import Layer, LayerMap

ALIASES = ("first_conv", "last_conv")


def _matches(entry: str, layer: Layer, first_conv: str, last_conv: str) -> bool:
    if entry == "first_conv":
        return layer.node == first_conv
    if entry == "last_conv":
        return layer.node == last_conv
    return (entry == layer.node or entry == layer.module or layer.module.startswith(entry + ".")
            or entry == layer.op_type)


def quantized_nodes(layer_map: LayerMap, float_layers: tuple[str, ...]) -> set[str]:
    """Node names to quantize. Raises ConfigError for an entry that matches no layer."""
    convs = [l.node for l in layer_map.layers if l.op_type == "Conv"]
    first, last = (convs[0], convs[-1]) if convs else ("", "")
    keep_float = set()
    for entry in float_layers:
        hit = {l.node for l in layer_map.layers if _matches(entry, l, first, last)}
        if not hit:
            raise ConfigError(f"--float-layer {entry!r} matches no Conv/Gemm/MatMul layer; use a node or module "
                              f"name from layer_map.json (e.g. {layer_map.layers[0].module!r}), an op type "
                              f"(Conv, Gemm, MatMul) or {' / '.join(ALIASES)}")
        keep_float |= hit
    return {l.node for l in layer_map.layers} - keep_float


def explicit_bits(layer_map: LayerMap, layers: list[Layer], spec: dict) -> list[int]:
    """Weight widths from {entry: bits}: entries as for float layers, plus "*" for the rest;
    a more specific entry (node > module > op type > "*") wins."""
    convs = [l.node for l in layer_map.layers if l.op_type == "Conv"]
    first, last = (convs[0], convs[-1]) if convs else ("", "")
    out = []
    for layer in layers:
        hits = [(e, b) for e, b in spec.items() if e != "*" and _matches(e, layer, first, last)]
        if hits:
            out.append(int(hits[0][1]))
        elif "*" in spec:
            out.append(int(spec["*"]))
        else:
            raise ConfigError(f"no weight width for layer {layer.node}; add a '*' entry (e.g. *=4)")
    for e in spec:
        if e != "*" and not any(_matches(e, l, first, last) for l in layers):
            raise ConfigError(f"weight-bits entry {e!r} matches no quantized layer with weights")
    return out
