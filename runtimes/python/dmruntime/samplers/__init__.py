"""Samplers (diffusers' "schedulers"): how x_t moves to the next timestep given the model output.

Every sampler has diffusers' shape: ``set_timesteps(steps)`` chooses the training timesteps a run
visits (``timesteps``), then ``step(model_output, t, x, generator=...)`` returns the next x; the
sampler keeps its own state (multistep history) and draws its noise from the generator it is
given. :class:`dmruntime.SamplingLoop` drives any of them over a model; classifier-free guidance
wraps the model (``dmruntime.guidance``), PTQD's correction is applied by the bundle to the model
output, so neither depends on the sampler.

Adding a sampler is one module with a class following :class:`Sampler` plus one line in
:data:`SAMPLERS`.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

from ..errors import InputError
from ..schedule import NoiseSchedule

# name -> "module:class"; the class is built as cls(schedule, **options)
SAMPLERS = {
    "ddim": "dmruntime.samplers.ddim:DDIM",
    "dpmpp": "dmruntime.samplers.dpmsolver:DPMSolverPP",  # as the scheduler config says (order, algorithm)
    "dpmpp-2m": "dmruntime.samplers.dpmsolver:DPMpp2M",
    "dpmpp-3m": "dmruntime.samplers.dpmsolver:DPMpp3M",
    "dpmpp-2m-sde": "dmruntime.samplers.dpmsolver:DPMpp2MSDE",
    "euler": "dmruntime.samplers.euler:Euler",
    "euler-a": "dmruntime.samplers.euler_ancestral:EulerAncestral",
    "pndm": "dmruntime.samplers.pndm:PNDM",
    "unipc": "dmruntime.samplers.unipc:UniPC",
    "ddpm": "dmruntime.samplers.ddpm:DDPM",
}


class Sampler(Protocol):
    """One sampling algorithm over a noise schedule."""

    schedule: NoiseSchedule
    timesteps: np.ndarray  # descending training timesteps, after set_timesteps
    init_noise_sigma: float  # x_T = init_noise_sigma * standard normal
    stochastic: bool  # whether step() draws noise (and so may take out a residual variance)

    def set_timesteps(self, steps: int) -> None:
        """Choose the timesteps of a ``steps``-step run and reset any state."""

    def reset(self) -> None:
        """Forget any state of a run (multistep history); the loop calls it before each run."""

    def scale_model_input(self, sample: np.ndarray, t: int) -> np.ndarray:
        """What the model is fed at t (the identity for variance-preserving samplers)."""

    def step(self, model_output: np.ndarray, t: int, sample: np.ndarray, *,
             generator: np.random.Generator | None = None, residual_var: np.ndarray | None = None) -> np.ndarray:
        """x at the timestep after t. ``residual_var``: per-channel variance of a noise already in
        the model output (PTQD), which a stochastic sampler takes out of the noise it adds."""


def resolve_options(sampler: str, schedule: NoiseSchedule, defaults: dict, unsupported: dict, options: dict,
                    preset: dict | None = None) -> dict:
    """A sampler's options, as diffusers' ``from_config`` resolves them: its class ``defaults``,
    then the scheduler config's values for those keys, then ``preset`` (a named variant), then
    ``options``. ``unsupported``: options diffusers has, with the only value this runtime
    implements (or a tuple of the values it accepts); another value there (in the config or the
    options), or an option the sampler does not have, is an InputError naming it."""
    cfg = schedule.config
    for key, value in {**{k: cfg[k] for k in unsupported if k in cfg}, **options}.items():
        allowed = unsupported.get(key)
        if key in unsupported and (value not in allowed if isinstance(allowed, tuple) else value != allowed):
            want = " or ".join(map(repr, allowed)) if isinstance(allowed, tuple) else repr(allowed)
            raise InputError(f"{sampler}: {key}={value!r} is not implemented in dmruntime; set it to {want} in the "
                             "scheduler config or choose another sampler")
    unknown = sorted(set(options) - set(defaults) - set(unsupported))
    if unknown:
        raise InputError(f"{sampler} has no option {unknown[0]!r} (it takes {', '.join(sorted(defaults))})")
    return {**defaults, **{k: cfg[k] for k in defaults if k in cfg}, **(preset or {}), **options}


def make_sampler(name: str, schedule: NoiseSchedule, **options) -> Sampler:
    """A registered sampler over ``schedule`` (``options``: the sampler's own, e.g. eta)."""
    where = SAMPLERS.get(name)
    if where is None:
        raise InputError(f"unknown sampler {name!r}: this dmruntime has {', '.join(SAMPLERS)}")
    module, cls = where.split(":")
    return getattr(importlib.import_module(module), cls)(schedule, **options)


def sampler_timesteps(schedule: NoiseSchedule, steps: int, sampler: str = "ddim", **options) -> np.ndarray:
    """The training timesteps a ``steps``-step run of ``sampler`` visits, in order."""
    s = make_sampler(sampler, schedule, **options)
    s.set_timesteps(steps)
    return s.timesteps
