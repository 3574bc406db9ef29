"""Classifier-free guidance as a model wrapper, so that it works with any sampler."""

from __future__ import annotations

import numpy as np

from .conditioning import concat_rows


class Guided:
    """``model`` guided towards the condition: each call runs the unconditional and the
    conditional rows in one batch, [null; cond], and returns eps_u + s (eps_c - eps_u), as
    diffusers' pipelines do. ``null_rows(n)``: the null condition for n rows. The schedule,
    sample shape, conditioning and PTQD residual variance are the wrapped model's (both branches
    see the same x_t, so their residuals are treated as one)."""

    def __init__(self, model, scale: float, null_rows):
        self.model = model
        self.scale = np.float32(scale)
        self.null_rows = null_rows
        self.schedule = model.schedule
        self.sample_shape = model.sample_shape
        self.conditioning = getattr(model, "conditioning", None)

    def predict(self, sample: np.ndarray, t: int, cond: dict | None = None) -> np.ndarray:
        n = len(sample)
        both = self.model.predict(np.concatenate([sample, sample]), t, concat_rows(self.null_rows(n), cond))
        eps_u, eps_c = both[:n], both[n:]
        return eps_u + self.scale * (eps_c - eps_u)

    def residual_variance(self, t: int, ndim: int):
        rv = getattr(self.model, "residual_variance", None)
        return rv(t, ndim) if rv is not None else None
