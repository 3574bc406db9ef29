"""UniPC multistep (Zhao et al. 2023), diffusers' ``UniPCMultistepScheduler`` arithmetic: the
predictor-corrector pair at orders 1-3, ``bh2`` (the default) or ``bh1``, data (``predict_x0``) or
noise prediction, ``lower_order_final``, ``disable_corrector``, Karras sigmas (timesteps rounded, as
diffusers does), ``final_sigmas_type`` zero or sigma_min, the three timestep spacings, epsilon / v
/ sample prediction. Exponential / beta / flow sigmas, thresholding and an external ``solver_p``
are refused.

The corrector of step i uses the model output at step i + 1, so no extra model calls are made.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..schedule import NoiseSchedule
from . import resolve_options
from .sigmas import alpha_sigma_lambda, check_steps, karras_sigmas, multistep_timesteps, sigma_to_t

DEFAULTS = {"solver_order": 2, "prediction_type": "epsilon", "predict_x0": True, "solver_type": "bh2",
            "lower_order_final": True, "disable_corrector": [], "use_karras_sigmas": False,
            "timestep_spacing": "linspace", "steps_offset": 0, "final_sigmas_type": "zero"}
UNSUPPORTED = {"use_exponential_sigmas": False, "use_beta_sigmas": False, "use_flow_sigmas": False,
               "use_dynamic_shifting": False, "thresholding": False, "sigma_min": None, "sigma_max": None,
               "shift_terminal": None}
F32 = np.float32


class UniPC:
    """UniPC over ``schedule``; ``options`` override the config's (e.g. ``solver_order=3``)."""

    defaults = DEFAULTS  # its options and their defaults (sampler_for reads use_karras_sigmas here)

    init_noise_sigma = 1.0
    stochastic = False

    def __init__(self, schedule: NoiseSchedule, **options):
        o = resolve_options("UniPC", schedule, DEFAULTS, UNSUPPORTED, options)
        if o["solver_type"] in ("midpoint", "heun", "logrho"):
            o["solver_type"] = "bh2"  # diffusers maps DPM-Solver's solver types to bh2
        if o["solver_type"] not in ("bh1", "bh2"):
            raise InputError(f"UniPC: solver_type must be bh1 or bh2, got {o['solver_type']!r}")
        if o["solver_order"] not in (1, 2, 3):
            raise InputError(f"UniPC: solver_order must be 1, 2 or 3 in dmruntime, got {o['solver_order']!r}")
        if o["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise InputError(f"UniPC: final_sigmas_type must be zero or sigma_min, got {o['final_sigmas_type']!r}")
        if o["timestep_spacing"] not in ("linspace", "leading", "trailing"):
            raise InputError(f"UniPC: unknown timestep_spacing {o['timestep_spacing']!r}")
        if o["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
            raise InputError(f"UniPC: prediction_type {o['prediction_type']!r} is not implemented in dmruntime")
        if o["final_sigmas_type"] == "zero" and (o["solver_type"] == "bh1" or not o["predict_x0"]):
            raise InputError("UniPC with solver_type bh1 or predict_x0 false steps to a final sigma of zero through an "
                             "infinite log-SNR step (NaN samples, in diffusers too); set final_sigmas_type to sigma_min")
        self.schedule, self.options = schedule, o
        self.timesteps = np.zeros(0, np.int64)
        self.sigmas = np.zeros(0, F32)
        self.reset()

    def reset(self) -> None:
        """Forget the multistep history (a new run from x_T)."""
        self._outputs: list[np.ndarray | None] = [None] * self.options["solver_order"]
        self._lower_order_nums = 0
        self._last_sample = None
        self._order = 0
        self._index = 0

    def set_timesteps(self, steps: int) -> None:
        o, acp = self.options, self.schedule.alphas_cumprod
        T = self.schedule.num_train_timesteps
        check_steps(steps, T)
        ts = multistep_timesteps(o["timestep_spacing"], T, steps, o["steps_offset"])
        sigmas = np.array(((1 - acp) / acp) ** 0.5)
        if o["use_karras_sigmas"]:
            log_sigmas = np.log(sigmas)
            sigmas = karras_sigmas(np.flip(sigmas).copy(), steps)
            ts = np.array([sigma_to_t(s, log_sigmas) for s in sigmas]).round().astype(np.int64)
            last = sigmas[-1] if o["final_sigmas_type"] == "sigma_min" else 0
        else:
            sigmas = np.interp(ts, np.arange(0, len(sigmas)), sigmas)
            last = ((1 - acp[0]) / acp[0]) ** 0.5 if o["final_sigmas_type"] == "sigma_min" else 0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(F32)
        self.timesteps = ts.astype(np.int64)
        self.reset()

    def scale_model_input(self, sample: np.ndarray, t) -> np.ndarray:
        return sample

    def _alpha_sigma(self, i: int) -> tuple[np.float32, np.float32]:
        return alpha_sigma_lambda(self.sigmas[i])[:2]

    def _lambda(self, i: int) -> tuple[np.float32, np.float32, np.float32]:
        return alpha_sigma_lambda(self.sigmas[i])

    def _convert(self, out: np.ndarray, sample: np.ndarray, i: int) -> np.ndarray:
        a, s = self._alpha_sigma(i)
        kind = self.options["prediction_type"]
        if self.options["predict_x0"]:
            if kind == "epsilon":
                return (sample - s * out) / a
            return out if kind == "sample" else a * sample - s * out
        if kind == "epsilon":
            return out
        return (sample - a * out) / s if kind == "sample" else a * out + s * sample

    def step(self, model_output: np.ndarray, t, sample: np.ndarray, *, generator: np.random.Generator | None = None,
             residual_var: np.ndarray | None = None) -> np.ndarray:
        if not len(self.timesteps):
            raise InputError("call set_timesteps(steps) before step()")
        o, i, n = self.options, self._index, len(self.timesteps)
        if i >= n:
            raise InputError(f"step() called {i + 1} times for a {n}-step run; call set_timesteps again")
        sample = sample.astype(F32, copy=False)
        m = self._convert(model_output, sample, i)
        if i > 0 and (i - 1) not in o["disable_corrector"] and self._last_sample is not None:
            sample = self._update(m, self._last_sample, i - 1, self._order, corrector=True)
        self._outputs = self._outputs[1:] + [m]
        order = min(o["solver_order"], n - i) if o["lower_order_final"] else o["solver_order"]
        self._order = min(order, self._lower_order_nums + 1)
        self._last_sample = sample
        prev = self._update(None, sample, i, self._order, corrector=False)
        if self._lower_order_nums < o["solver_order"]:
            self._lower_order_nums += 1
        self._index += 1
        return prev.astype(F32, copy=False)

    def _update(self, model_t, x, s, order, corrector):
        """UniPC's update from step s to s + 1: the predictor (``model_t`` None) or the corrector
        with the converted model output ``model_t`` at s + 1; ``self._outputs[-1]`` is the one at s."""
        x0_mode = self.options["predict_x0"]
        outs = self._outputs  # the predictor runs after this step's output joined them, the corrector before
        m0 = outs[-1]
        a_t, s_t, l_t = self._lambda(s + 1)
        a_0, s_0, l_0 = self._lambda(s)
        h = l_t - l_0
        rks, d1s = [], []
        for k in range(1, order):
            _, _, l_k = self._lambda(s - k)
            rk = (l_k - l_0) / h
            rks.append(rk)
            d1s.append((outs[-(k + 1)] - m0) / rk)
        rks.append(F32(1))
        rks = np.array(rks, F32)
        hh = -h if x0_mode else h
        h_phi_1 = np.expm1(hh)
        h_phi_k = h_phi_1 / hh - F32(1)
        b_h = hh if self.options["solver_type"] == "bh1" else np.expm1(hh)
        R, b, fact = [], [], 1
        for k in range(1, order + 1):
            R.append(rks ** (k - 1))
            b.append(h_phi_k * fact / b_h)
            fact *= k + 1
            h_phi_k = h_phi_k / hh - F32(1) / F32(fact)
        R, b = np.array(R, F32), np.array(b, F32)
        if x0_mode:
            base, scale = s_t / s_0 * x - a_t * h_phi_1 * m0, a_t * b_h
        else:
            base, scale = a_t / a_0 * x - s_t * h_phi_1 * m0, s_t * b_h
        if not corrector:
            if not d1s:
                return base
            rhos = np.array([0.5], F32) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).astype(F32)
            return base - scale * sum(r * d for r, d in zip(rhos, d1s))
        rhos = np.array([0.5], F32) if order == 1 else np.linalg.solve(R, b).astype(F32)
        res = sum((r * d for r, d in zip(rhos[:-1], d1s)), np.zeros_like(x))
        return base - scale * (res + rhos[-1] * (model_t - m0))
