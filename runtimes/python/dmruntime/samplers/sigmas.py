"""Helpers shared by the samplers: the step-count check, the multistep solvers' timesteps, and sigma = sqrt((1 - alpha_bar) / alpha_bar)
(DPM-Solver++, Euler): Karras et al.'s spacing and the inverse map from a sigma to a training
timestep, as diffusers computes them."""

from __future__ import annotations

import numpy as np

from ..errors import InputError

F32 = np.float32


def check_steps(steps, T: int, low: int = 1) -> None:
    """Refuse a step count that is not an integer in [low, T]."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not low <= steps <= T:
        raise InputError(f"steps must be an integer in [{low}, {T}], got {steps!r}")


def multistep_timesteps(spacing: str, T: int, steps: int, offset: int, last: int | None = None) -> np.ndarray:
    """The timesteps of diffusers' multistep solvers (DPM-Solver++, UniPC): ``steps + 1`` points
    with the last dropped, for the three spacings (``last``: DPM-Solver++'s clipped end)."""
    last = T if last is None else last
    if spacing == "linspace":
        return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (steps + 1)
        return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + offset
    return np.arange(last, 0, -T / steps).round().copy().astype(np.int64) - 1


def alpha_sigma_lambda(sigma: np.float32) -> tuple[np.float32, np.float32, np.float32]:
    """(alpha_t, sigma_t, log-SNR lambda) of a sigma in float32, as diffusers computes them (a
    final sigma of 0 gives lambda +inf)."""
    a = F32(1) / ((sigma**2 + F32(1)) ** F32(0.5))
    s = sigma * a
    with np.errstate(divide="ignore"):
        return a, s, np.log(a) - np.log(s)


def karras_sigmas(in_sigmas: np.ndarray, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al.'s sigmas from the schedule's largest to its smallest."""
    sigma_min, sigma_max = float(in_sigmas[-1]), float(in_sigmas[0])
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """The (fractional) training timestep of ``sigma``, by interpolating in log sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return float(((1 - w) * low + w * high).reshape(np.shape(sigma)))
