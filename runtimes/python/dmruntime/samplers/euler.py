"""Euler (Karras et al. 2022, Algorithm 2 without churn), diffusers' ``EulerDiscreteScheduler``
arithmetic: the three timestep spacings, linear sigma interpolation, Karras sigmas,
``final_sigmas_type`` zero or sigma_min, epsilon / v / sample prediction.

Options come from the scheduler config with EulerDiscreteScheduler's defaults for keys it leaves
out, then from keyword arguments; exponential / beta sigmas, log-linear interpolation, explicit
sigma bounds and continuous timesteps are refused.
Its timesteps are fractional (``linspace`` does not round them): the sampling loop feeds the
engines the nearest integer timestep and steps with the exact sigma (``SamplingLoop``).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..schedule import NoiseSchedule
from . import resolve_options
from .sigmas import check_steps, karras_sigmas, sigma_to_t

DEFAULTS = {"timestep_spacing": "linspace", "steps_offset": 0, "prediction_type": "epsilon",
            "use_karras_sigmas": False, "final_sigmas_type": "zero"}
UNSUPPORTED = {"use_exponential_sigmas": False, "use_beta_sigmas": False, "timestep_type": "discrete",
               "interpolation_type": "linear", "sigma_min": None, "sigma_max": None}


# what the ancestral variant fixes (it has neither option)
UNSUPPORTED_VALUES = {"use_karras_sigmas": False, "final_sigmas_type": "zero"}


class Euler:
    """Euler over ``schedule``; ``options`` override the config's (e.g. ``use_karras_sigmas=True``)."""

    stochastic = False
    name, defaults, unsupported = "Euler", DEFAULTS, UNSUPPORTED

    def __init__(self, schedule: NoiseSchedule, **options):
        o = resolve_options(self.name, schedule, self.defaults, self.unsupported, options)
        o = {**UNSUPPORTED_VALUES, **o}
        if o["timestep_spacing"] not in ("linspace", "leading", "trailing"):
            raise InputError(f"{self.name}: unknown timestep_spacing {o['timestep_spacing']!r}")
        if o["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise InputError(f"{self.name}: final_sigmas_type must be zero or sigma_min, got "
                             f"{o['final_sigmas_type']!r}")
        self.schedule, self.options = schedule, o
        self.timesteps = np.zeros(0, np.float32)
        self.sigmas = np.zeros(0, np.float32)
        self._index = 0

    @property
    def init_noise_sigma(self) -> float:
        top = float(self.sigmas.max()) if len(self.sigmas) else 1.0
        return top if self.options["timestep_spacing"] in ("linspace", "trailing") else (top**2 + 1) ** 0.5

    def reset(self) -> None:
        self._index = 0

    def set_timesteps(self, steps: int) -> None:
        o, acp = self.options, self.schedule.alphas_cumprod
        T = self.schedule.num_train_timesteps
        check_steps(steps, T)
        if o["timestep_spacing"] == "linspace":
            ts = np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].copy()
        elif o["timestep_spacing"] == "leading":
            ts = (np.arange(0, steps) * (T // steps)).round()[::-1].copy().astype(np.float32) + o["steps_offset"]
        else:
            ts = np.arange(T, 0, -T / steps).round().copy().astype(np.float32) - 1
        sigmas = np.array(((1 - acp) / acp) ** 0.5)
        log_sigmas = np.log(sigmas)
        sigmas = np.interp(ts, np.arange(0, len(sigmas)), sigmas)
        if o["use_karras_sigmas"]:
            sigmas = karras_sigmas(sigmas, steps)
            ts = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
        last = ((1 - acp[0]) / acp[0]) ** 0.5 if o["final_sigmas_type"] == "sigma_min" else 0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.timesteps = np.asarray(ts, np.float32)
        self.reset()

    def scale_model_input(self, sample: np.ndarray, t) -> np.ndarray:
        sigma = self.sigmas[self._index]
        return (sample / ((sigma**2 + np.float32(1)) ** np.float32(0.5))).astype(np.float32, copy=False)

    def step(self, model_output: np.ndarray, t, sample: np.ndarray, *, generator: np.random.Generator | None = None,
             residual_var: np.ndarray | None = None) -> np.ndarray:
        i = self._current()
        sample = sample.astype(np.float32, copy=False)
        sigma = self.sigmas[i]
        derivative = (sample - self._x0(model_output, sample, sigma)) / sigma
        self._index += 1
        return (sample + derivative * (self.sigmas[i + 1] - sigma)).astype(np.float32, copy=False)

    def _current(self) -> int:
        """The index of the step to take; an InputError before set_timesteps or past the last."""
        if not len(self.timesteps):
            raise InputError("call set_timesteps(steps) before step()")
        if self._index >= len(self.timesteps):
            raise InputError(f"step() called {self._index + 1} times for a {len(self.timesteps)}-step run; call "
                             "set_timesteps again")
        return self._index

    def _x0(self, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32) -> np.ndarray:
        kind = self.options["prediction_type"]
        if kind == "sample":
            return model_output
        if kind == "epsilon":
            return sample - sigma * model_output
        return model_output * (-sigma / (sigma**2 + np.float32(1)) ** np.float32(0.5)) + sample / (sigma**2 + 1)
