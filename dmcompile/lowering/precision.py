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
