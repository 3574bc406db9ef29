"""Bit allocators against brute force, budgets, infeasibility, 4-bit packing."""

import itertools

import numpy as np
import pytest
from dmruntime.weights import encode, pack_int4, unpack_int4

from dmcompile.analysis.allocate import allocate, dp, lagrange
from dmcompile.budget import parse_budget
from dmcompile.errors import BudgetError


def brute(dist, cost, budget):
    best, arg = np.inf, None
    for choice in itertools.product(*[range(dist.shape[1])] * dist.shape[0]):
        c = sum(cost[l, j] for l, j in enumerate(choice))
        d = sum(dist[l, j] for l, j in enumerate(choice))
        if c <= budget and d < best:
            best, arg = d, choice
    return best, arg


def total(x, choice):
    return float(x[np.arange(len(choice)), choice].sum())


@pytest.mark.parametrize("seed", range(25))
def test_dp_matches_brute_force_and_lagrange_never_beats_it(seed):
    rng = np.random.default_rng(seed)
    L, B = rng.integers(2, 6), rng.integers(2, 5)
    cost = rng.integers(1, 20, (L, B)).astype(float)
    dist = rng.uniform(0, 10, (L, B))
    budget = float(rng.integers(cost.min(1).sum(), cost.max(1).sum() + 1))
    want, _ = brute(dist, cost, budget)
    got = dp(dist, cost, budget)
    assert total(cost, got) <= budget
    assert total(dist, got) == pytest.approx(want)
    lag = lagrange(dist, cost, budget)
    assert total(cost, lag) <= budget
    assert total(dist, lag) >= want - 1e-9


def test_dp_beats_lagrange_off_the_convex_hull():
    # Two layers; the budget 6 is met exactly by (3, 3), a point inside the hull of the total
    # curve. The Lagrangian can only reach (2, 2) at cost 4 or (4, 4) at cost 8.
    cost = np.array([[2.0, 3.0, 4.0], [2.0, 3.0, 4.0]])
    dist = np.array([[10.0, 9.0, 0.0], [10.0, 9.0, 0.0]])
    d_dp, d_lag = dp(dist, cost, 6.0), lagrange(dist, cost, 6.0)
    assert total(dist, d_dp) == 10.0  # (4, 2): 0 + 10
    assert total(dist, d_lag) == 20.0


def test_dp_with_real_valued_costs_stays_within_budget():
    rng = np.random.default_rng(0)
    cost = rng.uniform(1e5, 1e7, (40, 6))
    dist = np.sort(rng.uniform(0, 1, (40, 6)))[:, ::-1]
    budget = cost.min(1).sum() * 1.7
    choice = dp(dist, cost, budget)
    assert total(cost, choice) <= budget
    assert total(dist, choice) <= total(dist, lagrange(dist, cost, budget)) + 1e-9


def test_infeasible_budget_names_the_smallest_feasible():
    cost = np.array([[4.0, 8.0], [4.0, 8.0]])
    with pytest.raises(BudgetError, match="smallest feasible budget is 8"):
        allocate(np.zeros((2, 2)), cost, 6.0, "dp", describe=lambda v: f"{v:g}")


def test_parse_budget():
    assert parse_budget("5.0bits").kind == "bits" and parse_budget("5bits").value == 5.0
    assert parse_budget("20MB").value == 20e6 and parse_budget("1.5 KiB").value == 1536
    assert parse_budget("BOPs=1.5e9").value == 1.5e9
    for bad in ("five", "0.5bits", "BOPs", "20 parsecs"):
        with pytest.raises(BudgetError):
            parse_budget(bad)


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_int4_pack_roundtrip(n):
    q = np.random.default_rng(n).integers(-8, 8, n).astype(np.int8).reshape(n, 1)
    packed = pack_int4(q)
    assert packed.dtype == np.uint8 and packed.size == (n + 1) // 2
    assert np.array_equal(unpack_int4(packed, q.shape), q)
    with pytest.raises(ValueError, match="4-bit range"):
        pack_int4(np.array([8], np.int8))
    data, meta = encode(q, 3)
    assert meta["storage_bits"] == 4 and meta["grid_bits"] == 3 and data.nbytes == (n + 1) // 2
