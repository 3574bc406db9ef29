"""PNDM (Liu et al. 2022), diffusers' ``PNDMScheduler`` arithmetic: PLMS (linear multistep, orders
rising 1-4) with ``skip_prk_steps`` as Stable Diffusion 1.x folders configure it, or the original
Runge-Kutta warm-up (``skip_prk_steps`` false: 12 PRK model calls, then PLMS); the three timestep
spacings, ``steps_offset``, ``set_alpha_to_one``, epsilon / v prediction.

A ``steps``-step run makes steps + 1 model calls with ``skip_prk_steps`` (the second call repeats
the first timestep's neighbour, as diffusers does) and steps + 9 without.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..schedule import NoiseSchedule
from . import resolve_options

DEFAULTS = {"skip_prk_steps": False, "set_alpha_to_one": False, "prediction_type": "epsilon",
            "timestep_spacing": "leading", "steps_offset": 0}
F32 = np.float32


class PNDM:
    """PNDM over ``schedule``; ``options`` override the config's (e.g. ``skip_prk_steps=True``)."""

    defaults = DEFAULTS  # its options and their defaults (sampler_for reads use_karras_sigmas here)

    init_noise_sigma = 1.0
    stochastic = False

    def __init__(self, schedule: NoiseSchedule, **options):
        o = resolve_options("PNDM", schedule, DEFAULTS, {}, options)
        if o["prediction_type"] not in ("epsilon", "v_prediction"):
            raise InputError(f"PNDM takes epsilon or v_prediction models, not {o['prediction_type']!r} (nor does "
                             "diffusers'); choose ddim, euler or dpmpp-2m")
        if o["timestep_spacing"] not in ("linspace", "leading", "trailing"):
            raise InputError(f"PNDM: unknown timestep_spacing {o['timestep_spacing']!r}")
        self.schedule, self.options = schedule, o
        acp = schedule.alphas_cumprod
        self.final_alpha = F32(1) if o["set_alpha_to_one"] else acp[0]
        self.timesteps = np.zeros(0, np.int64)
        self.steps = 0
        self.reset()

    @property
    def min_steps(self) -> int:
        """The fewest steps a run can take (the Runge-Kutta warm-up needs four)."""
        return 1 if self.options["skip_prk_steps"] else 4

    def reset(self) -> None:
        self._ets: list[np.ndarray] = []
        self._counter = 0
        self._cur_output = None
        self._cur_sample = None

    def set_timesteps(self, steps: int) -> None:
        o, T = self.options, self.schedule.num_train_timesteps
        if not isinstance(steps, (int, np.integer)) or not self.min_steps <= steps <= T:
            raise InputError(f"PNDM takes an integer number of steps in [{self.min_steps}, {T}]"
                             f"{'' if o['skip_prk_steps'] else ' without skip_prk_steps (its Runge-Kutta warm-up spans 4)'}"
                             f", got {steps!r}")
        if o["timestep_spacing"] == "linspace":
            base = np.linspace(0, T - 1, steps).round().astype(np.int64)
        elif o["timestep_spacing"] == "leading":
            base = (np.arange(0, steps) * (T // steps)).round().astype(np.int64) + o["steps_offset"]
        else:
            base = np.round(np.arange(T, 0, -T / steps))[::-1].astype(np.int64) - 1
        if o["skip_prk_steps"]:
            self._prk = np.zeros(0, np.int64)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        else:
            half = T // steps // 2
            prk = np.array(base[-4:]).repeat(2) + np.tile(np.array([0, half]), 4)
            self._prk = prk[:-1].repeat(2)[1:-1][::-1].copy()
            plms = base[:-3][::-1].copy()
        self.timesteps = np.concatenate([self._prk, plms]).astype(np.int64)
        self.steps = int(steps)
        self.reset()

    def scale_model_input(self, sample: np.ndarray, t) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, t, sample: np.ndarray, *, generator: np.random.Generator | None = None,
             residual_var: np.ndarray | None = None) -> np.ndarray:
        if not self.steps:
            raise InputError("call set_timesteps(steps) before step()")
        sample = sample.astype(F32, copy=False)
        if self._counter < len(self._prk):
            prev = self._step_prk(model_output, int(t), sample)
        else:
            prev = self._step_plms(model_output, int(t), sample)
        self._counter += 1
        return prev.astype(F32, copy=False)

    def _step_prk(self, out, t, sample):
        c = self._counter
        prev_t = t - (0 if c % 2 else self.schedule.num_train_timesteps // self.steps // 2)
        t = int(self._prk[c // 4 * 4])
        if c % 4 == 0:
            self._cur_output = F32(1 / 6) * out
            self._ets.append(out)
            self._cur_sample = sample
        elif c % 4 in (1, 2):
            self._cur_output = self._cur_output + F32(1 / 3) * out
        else:
            out = self._cur_output + F32(1 / 6) * out
            self._cur_output = None
        return self._prev_sample(self._cur_sample, t, prev_t, out)

    def _step_plms(self, out, t, sample):
        ratio = self.schedule.num_train_timesteps // self.steps
        prev_t = t - ratio
        if self._counter != 1:
            self._ets = self._ets[-3:] + [out]
        else:
            prev_t, t = t, t + ratio
        e = self._ets
        if len(e) == 1 and self._counter == 0:
            self._cur_sample = sample
        elif len(e) == 1 and self._counter == 1:
            out = (out + e[-1]) / F32(2)
            sample, self._cur_sample = self._cur_sample, None
        elif len(e) == 2:
            out = (F32(3) * e[-1] - e[-2]) / F32(2)
        elif len(e) == 3:
            out = (F32(23) * e[-1] - F32(16) * e[-2] + F32(5) * e[-3]) / F32(12)
        else:
            out = F32(1 / 24) * (F32(55) * e[-1] - F32(59) * e[-2] + F32(37) * e[-3] - F32(9) * e[-4])
        return self._prev_sample(sample, t, prev_t, out)

    def _prev_sample(self, sample, t, prev_t, out):
        acp = self.schedule.alphas_cumprod
        a_t = acp[t]
        a_prev = acp[prev_t] if prev_t >= 0 else self.final_alpha
        b_t, b_prev = F32(1) - a_t, F32(1) - a_prev
        if self.options["prediction_type"] == "v_prediction":
            out = a_t ** F32(0.5) * out + b_t ** F32(0.5) * sample
        denom = a_t * b_prev ** F32(0.5) + (a_t * b_t * a_prev) ** F32(0.5)
        return (a_prev / a_t) ** F32(0.5) * sample - (a_prev - a_t) * out / denom
