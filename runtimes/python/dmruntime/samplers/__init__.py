"""Samplers (diffusers' "schedulers"): how x_t moves to the next timestep given the model output.

Every sampler has diffusers' shape: ``set_timesteps(steps)`` chooses the training timesteps a run
visits (``timesteps``), then ``step(model_output, t, x, generator=...)`` returns the next x; the
sampler keeps its own state (multistep history) and draws its noise from the generator it is
given. :class:`dmruntime.SamplingLoop` drives any of them over a model; classifier-free guidance
wraps the model (``dmruntime.guidance``), PTQD's correction is applied by the bundle to the model
output, so neither depends on the sampler.

Adding a sampler is one module with a class following :class:`Sampler` plus one line in
:data:`SAMPLERS` (and one in :data:`CLASS_NAMES` if diffusers has a scheduler class for it).

Which sampler runs (:func:`sampler_for`): the one named, else the one the model's scheduler
config names in ``_class_name``, as diffusers' pipelines would; a ``DDPMScheduler`` config (a
training schedule: diffusers' DDPMPipeline would take 1000 ancestral steps) and a config without
a class name sample with DDIM.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
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
# diffusers' scheduler classes -> the sampler that follows their arithmetic
CLASS_NAMES = {
    "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "PNDMScheduler": "pndm", "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler-a", "DPMSolverMultistepScheduler": "dpmpp",
    "UniPCMultistepScheduler": "unipc",
}
# scheduler classes whose config is a training schedule, not a sampling choice: sample with DDIM
TRAINING_SCHEDULES = {"DDPMScheduler"}
DEFAULT_SAMPLER = "ddim"


class Sampler(Protocol):
    """One sampling algorithm over a noise schedule."""

    schedule: NoiseSchedule
    timesteps: np.ndarray  # descending training timesteps, after set_timesteps
    init_noise_sigma: float  # x_T = init_noise_sigma * standard normal
    stochastic: bool  # whether step() draws noise (and so may take out a residual variance)
    # (optional, class attribute) whether step() takes ``residual_var`` out of the noise it adds

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


def sampler_name(name: str) -> str:
    """The registered name of ``name`` (a name, or a diffusers scheduler class name)."""
    if name in SAMPLERS:
        return name
    if name in CLASS_NAMES:
        return CLASS_NAMES[name]
    raise InputError(f"unknown sampler {name!r}: this dmruntime has {', '.join(SAMPLERS)} (or diffusers' class "
                     f"names {', '.join(CLASS_NAMES)})")


def default_sampler(schedule: NoiseSchedule) -> str:
    """The sampler a model's scheduler config asks for (its ``_class_name``), as diffusers would;
    DDIM for a DDPMScheduler config or one without a class name."""
    cls = schedule.class_name
    if cls is None or cls in TRAINING_SCHEDULES:
        return DEFAULT_SAMPLER
    if cls not in CLASS_NAMES:
        raise InputError(f"the model's scheduler config is a {cls}, which dmruntime does not implement; choose a "
                         f"sampler (--sampler / sampler=): {', '.join(SAMPLERS)}")
    return CLASS_NAMES[cls]


def sampler_class(name: str):
    """The class registered as ``name`` (or a diffusers class name)."""
    module, cls = SAMPLERS[sampler_name(name)].split(":")
    return getattr(importlib.import_module(module), cls)


def make_sampler(name: str, schedule: NoiseSchedule, **options) -> Sampler:
    """A registered sampler over ``schedule`` (``options``: the sampler's own, e.g. eta)."""
    return sampler_class(name)(schedule, **options)


def residual_variance_samplers() -> list[str]:
    """The samplers whose step takes PTQD's residual variance out of the noise it adds (class
    attribute ``residual_variance``)."""
    return [n + (" (eta > 0)" if n == "ddim" else "") for n in SAMPLERS
            if getattr(sampler_class(n), "residual_variance", False)]


def check_choice(name: str | None, karras: bool = False, eta: float = 0.0) -> dict:
    """The sampler options that ``karras`` and ``eta`` ask of sampler ``name`` (None: the model's,
    checked when it is known); an InputError when it cannot honour them."""
    if name is None:
        return {**({"use_karras_sigmas": True} if karras else {}), **({"eta": eta} if eta else {})}
    name = sampler_name(name)
    options = {}
    if karras:
        if "use_karras_sigmas" not in getattr(sampler_class(name), "defaults", {}):
            have = [n for n in SAMPLERS if "use_karras_sigmas" in getattr(sampler_class(n), "defaults", {})]
            raise InputError(f"{name} has no Karras sigmas; --karras / karras= applies to {', '.join(have)}")
        options["use_karras_sigmas"] = True
    if eta:
        if name != "ddim":
            raise InputError(f"eta is DDIM's option (the noise it adds per step); {name} does not take it: leave eta "
                             "at 0 or choose the ddim sampler")
        options["eta"] = eta
    return options


def sampler_for(schedule: NoiseSchedule, name: str | None = None, steps: int = 50, karras: bool = False,
                eta: float = 0.0) -> Sampler:
    """The sampler a run uses, its timesteps set: ``name`` (None: :func:`default_sampler`),
    ``karras`` for Karras sigmas (samplers that have them), ``eta`` for DDIM's noise. Options a
    sampler cannot honour are InputErrors naming them."""
    name = default_sampler(schedule) if name is None else sampler_name(name)
    sampler = sampler_class(name)(schedule, **check_choice(name, karras, eta))
    sampler.set_timesteps(steps)
    return sampler


@dataclass(frozen=True)
class SamplerChoice:
    """Which sampler a run takes: ``name`` (a registered name or a diffusers class name; None: the
    model's scheduler config decides), ``steps``, ``karras`` (Karras sigmas) and DDIM's ``eta``."""

    name: str | None = None
    steps: int = 50
    karras: bool = False
    eta: float = 0.0

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)) or self.steps < 1:
            raise InputError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.name is not None:
            object.__setattr__(self, "name", sampler_name(self.name))
        check_choice(self.name, self.karras, self.eta)

    def resolved(self, schedule: NoiseSchedule) -> SamplerChoice:
        """This choice with the model's default sampler filled in."""
        return self if self.name is not None else replace(self, name=default_sampler(schedule))

    def make(self, schedule: NoiseSchedule) -> Sampler:
        """The sampler over ``schedule``, its timesteps set."""
        return sampler_for(schedule, self.name, self.steps, self.karras, self.eta)

    def model_timesteps(self, schedule: NoiseSchedule) -> np.ndarray:
        """The training timesteps the model is fed, in order (fractional ones rounded, as the
        sampling loop feeds engines)."""
        return np.rint(self.make(schedule).timesteps).astype(np.int64)

    def to_dict(self) -> dict:
        return {"name": self.name, "steps": int(self.steps), "karras": bool(self.karras)}

    def describe(self) -> str:
        extra = (", Karras sigmas" if self.karras else "") + (f", eta {self.eta:g}" if self.eta else "")
        return f"{self.name or 'the model’s sampler'} {self.steps} steps{extra}"
