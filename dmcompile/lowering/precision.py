"""Per-layer precision: the one place overrides are resolved against a layer map.

A rule's pattern matches a layer by node name (or the aliases ``first_conv`` / ``last_conv``),
by torch module name, by module prefix, by ``attention_matmuls`` (the MatMuls of two activations:
attention's Q.K^T and attention.V), by op type, or ``*``. When several rules match a layer the
most specific wins, whatever their order: node > module > module prefix (the longer prefix
first) > ``attention_matmuls`` > op type > ``*``; two different rules equally specific for one
layer are an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Override
from ..errors import ConfigError
from ..frontend.layermap import Layer, LayerMap

ALIASES = ("first_conv", "last_conv")
ATTENTION_MATMULS = "attention_matmuls"  # MatMuls with no weight: both inputs are activations


def _aliases(layer_map: LayerMap) -> dict[str, str]:
    convs = [l.node for l in layer_map.layers if l.op_type == "Conv"]
    return {"first_conv": convs[0], "last_conv": convs[-1]} if convs else {}


def specificity(pattern: str, layer: Layer, aliases: dict[str, str]) -> tuple[int, int] | None:
    """How specifically ``pattern`` names ``layer`` (higher wins), or None if it does not."""
    if pattern in ALIASES:
        return (4, 0) if aliases.get(pattern) == layer.node else None
    if pattern == layer.node:
        return (4, 0)
    if pattern == layer.module:
        return (3, 0)
    if layer.module.startswith(pattern + "."):
        return (2, len(pattern))
    if pattern == ATTENTION_MATMULS:
        return (1, 1) if layer.op_type == "MatMul" and not layer.weight else None
    if pattern == layer.op_type:
        return (1, 0)
    if pattern == "*":
        return (0, 0)
    return None


@dataclass(frozen=True)
class LayerPrecision:
    """Resolved precision of every layer of a layer map: which nodes are quantized, and the
    weight width a rule pins for a weighted layer (absent: the recipe decides)."""

    quantized: frozenset[str]
    pinned_bits: dict  # node -> bits, for quantized layers with weights that a rule names

    def weight_layers(self, layer_map: LayerMap) -> list[Layer]:
        """The quantized layers with weights, in graph order."""
        return [l for l in layer_map.layers if l.node in self.quantized and l.weight]


def resolve(layer_map: LayerMap, overrides: tuple[Override, ...], profile=None,
            default_float: tuple[str, ...] = ()) -> LayerPrecision:
    """Apply ``overrides`` to every layer. Raises ConfigError for a rule that matches no layer
    and for two different rules that name a layer equally specifically. With a target
    ``profile``, layers it does not quantize (``TargetProfile.quantizes``) stay float, and so do
    layers in ``default_float`` modules (a component of the module path is one of them) unless a
    rule names the layer, its module or a module prefix."""
    aliases = _aliases(layer_map)
    used: set[str] = set()
    quantized, pinned = set(), {}
    for layer in layer_map.layers:
        best, winner = None, None
        for o in overrides:
            s = specificity(o.pattern, layer, aliases)
            if s is None:
                continue
            used.add(o.pattern)
            if best is None or s > best:
                best, winner = s, o
            elif s == best and o.precision != winner.precision:
                raise ConfigError(f"overrides {winner} and {o} name layer {layer.node} equally specifically; "
                                  "keep one, or name the layer itself")
        if (winner is not None and winner.precision == "float") or (profile and not profile.quantizes(layer)):
            continue
        if profile and (best is None or best < (2, 0)) and set(layer.module.split(".")) & set(default_float):
            continue  # the target keeps it float unless a rule names the layer, its module or a prefix
        quantized.add(layer.node)
        if winner is not None and layer.weight:
            pinned[layer.node] = int(winner.precision)
    unused = [str(o) for o in overrides if o.pattern not in used]
    if unused:
        example = layer_map.layers[0].module if layer_map.layers else "conv_in"
        raise ConfigError(f"override {unused[0]} matches no Conv/Gemm/MatMul layer; use a node or module name "
                          f"from layer_map.json (e.g. {example!r}), a module prefix, an op type (Conv, Gemm, "
                          f"MatMul), {' / '.join(ALIASES)}, {ATTENTION_MATMULS} (if the model has attention) or *")
    return LayerPrecision(frozenset(quantized), pinned)

