"""DDIM sampling over a bundle (or any model with ``predict(x, t)``)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .conditioning import concat_rows, take_rows
from .errors import InputError
from .schedule import NoiseSchedule, ddim_step


class EpsModel(Protocol):
    """What the sampler needs: a schedule, a sample shape and one UNet call."""

    schedule: NoiseSchedule
    sample_shape: tuple[int, ...]

    def predict(self, sample: np.ndarray, t: int, cond: dict | None = None) -> np.ndarray: ...


class DDIMSampler:
    """DDIM (eta = 0 deterministic, eta > 0 stochastic) over any number of steps.

    All ``n`` samples advance together, one step at a time, in chunks of ``batch_size``
    for the UNet calls, so the result does not depend on ``batch_size``. The random
    numbers come from ``numpy.random.default_rng(seed)``: first x_T for all samples, then
    (eta > 0) one noise array per step.

    Conditional models take ``cond`` (class_labels / encoder_hidden_states, one row per sample
    or one row for all). ``guidance_scale`` s (classifier-free guidance): each UNet call runs
    the unconditional and the conditional rows in one batch, [null; cond], and the step uses
    eps_u + s (eps_c - eps_u), as diffusers' pipelines do. The null condition comes from the
    model (``model.conditioning.null_rows``) unless ``null_cond`` gives it.
    """

    def __init__(self, model: EpsModel, steps: int = 50, eta: float = 0.0, batch_size: int = 64,
                 guidance_scale: float | None = None, null_cond: dict | None = None):
        if eta < 0:
            raise InputError(f"eta must be >= 0, got {eta}")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if guidance_scale is not None and not np.isfinite(guidance_scale):
            raise InputError(f"guidance_scale must be a finite number, got {guidance_scale}")
        self.model = model
        self.steps = steps
        self.eta = float(eta)
        self.batch_size = int(batch_size)
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.null_cond = null_cond
        self.timesteps = model.schedule.ddim_timesteps(steps)

    def initial_noise(self, n: int, seed: int | list[int]) -> tuple[np.ndarray, np.random.Generator]:
        rng = np.random.default_rng(seed)
        return rng.standard_normal((n, *self.model.sample_shape), dtype=np.float32), rng

    def sample(self, n: int, seed: int | list[int] = 0, progress=None, cond: dict | None = None) -> np.ndarray:
        """Draw ``n`` samples; returns float32 [n, C, H, W], nominally in [-1, 1].
        ``seed``: anything ``numpy.random.default_rng`` takes (an int, or a list of ints)."""
        if n < 1:
            raise InputError(f"n must be >= 1, got {n}")
        x, rng = self.initial_noise(n, seed)
        return self.run(x, rng, progress=progress, cond=cond)

    def _conditions(self, cond: dict | None, n: int) -> tuple[dict | None, dict | None]:
        """(conditions, null conditions) for n rows, validated by the model when it can."""
        spec = getattr(self.model, "conditioning", None)
        if spec is not None and (cond or spec):
            cond = spec.check(cond, n)
        guided = self.guidance_scale is not None
        if not guided:
            return cond, None
        if self.null_cond is not None:
            null = {k: np.repeat(np.asarray(v)[None], n, axis=0) for k, v in self.null_cond.items()}
        elif spec is not None:
            null = spec.null_rows(n)
        else:
            raise InputError("guidance needs a null condition: pass null_cond= or use a model that has one")
        if not cond:
            raise InputError("guidance needs a condition to guide towards (class_labels or encoder_hidden_states)")
        return cond, null

    def _eps(self, x: np.ndarray, t: int, cond: dict | None, null: dict | None) -> np.ndarray:
        """One UNet call for these rows (two branches in one batch when guided)."""
        if null is None:
            return self.model.predict(x, t, cond) if cond else self.model.predict(x, t)
        n = len(x)
        both = self.model.predict(np.concatenate([x, x]), t, concat_rows(null, cond))
        eps_u, eps_c = both[:n], both[n:]
        return eps_u + np.float32(self.guidance_scale) * (eps_c - eps_u)

    def run(self, x: np.ndarray, rng: np.random.Generator | None = None, progress=None,
            cond: dict | None = None) -> np.ndarray:
        """Denoise ``x`` (x_T) to x_0. ``progress(i, steps)`` is called after each step."""
        sched = self.model.schedule
        stride = sched.num_train_timesteps // self.steps
        if self.eta > 0 and rng is None:
            raise InputError("eta > 0 needs a random generator")
        x = x.astype(np.float32, copy=True)
        cond, null = self._conditions(cond, len(x))
        for i, t in enumerate(self.timesteps):
            t = int(t)
            eps = np.empty_like(x)
            for s in range(0, x.shape[0], self.batch_size):
                rows = slice(s, s + self.batch_size)
                eps[rows] = self._eps(x[rows], t, take_rows(cond, rows), take_rows(null, rows))
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
