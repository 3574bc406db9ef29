"""DDPM ancestral sampling (Ho et al. 2020), diffusers' ``DDPMScheduler`` arithmetic: any number of
steps over the three timestep spacings (``steps_offset``), epsilon / v / sample prediction,
``clip_sample`` (``clip_sample_range``), and the fixed variances ``fixed_small`` (also as
``fixed_small_log``) and ``fixed_large``; learned variances (the model's extra output channels)
and ``fixed_large_log`` are refused.

Stochastic: every step but the last adds noise, so PTQD's residual variance comes out of it.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..schedule import NoiseSchedule
from . import resolve_options
from .sigmas import check_steps

DEFAULTS = {"timestep_spacing": "leading", "steps_offset": 0, "prediction_type": "epsilon", "clip_sample": True,
            "clip_sample_range": 1.0, "variance_type": "fixed_small"}
UNSUPPORTED = {"thresholding": False}
VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")
F32 = np.float32


class DDPM:
    """DDPM over ``schedule``; ``options`` override the config's (e.g. ``variance_type="fixed_large"``)."""

    defaults = DEFAULTS  # its options and their defaults (sampler_for reads use_karras_sigmas here)

    init_noise_sigma = 1.0
    stochastic = True
    residual_variance = True  # step() takes PTQD's residual variance out of its noise

    def __init__(self, schedule: NoiseSchedule, **options):
        o = resolve_options("DDPM", schedule, DEFAULTS, UNSUPPORTED, options)
        if o["variance_type"] not in VARIANCES:
            raise InputError(f"DDPM: variance_type {o['variance_type']!r} is not implemented in dmruntime (learned "
                             f"variances need the model's extra channels); use one of {', '.join(VARIANCES)}")
        if o["timestep_spacing"] not in ("linspace", "leading", "trailing"):
            raise InputError(f"DDPM: unknown timestep_spacing {o['timestep_spacing']!r}")
        self.schedule, self.options = schedule, o
        self.timesteps = np.zeros(0, np.int64)

    def reset(self) -> None:
        """DDPM keeps no state between steps."""

    def set_timesteps(self, steps: int) -> None:
        o, T = self.options, self.schedule.num_train_timesteps
        check_steps(steps, T)
        if o["timestep_spacing"] == "linspace":
            ts = np.linspace(0, T - 1, steps).round()[::-1].copy().astype(np.int64)
        elif o["timestep_spacing"] == "leading":
            ts = (np.arange(0, steps) * (T // steps)).round()[::-1].copy().astype(np.int64) + o["steps_offset"]
        else:
            ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
        self.timesteps = ts

    def scale_model_input(self, sample: np.ndarray, t) -> np.ndarray:
        return sample

    def _prev(self, t: int) -> int:
        where = np.flatnonzero(self.timesteps == t)
        if not len(where):
            raise InputError(f"t = {t} is not a timestep of this {len(self.timesteps)}-step run")
        i = int(where[0])
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def coefficients(self, t: int) -> dict:
        """The step's float32 coefficients: x0 and x_t weights of the mean, the standard
        deviation of the noise it adds, and the schedule values behind them."""
        acp = self.schedule.alphas_cumprod
        a_t = acp[t]
        a_prev = acp[self._prev(t)] if self._prev(t) >= 0 else F32(1)
        b_t, b_prev = F32(1) - a_t, F32(1) - a_prev
        cur_a = a_t / a_prev
        cur_b = F32(1) - cur_a
        var = np.maximum(b_prev / b_t * cur_b, F32(1e-20))
        std = (cur_b if self.options["variance_type"] == "fixed_large" else var) ** F32(0.5)
        return {"a_t": a_t, "b_t": b_t, "c_x0": a_prev ** F32(0.5) * cur_b / b_t,
                "c_xt": cur_a ** F32(0.5) * b_prev / b_t, "std": std if t > 0 else F32(0)}

    def step(self, model_output: np.ndarray, t, sample: np.ndarray, *, generator: np.random.Generator | None = None,
             residual_var: np.ndarray | None = None, noise: np.ndarray | None = None) -> np.ndarray:
        """x at the next timestep. ``residual_var`` (PTQD): variance of a noise in an epsilon model
        output; the part the mean carries comes out of the added variance, clamped at zero."""
        if not len(self.timesteps):
            raise InputError("call set_timesteps(steps) before step()")
        t = int(t)
        c = self.coefficients(t)
        kind = self.options["prediction_type"]
        if kind == "epsilon":
            x0 = (sample - c["b_t"] ** F32(0.5) * model_output) / c["a_t"] ** F32(0.5)
        elif kind == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = c["a_t"] ** F32(0.5) * sample - c["b_t"] ** F32(0.5) * model_output
        clipped = self.options["clip_sample"]
        if clipped:
            r = self.options["clip_sample_range"]
            x0 = np.clip(x0, -r, r)
        prev = c["c_x0"] * x0 + c["c_xt"] * sample
        if t > 0:
            if noise is None:
                if generator is None:
                    raise InputError("DDPM needs a random generator")
                noise = generator.standard_normal(sample.shape, dtype=F32)
            std = c["std"]
            if residual_var is not None and kind == "epsilon":
                # eps reaches prev through x0: -c_x0 * sqrt(b_t) / sqrt(a_t)
                c_eps = c["c_x0"] * c["b_t"] ** F32(0.5) / c["a_t"] ** F32(0.5)
                std = np.sqrt(np.maximum(std**2 - c_eps**2 * residual_var, 0)).astype(F32)
            prev = prev + std * noise
        return prev.astype(F32, copy=False)
