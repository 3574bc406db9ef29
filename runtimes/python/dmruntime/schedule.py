"""Noise schedules, read from a diffusers scheduler config.

Follows diffusers' arithmetic (float32 betas and cumulative alphas, ``set_alpha_to_one``,
``clip_sample``, ``timestep_spacing``, ``prediction_type``) so that a bundle samples the same
trajectories as the PyTorch pipeline it came from; the samplers (``dmruntime.samplers``) step
over it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .schema import SCHEDULER, SchemaError

# DDIMScheduler's defaults for keys a scheduler config (often a DDPMScheduler's) leaves out.
SCHEDULE_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "thresholding": False,
}


def _betas(cfg: dict) -> np.ndarray:
    n = int(cfg["num_train_timesteps"])
    kind = cfg["beta_schedule"]
    if cfg.get("trained_betas") is not None:
        return np.asarray(cfg["trained_betas"], dtype=np.float32)
    if kind == "linear":
        return np.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=np.float32)
    if kind == "scaled_linear":
        return (np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=np.float32) ** 2).astype(np.float32)
    if kind == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        b = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return np.asarray(b, dtype=np.float32)
    raise InputError(f"unsupported beta_schedule {kind!r}: use linear, scaled_linear or squaredcos_cap_v2")


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete diffusion schedule read from a diffusers scheduler config."""

    alphas_cumprod: np.ndarray  # float32 [T]
    final_alpha_cumprod: float
    clip_sample: bool
    clip_sample_range: float
    steps_offset: int
    timestep_spacing: str
    prediction_type: str
    # the scheduler config as given (no defaults filled in): samplers other than DDIM resolve their
    # own options from it with their own defaults, as diffusers' from_config does
    config: dict = field(default_factory=dict, repr=False, compare=False)
    # the config's diffusers class (_class_name), which picks the default sampler; None if it has none
    class_name: str | None = field(default=None, compare=False)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_config(cls, config: dict) -> NoiseSchedule:
        """The schedule of a diffusers scheduler config; raises InputError naming the key when a
        value has the wrong type or range (a negative beta, ...) or asks for what dmruntime lacks."""
        check_scheduler_config(config)
        cfg = {**SCHEDULE_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
        if cfg["thresholding"]:
            raise InputError("dynamic thresholding is not supported; set thresholding=false in the scheduler config")
        if cfg["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
            raise InputError(f"unknown prediction_type {cfg['prediction_type']!r}")
        if cfg["timestep_spacing"] not in ("leading", "trailing", "linspace"):
            raise InputError(f"unknown timestep_spacing {cfg['timestep_spacing']!r}")
        if cfg.get("rescale_betas_zero_snr"):
            raise InputError("rescale_betas_zero_snr (zero terminal SNR) is not supported; set it to false in the "
                             "scheduler config")
        if cfg["trained_betas"] is not None and len(cfg["trained_betas"]) != cfg["num_train_timesteps"]:
            raise InputError(f"trained_betas has {len(cfg['trained_betas'])} values for num_train_timesteps "
                             f"{cfg['num_train_timesteps']}; they must agree")
        acp = np.cumprod(1.0 - _betas(cfg), dtype=np.float32)
        if not (np.isfinite(acp).all() and acp[-1] > 0):
            raise InputError("the schedule's cumulative alphas reach 0 (betas of 1, or too many large betas): "
                             "check beta_start, beta_end and num_train_timesteps")
        final = 1.0 if cfg["set_alpha_to_one"] else float(acp[0])
        return cls(acp, final, bool(cfg["clip_sample"]), float(cfg["clip_sample_range"]),
                   int(cfg["steps_offset"]), cfg["timestep_spacing"], cfg["prediction_type"],
                   {k: v for k, v in config.items() if not k.startswith("_")}, config.get("_class_name"))

    def alpha(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod


def check_scheduler_config(config) -> None:
    """Raise InputError unless the keys dmruntime reads from a scheduler config have the right
    types and ranges (betas in [0, 1], a known beta_schedule, ...)."""
    try:
        SCHEDULER.check(config, "")
    except SchemaError as e:
        raise InputError(f"scheduler config: {e}" if e.path else f"scheduler config {e.reason}") from None
