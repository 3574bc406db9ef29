"""From curves and a budget to bits per layer per group; costs and BOPs accounting."""

from __future__ import annotations

import numpy as np
from dmruntime.weights import storage_bits

from ..errors import BudgetError, ConfigError
from ..frontend.layermap import Layer
from ..lowering.qdq import weight_axis
from .allocate import Budget, allocate


def weight_bytes(layer: Layer, bits: int) -> int:
    """Bytes a quantized weight takes on disk: packed values plus one fp32 scale per channel."""
    channels = layer.weight_shape[weight_axis(layer)]
    return -(-layer.params * storage_bits(bits) // 8) + 4 * channels


def option_costs(layers: list[Layer], bits: tuple[int, ...], kind: str, act_bits: int = 8) -> np.ndarray:
    """[L, len(bits)] cost of each width for each weighted layer under a budget kind."""
    if kind == "bits":
        return np.array([[b * l.params for b in bits] for l in layers], np.float64)
    if kind == "bytes":
        return np.array([[weight_bytes(l, b) for b in bits] for l in layers], np.float64)
    return np.array([[l.macs * b * act_bits for b in bits] for l in layers], np.float64)


def bops(layer: Layer, weight_bits: int | None, act_bits: int | None) -> int:
    """MACs x weight bits x activation bits; a float operand counts 32 bits, an activation x
    activation MatMul counts its two activation widths."""
    return layer.macs * (weight_bits or (act_bits if layer.weight is None else None) or 32) * (act_bits or 32)


def budget_total(budget: Budget, layers: list[Layer]) -> float:
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


def plan_bits(dist: np.ndarray, layers: list[Layer], curve_bits: tuple[int, ...], allowed: tuple[int, ...],
              budget: Budget, allocator: str, share: bool, fixed_bops: float = 0.0, act_bits: int = 8):
    """dist: [G, L, len(curve_bits)] distortions of ``layers``. Returns (bits [G, L], info)."""
    cols = [curve_bits.index(b) for b in allowed if b in curve_bits]
    missing = [b for b in allowed if b not in curve_bits]
    if missing:
        raise ConfigError(f"the curves have no points at {missing} bits; analyze with those weight bits")
    opts = tuple(curve_bits[c] for c in cols)
    d = dist[:, :, cols]
    cost = option_costs(layers, opts, budget.kind, act_bits)
    total = budget_total(budget, layers)
    fixed = fixed_bops if budget.kind == "bops" else 0.0
    fmt = describe(budget, layers)
    G = d.shape[0]
    if share:
        pick = allocate(d.sum(0), cost, total, allocator, fixed, fmt)
        picks = np.tile(pick, (G, 1))
    else:
        picks = np.stack([allocate(d[g], cost, total, allocator, fixed, fmt) for g in range(G)])
    bits = np.array(opts)[picks]
    rows = np.arange(len(layers))
    spent = [float(cost[rows, picks[g]].sum() + fixed) for g in range(G)]
    info = {"budget": str(budget), "budget_value": total + 0.0, "allocator": allocator, "share_weights": share,
            "allowed_bits": list(opts), "spent": spent, "spent_readable": [fmt(s) for s in spent],
            "predicted_distortion": [float(d[g, rows, picks[g]].sum()) for g in range(G)]}
    return bits, info


def check_feasible(layers: list[Layer], allowed: tuple[int, ...], budget: Budget, fixed_bops: float = 0.0,
                   act_bits: int = 8) -> None:
    """Raise BudgetError (naming the smallest feasible budget) before any curve is measured."""
    cost = option_costs(layers, tuple(allowed), budget.kind, act_bits)
    fixed = fixed_bops if budget.kind == "bops" else 0.0
    least = cost.min(axis=1).sum() + fixed
    if least > budget_total(budget, layers) * (1 + 1e-9):
        fmt = describe(budget, layers)
        raise BudgetError(f"budget {fmt(budget_total(budget, layers))} is infeasible: the smallest feasible budget "
                          f"is {fmt(least)} (every layer at its narrowest allowed width)")


def check_bits(bits: set[int], deployable: tuple[int, ...], allow_simulated: bool) -> None:
    bad = sorted(b for b in bits if b not in deployable)
    if bad and not allow_simulated:
        raise BudgetError(f"weight widths {bad} have no native storage on this target (it stores "
                          f"{list(deployable)} bits); pass --allow-simulated-bits to keep them in wider containers "
                          "with the narrower grid, or choose other widths")
