"""DPM-Solver++ multistep (Lu et al. 2022), diffusers' ``DPMSolverMultistepScheduler`` arithmetic:
orders 1-3, ``dpmsolver++`` (deterministic) and ``sde-dpmsolver++`` (stochastic), midpoint or
Heun second-order updates, Karras sigmas, ``lower_order_final`` / ``euler_at_final``,
``final_sigmas_type`` zero or sigma_min, ``lambda_min_clipped``, and the three timestep spacings.

Its options come from the scheduler config with DPMSolverMultistepScheduler's defaults for keys the
config leaves out (a DDIM or PNDM config gives its betas, spacing and prediction type; the solver
keeps its own defaults for the rest), then from the keyword arguments. Options diffusers has and
this runtime does not (exponential / beta / Lu sigmas, flow sigmas, thresholding, learned
variance, the deprecated ``dpmsolver`` algorithms) are an InputError naming them.

The timesteps are integers (Karras timesteps are rounded, as diffusers does except for the cosine
schedule, which is refused with Karras sigmas), so bundles run them as they are. PTQD's residual
variance is not taken out of the SDE variant's noise (the model-output correction applies).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..schedule import NoiseSchedule
from . import resolve_options
from .sigmas import alpha_sigma_lambda, check_steps, karras_sigmas, multistep_timesteps, sigma_to_t

DEFAULTS = {
    "solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
    "euler_at_final": False, "use_karras_sigmas": False, "final_sigmas_type": "zero",
    "lambda_min_clipped": -float("inf"), "timestep_spacing": "linspace", "steps_offset": 0,
    "prediction_type": "epsilon",
}
# options diffusers' DPMSolverMultistepScheduler has, with the value this runtime implements
UNSUPPORTED = {"use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
               "use_flow_sigmas": False, "use_dynamic_shifting": False, "thresholding": False,
               # a DDPM config's fixed variances mean nothing to the solver (diffusers ignores them); learned ones do
               "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")}
F32 = np.float32


class DPMSolverPP:
    """DPM-Solver++ multistep over ``schedule``; ``options`` override the config's (e.g.
    ``solver_order=3``, ``use_karras_sigmas=True``, ``algorithm_type="sde-dpmsolver++"``)."""

    defaults = DEFAULTS  # its options and their defaults (sampler_for reads use_karras_sigmas here)

    init_noise_sigma = 1.0
    preset: dict = {}

    def __init__(self, schedule: NoiseSchedule, **options):
        cfg = schedule.config
        o = resolve_options("DPM-Solver++", schedule, DEFAULTS, UNSUPPORTED, options, self.preset)
        if o["solver_order"] not in (1, 2, 3):
            raise InputError(f"DPM-Solver++: solver_order must be 1, 2 or 3, got {o['solver_order']!r}")
        if o["algorithm_type"] not in ("dpmsolver++", "sde-dpmsolver++"):
            raise InputError(f"DPM-Solver++: algorithm_type {o['algorithm_type']!r} is not implemented; use "
                             "dpmsolver++ or sde-dpmsolver++")
        if o["solver_type"] not in ("midpoint", "heun"):
            raise InputError(f"DPM-Solver++: solver_type must be midpoint or heun, got {o['solver_type']!r}")
        if o["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise InputError(f"DPM-Solver++: final_sigmas_type must be zero or sigma_min, got {o['final_sigmas_type']!r}")
        if o["timestep_spacing"] not in ("linspace", "leading", "trailing"):
            raise InputError(f"DPM-Solver++: unknown timestep_spacing {o['timestep_spacing']!r}")
        if o["use_karras_sigmas"] and cfg.get("beta_schedule") == "squaredcos_cap_v2":
            raise InputError("DPM-Solver++ with Karras sigmas on the cosine schedule has fractional timesteps, which "
                             "bundles do not take; turn use_karras_sigmas off")
        self.schedule, self.options = schedule, o
        self.timesteps = np.zeros(0, np.int64)
        self.sigmas = np.zeros(0, F32)
        self.reset()

    @property
    def stochastic(self) -> bool:
        return self.options["algorithm_type"] == "sde-dpmsolver++"

    def reset(self) -> None:
        """Forget the multistep history (a new run from x_T)."""
        self._outputs: list[np.ndarray | None] = [None] * self.options["solver_order"]
        self._lower_order_nums = 0
        self._index = 0

    def set_timesteps(self, steps: int) -> None:
        o, acp = self.options, self.schedule.alphas_cumprod
        T = self.schedule.num_train_timesteps
        check_steps(steps, T)
        alpha_t, sigma_t = np.sqrt(acp), np.sqrt(F32(1) - acp)
        lambdas = np.log(alpha_t) - np.log(sigma_t)
        clipped = int(np.searchsorted(lambdas[::-1], o["lambda_min_clipped"]))
        last = T - clipped
        ts = multistep_timesteps(o["timestep_spacing"], T, steps, o["steps_offset"], last)
        sigmas = np.array(((1 - acp) / acp) ** 0.5)
        log_sigmas = np.log(sigmas)
        if o["use_karras_sigmas"]:
            sigmas = karras_sigmas(np.flip(sigmas).copy(), steps)
            ts = np.array([sigma_to_t(s, log_sigmas) for s in sigmas]).round().astype(np.int64)
        else:
            sigmas = np.interp(ts, np.arange(0, len(sigmas)), sigmas)
        last_sigma = ((1 - acp[0]) / acp[0]) ** 0.5 if o["final_sigmas_type"] == "sigma_min" else 0
        self.sigmas = np.concatenate([sigmas, [last_sigma]]).astype(F32)
        self.timesteps = ts.astype(np.int64)
        self.reset()

    def scale_model_input(self, sample: np.ndarray, t) -> np.ndarray:
        return sample

    def _alpha_sigma(self, i: int) -> tuple[np.float32, np.float32]:
        return alpha_sigma_lambda(self.sigmas[i])[:2]

    def step(self, model_output: np.ndarray, t, sample: np.ndarray, *, generator: np.random.Generator | None = None,
             residual_var: np.ndarray | None = None, noise: np.ndarray | None = None) -> np.ndarray:
        """x at the next timestep. ``noise``: the SDE variant's standard normal noise (drawn from
        ``generator`` when not given)."""
        if not len(self.timesteps):
            raise InputError("call set_timesteps(steps) before step()")
        o, i, n = self.options, self._index, len(self.timesteps)
        if i >= n:
            raise InputError(f"step() called {i + 1} times for a {n}-step run; call set_timesteps again")
        lower_final = i == n - 1 and (o["euler_at_final"] or (o["lower_order_final"] and n < 15)
                                      or o["final_sigmas_type"] == "zero")
        lower_second = i == n - 2 and o["lower_order_final"] and n < 15
        x0 = self._x0(model_output, sample, i)
        self._outputs = self._outputs[1:] + [x0]
        sample = sample.astype(F32, copy=False)
        if self.stochastic and noise is None:
            if generator is None:
                raise InputError("sde-dpmsolver++ needs a random generator")
            noise = generator.standard_normal(sample.shape, dtype=F32)
        order = o["solver_order"]
        if order == 1 or self._lower_order_nums < 1 or lower_final:
            prev = self._first_order(x0, sample, noise, i)
        elif order == 2 or self._lower_order_nums < 2 or lower_second:
            prev = self._second_order(sample, noise, i)
        else:
            prev = self._third_order(sample, noise, i)
        if self._lower_order_nums < order:
            self._lower_order_nums += 1
        self._index += 1
        return prev.astype(F32, copy=False)

    def _x0(self, model_output: np.ndarray, sample: np.ndarray, i: int) -> np.ndarray:
        kind = self.options["prediction_type"]
        if kind == "sample":
            return model_output
        a, s = self._alpha_sigma(i)
        if kind == "epsilon":
            return (sample - s * model_output) / a
        return a * sample - s * model_output  # v_prediction

    def _lambda(self, i: int) -> tuple[np.float32, np.float32, np.float32]:
        return alpha_sigma_lambda(self.sigmas[i])

    def _first_order(self, x0, sample, noise, i):
        a_t, s_t, l_t = self._lambda(i + 1)
        _, s_s, l_s = self._lambda(i)
        h = l_t - l_s
        if not self.stochastic:
            return (s_t / s_s) * sample - (a_t * (np.exp(-h) - F32(1))) * x0
        return ((s_t / s_s * np.exp(-h)) * sample + (a_t * (F32(1) - np.exp(F32(-2) * h))) * x0
                + s_t * np.sqrt(F32(1) - np.exp(F32(-2) * h)) * noise)

    def _second_order(self, sample, noise, i):
        a_t, s_t, l_t = self._lambda(i + 1)
        _, s_0, l_0 = self._lambda(i)
        _, _, l_1 = self._lambda(i - 1)
        m0, m1 = self._outputs[-1], self._outputs[-2]
        h, h_0 = l_t - l_0, l_0 - l_1
        r0 = h_0 / h
        d0, d1 = m0, (F32(1) / r0) * (m0 - m1)
        heun = self.options["solver_type"] == "heun"
        if not self.stochastic:
            e = a_t * (np.exp(-h) - F32(1))
            if heun:
                return (s_t / s_0) * sample - e * d0 + (a_t * ((np.exp(-h) - F32(1)) / h + F32(1))) * d1
            return (s_t / s_0) * sample - e * d0 - F32(0.5) * e * d1
        e = a_t * (F32(1) - np.exp(F32(-2) * h))
        tail = s_t * np.sqrt(F32(1) - np.exp(F32(-2) * h)) * noise
        if heun:
            return ((s_t / s_0 * np.exp(-h)) * sample + e * d0
                    + (a_t * ((F32(1) - np.exp(F32(-2) * h)) / (F32(-2) * h) + F32(1))) * d1 + tail)
        return (s_t / s_0 * np.exp(-h)) * sample + e * d0 + F32(0.5) * e * d1 + tail

    def _third_order(self, sample, noise, i):
        a_t, s_t, l_t = self._lambda(i + 1)
        _, s_0, l_0 = self._lambda(i)
        _, _, l_1 = self._lambda(i - 1)
        _, _, l_2 = self._lambda(i - 2)
        m0, m1, m2 = self._outputs[-1], self._outputs[-2], self._outputs[-3]
        h, h_0, h_1 = l_t - l_0, l_0 - l_1, l_1 - l_2
        r0, r1 = h_0 / h, h_1 / h
        d1_0, d1_1 = (F32(1) / r0) * (m0 - m1), (F32(1) / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (F32(1) / (r0 + r1)) * (d1_0 - d1_1)
        if not self.stochastic:
            return ((s_t / s_0) * sample - (a_t * (np.exp(-h) - F32(1))) * m0
                    + (a_t * ((np.exp(-h) - F32(1)) / h + F32(1))) * d1
                    - (a_t * ((np.exp(-h) - F32(1) + h) / h**2 - F32(0.5))) * d2)
        e2 = np.exp(F32(-2) * h)
        return ((s_t / s_0 * np.exp(-h)) * sample + (a_t * (F32(1) - e2)) * m0
                + (a_t * ((F32(1) - e2) / (F32(-2) * h) + F32(1))) * d1
                + (a_t * ((F32(1) - e2 - F32(2) * h) / (F32(2) * h) ** 2 - F32(0.5))) * d2
                + s_t * np.sqrt(F32(1) - e2) * noise)


class DPMpp2M(DPMSolverPP):
    preset = {"solver_order": 2, "algorithm_type": "dpmsolver++"}


class DPMpp3M(DPMSolverPP):
    preset = {"solver_order": 3, "algorithm_type": "dpmsolver++"}


class DPMpp2MSDE(DPMSolverPP):
    preset = {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"}
