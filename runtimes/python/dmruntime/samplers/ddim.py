"""DDIM (Song et al. 2021), diffusers' ``DDIMScheduler`` arithmetic: eta = 0 deterministic,
eta > 0 stochastic, with PTQD's variance schedule calibration."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..schedule import NoiseSchedule


class DDIM:
    """DDIM over ``schedule``: ``set_timesteps(steps)``, then ``step(model_output, t, x)``."""

    init_noise_sigma = 1.0
    residual_variance = True  # step() takes PTQD's residual variance out of its noise

    def __init__(self, schedule: NoiseSchedule, eta: float = 0.0):
        if not 0 <= eta <= 1:  # also refuses nan
            raise InputError(f"eta must be in [0, 1], got {eta}: past 1 the noise DDIM adds outgrows what the step "
                             "leaves room for (the square root of a negative variance: NaN samples)")
        self.schedule = schedule
        self.eta = float(eta)
        self.timesteps = np.zeros(0, np.int64)
        self.steps = 0

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def set_timesteps(self, steps: int) -> None:
        self.timesteps = ddim_timesteps(self.schedule, steps)
        self.steps = int(steps)

    def reset(self) -> None:
        """DDIM keeps no state between steps."""

    def scale_model_input(self, sample: np.ndarray, t: int) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, t: int, sample: np.ndarray, *,
             generator: np.random.Generator | None = None, residual_var: np.ndarray | None = None) -> np.ndarray:
        if not self.steps:
            raise InputError("call set_timesteps(steps) before step()")
        noise = None
        if self.eta > 0:
            if generator is None:
                raise InputError("eta > 0 needs a random generator")
            noise = generator.standard_normal(sample.shape, dtype=np.float32)
        prev_t = int(t) - self.schedule.num_train_timesteps // self.steps
        return ddim_step(self.schedule, model_output, int(t), prev_t, sample, eta=self.eta, noise=noise,
                         residual_var=residual_var)


def ddim_timesteps(schedule: NoiseSchedule, steps: int) -> np.ndarray:
    """The descending training timesteps a ``steps``-step DDIM run visits."""
    T = schedule.num_train_timesteps
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise InputError(f"steps must be an integer in [1, {T}], got {steps!r}")
    if schedule.timestep_spacing == "leading":
        ratio = T // steps
        ts = (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + schedule.steps_offset
    elif schedule.timestep_spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    else:
        ts = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    return ts


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
