"""Sampling a bundle (or any model with ``predict(x, t)``) with any registered sampler."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .conditioning import take_rows
from .errors import InputError
from .guidance import Guided
from .samplers import SamplerChoice, sampler_name
from .samplers.ddim import DDIM
from .schedule import NoiseSchedule


class EpsModel(Protocol):
    """What the sampler needs: a schedule, a sample shape and one UNet call."""

    schedule: NoiseSchedule
    sample_shape: tuple[int, ...]

    def predict(self, sample: np.ndarray, t: int, cond: dict | None = None) -> np.ndarray: ...


# What a sampling run does unless told otherwise: both command lines (dmcompile sample and python -m
# dmruntime) and dmcompile's SampleConfig take these, so they draw the same samples.
DEFAULT_N = 64
DEFAULT_STEPS = 50
DEFAULT_BATCH = 64


def choose_sampler(model, name: str | None = None, steps: int | None = None, karras: bool | None = None,
                   eta: float = 0.0) -> SamplerChoice:
    """What a run of ``model`` takes: the arguments given, else what a bundle was calibrated with
    (``Bundle.sampling``: its sampler and steps, and its Karras setting when the sampler is the
    same), else the model's scheduler class (:func:`dmruntime.samplers.default_sampler`) and
    :data:`DEFAULT_STEPS` steps."""
    base = getattr(model, "sampling", None) or SamplerChoice(None, DEFAULT_STEPS)
    name = base.name if name is None else sampler_name(name)
    if karras is None:
        karras = base.karras and name == base.name
    return SamplerChoice(name, base.steps if steps is None else steps, bool(karras), eta).resolved(model.schedule)


class SamplingLoop:
    """Samples ``model`` with ``sampler``: a name (``"dpmpp-2m"``, or diffusers' class name),
    None (the bundle's calibrated sampler, else the model's scheduler class; see
    :func:`choose_sampler`, which also reads ``steps``, ``karras`` and ``eta``), a
    :class:`dmruntime.samplers.SamplerChoice`, or a sampler object (its timesteps set, or set
    here to ``steps``). All ``n`` samples advance together, one step at a time, in chunks of ``batch_size`` for
    the model calls, so the result does not depend on ``batch_size``. The random numbers come
    from ``numpy.random.default_rng(seed)``: first x_T for all samples, then whatever the
    sampler draws at each step.

    Conditional models take ``cond`` (class_labels / encoder_hidden_states, one row per sample
    or one row for all). ``guidance_scale`` s turns on classifier-free guidance
    (:class:`dmruntime.guidance.Guided`); the null condition comes from the model
    (``model.conditioning.null_rows``) unless ``null_cond`` gives it.
    """

    def __init__(self, model: EpsModel, sampler=None, batch_size: int = 64, guidance_scale: float | None = None,
                 null_cond: dict | None = None, *, steps: int | None = None, karras: bool | None = None,
                 eta: float = 0.0):
        if sampler is None or isinstance(sampler, str):
            sampler = choose_sampler(model, sampler, steps, karras, eta)
        if isinstance(sampler, SamplerChoice):
            self.choice = sampler.resolved(model.schedule)
            sampler = self.choice.make(model.schedule)
        else:
            if steps is not None:
                sampler.set_timesteps(steps)
            self.choice = None
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if guidance_scale is not None and not np.isfinite(guidance_scale):
            raise InputError(f"guidance_scale must be a finite number, got {guidance_scale}")
        self.model = model
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.null_cond = null_cond

    @property
    def timesteps(self) -> np.ndarray:
        return self.sampler.timesteps

    def initial_noise(self, n: int, seed: int | list[int]) -> tuple[np.ndarray, np.random.Generator]:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, *self.model.sample_shape), dtype=np.float32)
        sigma = self.sampler.init_noise_sigma
        return (x if sigma == 1.0 else (x * np.float32(sigma)).astype(np.float32)), rng

    def sample(self, n: int, seed: int | list[int] = 0, progress=None, cond: dict | None = None) -> np.ndarray:
        """Draw ``n`` samples; returns float32 [n, *sample_shape], nominally in [-1, 1].
        ``seed``: anything ``numpy.random.default_rng`` takes (an int, or a list of ints)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InputError(f"n must be an integer >= 1, got {n!r}")
        if any(int(s) < 0 for s in np.atleast_1d(seed)):
            raise InputError(f"seed must be >= 0 (numpy's generators take no negative seeds), got {seed}")
        x, rng = self.initial_noise(n, seed)
        return self.run(x, rng, progress=progress, cond=cond)

    def _conditions(self, cond: dict | None, n: int) -> tuple[dict | None, object]:
        """(conditions for n rows, validated by the model when it can; the null condition's
        rows-maker when guided, else None)."""
        spec = getattr(self.model, "conditioning", None)
        if spec is not None and (cond or spec):
            cond = spec.check(cond, n)
        if self.guidance_scale is None:
            return cond, None
        if self.null_cond is not None:
            null = self.null_cond

            def null_rows(m):
                return {k: np.repeat(np.asarray(v)[None], m, axis=0) for k, v in null.items()}
        elif spec is not None:
            spec.null_rows(1)  # no null condition: say so before the first model call
            null_rows = spec.null_rows
        else:
            raise InputError("guidance needs a null condition: pass null_cond= or use a model that has one")
        if not cond:
            raise InputError("guidance needs a condition to guide towards (class_labels or encoder_hidden_states)")
        return cond, null_rows

    def run(self, x: np.ndarray, rng: np.random.Generator | None = None, progress=None,
            cond: dict | None = None) -> np.ndarray:
        """Denoise ``x`` (x_T) to x_0. ``progress(i, steps)`` is called after each step."""
        sampler = self.sampler
        if sampler.stochastic and rng is None:
            raise InputError("eta > 0 needs a random generator")
        x = x.astype(np.float32, copy=True)
        sampler.reset()  # a multistep sampler starts without history
        cond, null_rows = self._conditions(cond, len(x))
        model = self.model if null_rows is None else Guided(self.model, self.guidance_scale, null_rows)
        variance = getattr(model, "residual_variance", None) if sampler.stochastic else None
        steps = len(sampler.timesteps)
        for i, t in enumerate(sampler.timesteps):
            # engines take integer training timesteps: a fractional one (Euler, Karras sigmas) is fed
            # rounded to the nearest (numpy's rint), while the sampler steps with its exact sigma
            mt = int(np.rint(t))
            inp = sampler.scale_model_input(x, t)
            eps = np.empty_like(x)
            for s in range(0, x.shape[0], self.batch_size):
                rows = slice(s, s + self.batch_size)
                c = take_rows(cond, rows)
                eps[rows] = model.predict(inp[rows], mt, c) if c else model.predict(inp[rows], mt)
            rv = variance(mt, x.ndim) if variance is not None else None
            x = sampler.step(eps, t, x, generator=rng, residual_var=rv)
            if not np.isfinite(x).all():  # before anything is written from it
                raise InputError(self._non_finite(i + 1, steps, t, np.isfinite(eps).all()))
            if progress is not None:
                progress(i + 1, steps)
        return x


    def _non_finite(self, step: int, steps: int, t: int, eps_finite: bool) -> str:
        why = ("the model output was already non-finite: check the conditions (NaN embeddings?) and the "
               "bundle's scheduler config" if not eps_finite else
               f"guidance scale {self.guidance_scale:g} amplified the model output past float32's range"
               if self.guidance_scale is not None and abs(self.guidance_scale) > 100 else
               "the sampler's update overflowed: check the scheduler config (betas in (0, 1)) and the sampler options")
        return f"sampling went non-finite at step {step} of {steps} (t = {t}): {why}; no samples were returned"


class DDIMSampler(SamplingLoop):
    """DDIM (eta = 0 deterministic, eta > 0 stochastic) over any number of steps: a
    :class:`SamplingLoop` with the ``ddim`` sampler (diffusers' ``DDIMScheduler`` arithmetic)."""

    def __init__(self, model: EpsModel, steps: int = 50, eta: float = 0.0, batch_size: int = 64,
                 guidance_scale: float | None = None, null_cond: dict | None = None):
        sampler = DDIM(model.schedule, eta)
        super().__init__(model, sampler, batch_size, guidance_scale, null_cond)
        sampler.set_timesteps(steps)
        self.steps = steps
        self.eta = sampler.eta


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Map [-1, 1] float images to uint8 [0, 255] (clipped), same shape."""
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
