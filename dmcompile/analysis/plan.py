"""From curves and a budget to bits per layer per group; costs and BOPs accounting."""

from __future__ import annotations

import numpy as np

from ..budget import Budget
from ..errors import BudgetError, ConfigError
from ..frontend.layermap import Layer
from ..quant import FLOAT_BITS, storage_bits, weight_axis
from .allocate import allocate, require_feasible




def weight_bytes(layer: Layer, bits: int, storage=storage_bits) -> int:
    """Bytes a quantized weight takes on disk: values at ``storage(bits)`` bits each (the target
    profile's; default: 4-bit packed) plus one fp32 scale per channel; float: 4 per weight."""
    if bits == FLOAT_BITS:
        return 4 * layer.params
    channels = layer.weight_shape[weight_axis(layer)]
    stored = storage(bits, layer.op_type) if storage is not storage_bits else storage(bits)
    return -(-layer.params * stored // 8) + 4 * channels


def option_costs(layers: list[Layer], bits: tuple[int, ...], kind: str, act_bits: int = 8,
                 storage=storage_bits) -> np.ndarray:
    """[L, len(bits)] cost of each width for each weighted layer under a budget kind."""
    if kind == "bits":
        rows = [[b * l.params for b in bits] for l in layers]
    elif kind == "bytes":
        rows = [[weight_bytes(l, b, storage) for b in bits] for l in layers]
    else:  # a float layer multiplies float32 weights by float32 activations
        rows = [[l.macs * (b * act_bits if b != FLOAT_BITS else FLOAT_BITS * FLOAT_BITS) for b in bits]
                for l in layers]
    return np.array(rows, np.float64).reshape(len(layers), len(bits))  # reshape: no layers is [0, B]


def bops(layer: Layer, weight_bits: int | None, act_bits: int | None) -> int:
    """MACs x weight bits x activation bits; a float operand counts 32 bits, an activation x
    activation MatMul counts its two activation widths."""
    return layer.macs * (weight_bits or (act_bits if layer.weight is None else None) or 32) * (act_bits or 32)


def budget_total(budget: Budget, layers: list[Layer]) -> float:
    """The budget in cost units; an average-bits budget is over all ``layers``."""
    if budget.kind == "bits":
        return budget.value * sum(l.params for l in layers)
    return budget.value


def describe(budget: Budget, layers: list[Layer]):
    n = sum(l.params for l in layers)
    if budget.kind == "bits":
        return lambda v: f"{v / n:.3f} average weight bits"
    if budget.kind == "bytes":
        return lambda v: f"{v / 1e6:.4f} MB of weights"
    return lambda v: f"BOPs={v:.4g}"


def fixed_cost(budget: Budget, layers: list[Layer], pinned: dict[int, int], fixed_bops: float = 0.0,
               act_bits: int = 8, storage=storage_bits) -> float:
    """What the budget spends whatever the allocator picks: pinned layers at their widths
    (``pinned``: index into ``layers`` -> bits) and, for BOPs, the layers without weights."""
    pin = sum(float(option_costs([layers[i]], (b,), budget.kind, act_bits, storage)[0, 0]) for i, b in pinned.items())
    return pin + (fixed_bops if budget.kind == "bops" else 0.0)


def check_feasible(layers: list[Layer], allowed: tuple[int, ...], budget: Budget, fixed_bops: float = 0.0,
                   act_bits: int = 8, pinned: dict[int, int] | None = None, storage=storage_bits) -> None:
    """Raise BudgetError (naming the smallest feasible budget) before any curve is measured."""
    pinned = pinned or {}
    free = [l for i, l in enumerate(layers) if i not in pinned]
    require_feasible(option_costs(free, tuple(allowed), budget.kind, act_bits, storage), budget_total(budget, layers),
                     fixed_cost(budget, layers, pinned, fixed_bops, act_bits, storage), describe(budget, layers))


def plan_bits(dist: np.ndarray, layers: list[Layer], curve_bits: tuple[int, ...], allowed: tuple[int, ...],
              budget: Budget, allocator: str, *, share: bool, fixed_bops: float = 0.0, act_bits: int = 8,
              pinned: dict[int, int] | None = None, storage=storage_bits, allow_float: bool = False,
              group_weights=None):
    """dist: [G, L, len(curve_bits)] distortions of ``layers``; ``pinned``: layer index -> bits
    fixed by an override (spent from the budget, not allocated); ``storage``: bits on disk per
    width (bytes budgets). ``allow_float``: keeping a layer in float (``FLOAT_BITS``, no weight
    distortion, float32 cost) is one more option; then per-group plans (``share`` False) are
    allocated jointly: one knapsack over every (group, layer), distortions and costs weighted by
    ``group_weights`` (each group's share of the sampling steps), so the budget bounds the
    step-weighted average over groups and a group that needs float takes it from groups that do
    not. Returns (bits [G, L], info)."""
    pinned = pinned or {}
    cols = [curve_bits.index(b) for b in allowed if b in curve_bits]
    missing = [b for b in allowed if b not in curve_bits]
    if missing:
        raise ConfigError(f"the curves have no points at {missing} bits; analyze with those weight bits")
    opts = tuple(curve_bits[c] for c in cols)
    free = [i for i in range(len(layers)) if i not in pinned]
    d = dist[:, free][:, :, cols]
    if allow_float:
        opts += (FLOAT_BITS,)
        d = np.concatenate([d, np.zeros(d.shape[:2] + (1,))], axis=2)
    cost = option_costs([layers[i] for i in free], opts, budget.kind, act_bits, storage)
    total = budget_total(budget, layers)
    fixed = fixed_cost(budget, layers, pinned, fixed_bops, act_bits, storage)
    fmt = describe(budget, layers)
    G = d.shape[0]
    joint = allow_float and not share
    if share:
        pick = allocate(d.sum(0), cost, total, allocator, fixed, fmt)
        picks = np.tile(pick, (G, 1))
    elif joint:
        w = np.asarray(group_weights if group_weights is not None else np.full(G, 1.0 / G), np.float64)
        w = w / w.sum()
        flat = allocate((d * w[:, None, None]).reshape(G * len(free), -1),
                        (cost[None] * w[:, None, None]).reshape(G * len(free), -1), total, allocator, fixed, fmt)
        picks = flat.reshape(G, len(free))
    else:
        picks = np.stack([allocate(d[g], cost, total, allocator, fixed, fmt) for g in range(G)])
    bits = np.zeros((G, len(layers)), np.int64)
    bits[:, free] = np.array(opts)[picks]
    for i, b in pinned.items():
        bits[:, i] = b
    rows = np.arange(len(free))
    spent = [float(cost[rows, picks[g]].sum() + fixed) for g in range(G)]
    # predicted: sum of the curves at the chosen widths (float adds 0; so does a pinned width the
    # curves lack)
    predicted = [float(sum(dist[g, i, curve_bits.index(int(bits[g, i]))] for i in range(len(layers))
                           if int(bits[g, i]) in curve_bits)) for g in range(G)]
    info = {"budget": str(budget), "budget_value": total + 0.0, "allocator": allocator, "share_weights": share,
            "allowed_bits": list(opts), "pinned": {layers[i].node: int(b) for i, b in pinned.items()},
            "spent": spent, "spent_readable": [fmt(s) for s in spent], "predicted_distortion": predicted}
    if allow_float:
        info["float"] = [[layers[i].node for i in range(len(layers)) if bits[g, i] == FLOAT_BITS] for g in range(G)]
    if joint:
        info["joint"] = True
        info["spent_step_weighted"] = float(np.dot(w, spent))
    return bits, info


def check_bits(bits: set[int], deployable: tuple[int, ...], *, allow_simulated: bool) -> None:
    """Raise BudgetError for widths the target cannot store unless simulated widths are allowed."""
    bad = sorted(b for b in bits if b not in deployable and b != FLOAT_BITS)
    if bad and not allow_simulated:
        raise BudgetError(f"weight widths {bad} have no native storage on this target (it stores "
                          f"{list(deployable)} bits); pass --allow-simulated-bits to keep them in wider containers "
                          "with the narrower grid, or choose other widths")
