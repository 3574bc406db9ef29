"""Bit allocation under a budget: each layer picks one width, the sum of its distortions is
minimised and the sum of its costs stays within the budget (a multiple-choice knapsack).

- ``lagrange``: the paper's method. For a multiplier lam each layer independently takes
  argmin_b D(b) + lam * cost(b); lam is bisected to the cheapest that fits. It only reaches
  allocations on the lower convex hull of the total (cost, distortion) curve.
- ``dp``: exact dynamic programming over the budget discretised into ``resolution`` steps
  (costs rounded up, so a DP answer always fits the real budget), then the budget that rounding
  left is spent greedily; reaches points off the hull. :func:`allocate` returns the Lagrangian
  answer instead where it is better (rounding can cost the DP a fraction of a percent).
"""

from __future__ import annotations

import numpy as np

from ..errors import BudgetError


def lagrange(dist: np.ndarray, cost: np.ndarray, budget: float, iters: int = 100) -> np.ndarray:
    """dist, cost: [L, B] per layer and option. Returns the chosen option per layer."""
    def pick(lam):
        return np.argmin(dist + lam * cost, axis=1)

    rows = np.arange(len(dist))
    if cost[rows, pick(0.0)].sum() <= budget:
        return pick(0.0)
    lo, hi = 0.0, 1.0
    while cost[rows, pick(hi)].sum() > budget:
        hi *= 4
        if hi > 1e300:
            break
    for _ in range(iters):
        mid = (lo + hi) / 2
        if cost[rows, pick(mid)].sum() <= budget:
            hi = mid
        else:
            lo = mid
    return pick(hi)


def dp(dist: np.ndarray, cost: np.ndarray, budget: float, resolution: int = 20000) -> np.ndarray:
    """Exact multiple-choice knapsack over integer cost units. Costs are measured above each
    layer's cheapest option (so the resolution is spent on the part of the budget there is to
    choose about) in units of that free budget / ``resolution``, rounded up, so the answer
    always fits the real budget; integer costs with a free budget <= resolution are exact."""
    L, B = dist.shape
    base = cost.min(axis=1, keepdims=True)
    extra = cost - base
    free = budget - float(base.sum())
    if free < 0:
        raise BudgetError("no allocation fits the budget")
    exact = np.all(extra == np.round(extra)) and free <= resolution
    unit = 1.0 if exact or free == 0 else free / resolution
    c = np.ceil(extra / unit - 1e-9).astype(np.int64)
    cap = int(np.floor(free / unit + 1e-9))
    best = np.zeros(cap + 1)
    choice = np.zeros((L, cap + 1), np.int16)
    for layer in range(L):
        new = np.full(cap + 1, np.inf)
        for j in range(B):
            cj = c[layer, j]
            if cj > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[cj:] = best[: cap + 1 - cj] + dist[layer, j]
            better = cand < new
            new[better] = cand[better]
            choice[layer, better] = j
        best = new
    out = np.zeros(L, np.int64)
    k = cap
    for layer in range(L - 1, -1, -1):
        out[layer] = choice[layer, k]
        k -= c[layer, out[layer]]
    return _fill(dist, cost, budget, out)


def _fill(dist, cost, budget, choice) -> np.ndarray:
    """Spend what rounding left of the real budget: repeatedly take the single-layer change
    that lowers distortion most per unit of extra cost and still fits."""
    choice = choice.copy()
    rows = np.arange(len(choice))
    while True:
        left = budget - cost[rows, choice].sum()
        dc = cost - cost[rows, choice][:, None]
        dd = dist - dist[rows, choice][:, None]
        ok = (dd < 0) & (dc <= left + 1e-9)
        if not ok.any():
            return choice
        gain = np.where(ok, -dd / np.maximum(dc, 1e-30), -np.inf)
        layer, j = np.unravel_index(np.argmax(gain), gain.shape)
        choice[layer] = j


ALLOCATORS = {"lagrange": lagrange, "dp": dp}


def allocate(dist: np.ndarray, cost: np.ndarray, budget: float, allocator: str = "dp",
             fixed_cost: float = 0.0, describe=str) -> np.ndarray:
    """Choose one option per layer. ``fixed_cost`` counts against the budget whatever is
    chosen. Raises BudgetError naming the smallest feasible budget when none fits."""
    require_feasible(cost, budget, fixed_cost, describe)
    budget -= fixed_cost
    pick = ALLOCATORS[allocator](dist, cost, budget)
    if allocator == "dp":  # the discretised DP can trail the exact-budget Lagrangian by a rounding margin
        lag = lagrange(dist, cost, budget)
        rows = np.arange(len(dist))
        if dist[rows, lag].sum() < dist[rows, pick].sum():
            pick = lag
    return pick


def require_feasible(cost: np.ndarray, budget: float, fixed_cost: float = 0.0, describe=str) -> None:
    """Raise BudgetError, naming the smallest feasible budget, unless every layer at its
    cheapest option plus ``fixed_cost`` fits ``budget``."""
    least = float(cost.min(axis=1).sum()) + fixed_cost if len(cost) else fixed_cost
    if least > budget * (1 + 1e-9):
        raise BudgetError(f"budget {describe(budget)} is infeasible: the smallest feasible budget is "
                          f"{describe(least)} (every layer at its narrowest allowed width)")
