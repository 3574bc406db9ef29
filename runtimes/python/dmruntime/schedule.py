"""Noise schedules and the DDIM update.

Follows diffusers' ``DDIMScheduler`` arithmetic (float32 schedule, ``leading`` /
``trailing`` / ``linspace`` timestep spacing, ``set_alpha_to_one``, ``clip_sample``) so
that a bundle samples the same trajectories as the PyTorch pipeline it came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError

# DDIMScheduler's defaults for keys a scheduler config (often a DDPMScheduler's) leaves out.
DDIM_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "thresholding": False,
}


def _betas(cfg: dict) -> np.ndarray:
    n = int(cfg["num_train_timesteps"])
    kind = cfg["beta_schedule"]
    if cfg.get("trained_betas") is not None:
        return np.asarray(cfg["trained_betas"], dtype=np.float32)
    if kind == "linear":
        return np.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=np.float32)
    if kind == "scaled_linear":
        return (np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=np.float32) ** 2).astype(np.float32)
    if kind == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        b = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return np.asarray(b, dtype=np.float32)
    raise InputError(f"unsupported beta_schedule {kind!r}: use linear, scaled_linear or squaredcos_cap_v2")


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete diffusion schedule read from a diffusers scheduler config."""

    alphas_cumprod: np.ndarray  # float32 [T]
    final_alpha_cumprod: float
    clip_sample: bool
    clip_sample_range: float
    steps_offset: int
    timestep_spacing: str
    prediction_type: str

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_config(cls, config: dict) -> NoiseSchedule:
        cfg = {**DDIM_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
        if cfg["thresholding"]:
            raise InputError("dynamic thresholding is not supported; set thresholding=false in the scheduler config")
        if cfg["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
            raise InputError(f"unknown prediction_type {cfg['prediction_type']!r}")
        if cfg["timestep_spacing"] not in ("leading", "trailing", "linspace"):
            raise InputError(f"unknown timestep_spacing {cfg['timestep_spacing']!r}")
        acp = np.cumprod(1.0 - _betas(cfg), dtype=np.float32)
        final = 1.0 if cfg["set_alpha_to_one"] else float(acp[0])
        return cls(acp, final, bool(cfg["clip_sample"]), float(cfg["clip_sample_range"]),
                   int(cfg["steps_offset"]), cfg["timestep_spacing"], cfg["prediction_type"])

    def ddim_timesteps(self, steps: int) -> np.ndarray:
        """The descending training timesteps a ``steps``-step DDIM run visits."""
        T = self.num_train_timesteps
        if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
            raise InputError(f"steps must be an integer in [1, {T}], got {steps!r}")
        if self.timestep_spacing == "leading":
            ratio = T // steps
            ts = (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + self.steps_offset
        elif self.timestep_spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
        else:
            ts = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
        return ts

    def alpha(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod


def ddim_step(schedule: NoiseSchedule, model_output: np.ndarray, t: int, prev_t: int, x: np.ndarray,
              eta: float = 0.0, noise: np.ndarray | None = None, residual_var: np.ndarray | None = None) -> np.ndarray:
    """One DDIM update x_t -> x_{prev_t} (Song et al. 2021, eq. 12), diffusers' arithmetic.

    ``noise`` (standard normal, shape of ``x``) is required when ``eta > 0``.
    ``residual_var``: variance of a noise already in ``model_output`` (epsilon prediction):
    the part it carries into x_{prev_t} is taken out of the added noise, clamped at zero
    (PTQD's variance schedule calibration).
    """
    a_t = np.float32(schedule.alpha(t))
    a_prev = np.float32(schedule.alpha(prev_t))
    b_t = np.float32(1.0) - a_t
    if schedule.prediction_type == "epsilon":
        eps = model_output
        x0 = (x - np.sqrt(b_t) * eps) / np.sqrt(a_t)
    elif schedule.prediction_type == "sample":
        x0 = model_output
        eps = (x - np.sqrt(a_t) * x0) / np.sqrt(b_t)
    else:  # v_prediction
        x0 = np.sqrt(a_t) * x - np.sqrt(b_t) * model_output
        eps = np.sqrt(a_t) * model_output + np.sqrt(b_t) * x
    if schedule.clip_sample:
        r = schedule.clip_sample_range
        x0 = np.clip(x0, -r, r)
    variance = (np.float32(1.0) - a_prev) / b_t * (np.float32(1.0) - a_t / a_prev)
    std = np.float32(eta) * np.sqrt(variance)
    direction = np.sqrt(np.float32(1.0) - a_prev - std**2) * eps
    prev = np.sqrt(a_prev) * x0 + direction
    if eta > 0:
        if noise is None:
            raise InputError("ddim_step with eta > 0 needs a noise array")
        add = std
        if residual_var is not None and schedule.prediction_type == "epsilon":
            # coefficient of eps in prev: the direction term minus what x0 takes away
            c_eps = np.sqrt(np.float32(1.0) - a_prev - std**2) - np.sqrt(a_prev) * np.sqrt(b_t) / np.sqrt(a_t)
            add = np.sqrt(np.maximum(std**2 - c_eps**2 * residual_var, 0)).astype(np.float32)
        prev = prev + add * noise
    return prev.astype(np.float32, copy=False)
