"""DDIM sampling over a bundle (or any model with ``predict(x, t)``)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .errors import InputError
from .schedule import NoiseSchedule, ddim_step


class EpsModel(Protocol):
    """What the sampler needs: a schedule, a sample shape and one UNet call."""

    schedule: NoiseSchedule
    sample_shape: tuple[int, ...]

    def predict(self, sample: np.ndarray, t: int) -> np.ndarray: ...


class DDIMSampler:
    """DDIM (eta = 0 deterministic, eta > 0 stochastic) over any number of steps.

    All ``n`` samples advance together, one step at a time, in chunks of ``batch_size``
    for the UNet calls, so the result does not depend on ``batch_size``. The random
    numbers come from ``numpy.random.default_rng(seed)``: first x_T for all samples, then
    (eta > 0) one noise array per step.
    """

    def __init__(self, model: EpsModel, steps: int = 50, eta: float = 0.0, batch_size: int = 64):
        if eta < 0:
            raise InputError(f"eta must be >= 0, got {eta}")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.steps = steps
        self.eta = float(eta)
        self.batch_size = int(batch_size)
        self.timesteps = model.schedule.ddim_timesteps(steps)

    def initial_noise(self, n: int, seed: int | list[int]) -> tuple[np.ndarray, np.random.Generator]:
        rng = np.random.default_rng(seed)
        return rng.standard_normal((n, *self.model.sample_shape), dtype=np.float32), rng

    def sample(self, n: int, seed: int | list[int] = 0, progress=None) -> np.ndarray:
        """Draw ``n`` samples; returns float32 [n, C, H, W], nominally in [-1, 1].
        ``seed``: anything ``numpy.random.default_rng`` takes (an int, or a list of ints)."""
        if n < 1:
            raise InputError(f"n must be >= 1, got {n}")
        x, rng = self.initial_noise(n, seed)
        return self.run(x, rng, progress=progress)

    def run(self, x: np.ndarray, rng: np.random.Generator | None = None, progress=None) -> np.ndarray:
        """Denoise ``x`` (x_T) to x_0. ``progress(i, steps)`` is called after each step."""
        sched = self.model.schedule
        stride = sched.num_train_timesteps // self.steps
        if self.eta > 0 and rng is None:
            raise InputError("eta > 0 needs a random generator")
        x = x.astype(np.float32, copy=True)
        for i, t in enumerate(self.timesteps):
            t = int(t)
            eps = np.empty_like(x)
            for s in range(0, x.shape[0], self.batch_size):
                eps[s:s + self.batch_size] = self.model.predict(x[s:s + self.batch_size], t)
            noise = rng.standard_normal(x.shape, dtype=np.float32) if self.eta > 0 else None
            rv = None
            if self.eta > 0 and hasattr(self.model, "residual_variance"):
                rv = self.model.residual_variance(t, x.ndim)
            x = ddim_step(sched, eps, t, t - stride, x, eta=self.eta, noise=noise, residual_var=rv)
            if progress is not None:
                progress(i + 1, self.steps)
        return x


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Map [-1, 1] float images to uint8 [0, 255] (clipped), same shape."""
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
