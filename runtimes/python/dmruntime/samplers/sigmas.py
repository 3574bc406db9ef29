"""Sigma schedules shared by the samplers that work in sigma = sqrt((1 - alpha_bar) / alpha_bar)
(DPM-Solver++, Euler): Karras et al.'s spacing and the inverse map from a sigma to a training
timestep, as diffusers computes them."""

from __future__ import annotations

import numpy as np


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
