"""One way to watch what a model sees along sampling trajectories: a runtime sampler drives a
model whose every call is handed to collectors (activation histograms and second moments,
RD-curve rows, PTQD statistics).

A collector is any callable ``collector(x, t, cond, outputs)``: the rows of one model call, its
training timestep, their conditions (None for unconditional models) and the named outputs
(``eps`` at least). Collectors draw from random streams of their own, so adding one changes
nothing another records.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from dmruntime import NoiseSchedule, SamplingLoop, make_sampler

# (x, t, cond) -> {"eps": ..., other named outputs}
ModelRun = Callable[[np.ndarray, int, dict | None], dict]
Collector = Callable[[np.ndarray, int, dict | None, dict], None]


class Recorder:
    """The runtime's model interface over ``run``; each call's rows and outputs go to every
    collector in order, and ``eps`` drives the sampler."""

    def __init__(self, run: ModelRun, schedule: NoiseSchedule, sample_shape: tuple[int, ...],
                 collectors: Sequence[Collector], conditioning=None):
        self.run = run
        self.schedule = schedule
        self.sample_shape = tuple(sample_shape)
        self.collectors = tuple(collectors)
        self.conditioning = conditioning

    def predict(self, sample: np.ndarray, t: int, cond: dict | None = None) -> np.ndarray:
        outputs = self.run(sample, t, cond)
        for collect in self.collectors:
            collect(sample, t, cond, outputs)
        return outputs["eps"]


def record_trajectories(run: ModelRun, schedule: NoiseSchedule, sample_shape: tuple[int, ...],
                        collectors: Sequence[Collector], *, n: int, steps: int, seed, batch_size: int = 64,
                        guidance_scale: float | None = None, cond: dict | None = None, conditioning=None,
                        null_cond: dict | None = None, progress=None, sampler: str = "ddim") -> np.ndarray:
    """Sample ``n`` trajectories of ``steps`` steps of ``sampler`` (deterministic: eta 0) from
    ``default_rng(seed)`` through ``run``, every call handed to ``collectors``; returns the final
    samples. Guided (``guidance_scale``), each call holds both branches, [null; cond], the null
    condition ``null_cond`` or ``conditioning``'s."""
    recorder = Recorder(run, schedule, sample_shape, collectors, conditioning)
    stepper = make_sampler(sampler, schedule)
    stepper.set_timesteps(steps)
    loop = SamplingLoop(recorder, stepper, batch_size=batch_size, guidance_scale=guidance_scale, null_cond=null_cond)
    return loop.sample(n, seed=seed, progress=progress, cond=cond)
