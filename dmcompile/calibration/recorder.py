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
from dmruntime import NoiseSchedule, SamplerChoice, SamplingLoop
from dmruntime.conditioning import take_rows

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
                        collectors: Sequence[Collector], *, n: int, sampling: SamplerChoice, seed, batch_size: int = 64,
                        guidance_scale: float | None = None, cond: dict | None = None, conditioning=None,
                        null_cond: dict | None = None, progress=None) -> np.ndarray:
    """Sample ``n`` trajectories of ``sampling`` (a sampler, its steps) from ``default_rng(seed)``
    through ``run``, every call handed to ``collectors``; returns the final samples. Guided
    (``guidance_scale``), each call holds both branches, [null; cond], the null condition
    ``null_cond`` or ``conditioning``'s."""
    loop = _loop(run, schedule, sample_shape, collectors, conditioning, sampling, batch_size, guidance_scale,
                 null_cond)
    return loop.sample(n, seed=seed, progress=progress, cond=cond)


def _loop(run, schedule, sample_shape, collectors, conditioning, sampling, batch_size, guidance_scale,
          null_cond) -> SamplingLoop:
    """The runtime's sampling loop over a Recorder of ``run``, its sampler's timesteps set."""
    recorder = Recorder(run, schedule, sample_shape, collectors, conditioning)
    return SamplingLoop(recorder, sampling.resolved(schedule), batch_size=batch_size, guidance_scale=guidance_scale,
                        null_cond=null_cond)


def record_chunk(run: ModelRun, schedule: NoiseSchedule, sample_shape: tuple[int, ...],
                 collectors: Sequence[Collector], *, n: int, sampling: SamplerChoice, seed, chunk: int, index: int,
                 guidance_scale: float | None = None, cond: dict | None = None, conditioning=None,
                 null_cond: dict | None = None, progress=None) -> None:
    """Chunk ``index`` (trajectories ``index * chunk`` on, ``chunk`` of them) of the run
    a run of all ``n`` in chunks of ``chunk`` makes: the same x_T rows and, for a stochastic sampler, the
    chunk's own noise stream (``seed`` and ``index``), so chunks can run in any order, in any
    process. A collector with ``begin_chunk(first, rows)`` hears where the chunk starts."""
    loop = _loop(run, schedule, sample_shape, collectors, conditioning, sampling, chunk, guidance_scale,
                 null_cond)
    x, rng = loop.initial_noise(n, seed)
    if cond and conditioning is not None:
        cond = conditioning.check(cond, n)  # one row per trajectory, so chunks take their own
    rows = slice(index * chunk, min((index + 1) * chunk, n))
    for collect in collectors:
        if hasattr(collect, "begin_chunk"):
            collect.begin_chunk(rows.start, rows.stop - rows.start)
    # run() resets the sampler: each chunk starts without multistep history
    noise = np.random.default_rng([*np.atleast_1d(seed).tolist(), index]) if loop.sampler.stochastic else rng
    loop.run(x[rows], noise, cond=take_rows(cond, rows), progress=progress)
