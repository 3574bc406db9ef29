"""Euler ancestral (Karras et al. 2022's Euler step plus fresh noise at every step), diffusers'
``EulerAncestralDiscreteScheduler`` arithmetic: the three timestep spacings, linearly
interpolated sigmas, epsilon / v prediction. It has no Karras sigmas and no sample prediction
(neither has diffusers'); a config asking for them is refused.

Stochastic: each step lands at sigma_down by Euler and adds sigma_up of standard normal noise, so
PTQD's residual variance (a noise already in the model output) is taken out of sigma_up.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..schedule import NoiseSchedule
from .euler import UNSUPPORTED as EULER_UNSUPPORTED
from .euler import Euler

F32 = np.float32


class EulerAncestral(Euler):
    """Euler ancestral over ``schedule``: ``step`` draws its noise from the generator (or takes ``noise``)."""

    stochastic = True
    residual_variance = True  # step() takes PTQD's residual variance out of its noise
    name = "Euler ancestral"
    defaults = {"timestep_spacing": "linspace", "steps_offset": 0, "prediction_type": "epsilon"}
    unsupported = {**EULER_UNSUPPORTED, "use_karras_sigmas": False, "final_sigmas_type": "zero"}

    def __init__(self, schedule: NoiseSchedule, **options):
        super().__init__(schedule, **options)
        if self.options["prediction_type"] == "sample":
            raise InputError("Euler ancestral does not take prediction_type 'sample' (diffusers' does not either); "
                             "choose euler or ddim")

    def step(self, model_output: np.ndarray, t, sample: np.ndarray, *, generator: np.random.Generator | None = None,
             residual_var: np.ndarray | None = None, noise: np.ndarray | None = None) -> np.ndarray:
        """x at the next sigma. ``residual_var``: variance of a noise in an epsilon model output
        (PTQD); the part the step carries (its eps coefficient squared times it) comes out of the
        variance it adds, clamped at zero."""
        i = self._current()
        if noise is None:
            if generator is None:
                raise InputError("Euler ancestral needs a random generator")
            noise = generator.standard_normal(sample.shape, dtype=F32)
        sample = sample.astype(F32, copy=False)
        s_from, s_to = self.sigmas[i], self.sigmas[i + 1]
        s_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** F32(0.5)
        s_down = (s_to**2 - s_up**2) ** F32(0.5)
        derivative = (sample - self._x0(model_output, sample, s_from)) / s_from
        prev = sample + derivative * (s_down - s_from)
        up = s_up
        if residual_var is not None and self.options["prediction_type"] == "epsilon":
            # epsilon enters prev as sigma * eps / sigma * (s_down - s_from)
            up = np.sqrt(np.maximum(s_up**2 - (s_down - s_from) ** 2 * residual_var, 0)).astype(F32)
        self._index += 1
        return (prev + noise * up).astype(F32, copy=False)
