"""PTQD statistics at build time: how the quantized noise prediction relates to the fp32 one.

Along seeded fp32 trajectories of the calibration sampler (a random stream of their own), both the fp32 model and
the quantized bundle (correction off) predict eps at every step; per timestep group the
sufficient statistics of d = eps_q - eps against eps give the correlation coefficient k
(least squares of d on eps, per-channel intercepts), and the residual r = d - k * eps's
per-channel mean (the bias) and variance.
"""

from __future__ import annotations

import numpy as np
from dmruntime import SamplerChoice, group_lookup

from .recorder import record_trajectories

CORRECTION_STREAM = 0x97D


def estimate_correction(quantized, fp, sampling: SamplerChoice, size: int, seed: int, batch_size: int = 64,
                        progress=None, cond: dict | None = None, guidance_scale: float | None = None) -> dict:
    """The manifest's "correction" entry for ``quantized`` (a Bundle opened with correction=False),
    from pairs along ``size`` trajectories of ``sampling`` (the calibration's sampler).
    Conditional models: ``cond`` drives the trajectories; with ``guidance_scale`` both branches
    of every guided call count (the correction is applied per branch, before combining)."""
    groups = quantized.groups
    lookup = group_lookup(groups, quantized.num_train_timesteps)
    C = quantized.sample_shape[0]
    keys = ("ee", "ed", "dd", "e", "d")
    stats = [{k: np.zeros(C) for k in keys} | {"n": np.zeros(C)} for _ in groups]

    def run(x, t, c):  # both models on the fp32 trajectory
        eps = fp.predict(x, t, c) if c else fp.predict(x, t)
        return {"eps": eps, "eps_q": quantized.predict(x, t, c) if c else quantized.predict(x, t)}

    def collect(x, t, c, got):  # the pairs' sufficient statistics, per group and channel
        e = got["eps"]
        d = got["eps_q"].astype(np.float64) - e
        e = e.astype(np.float64)
        s = stats[int(lookup[t])]
        ax = tuple(i for i in range(e.ndim) if i != 1)
        s["ee"] += (e * e).sum(ax)
        s["ed"] += (e * d).sum(ax)
        s["dd"] += (d * d).sum(ax)
        s["e"] += e.sum(ax)
        s["d"] += d.sum(ax)
        s["n"] += e.size / C

    record_trajectories(run, fp.schedule, fp.sample_shape, [collect], n=size, sampling=sampling,
                        seed=[seed, CORRECTION_STREAM], batch_size=batch_size, guidance_scale=guidance_scale,
                        cond=cond, conditioning=getattr(quantized, "conditioning", None), progress=progress)
    out = []
    for g, s in zip(groups, stats):
        if not s["n"].any():  # no step fell in this group: no correction
            out.append({"index": g.index, "t_start": g.t_start, "t_end": g.t_end, "k": 0.0, "bias": [0.0] * C,
                        "var": [0.0] * C, "samples": 0, "rms_error": None, "rms_error_corrected": None})
            continue
        n = s["n"]
        # least squares of d on eps with a per-channel intercept (the bias), so a channel's mean
        # error does not leak into k
        k = float((s["ed"] - s["e"] * s["d"] / n).sum() / (s["ee"] - s["e"] ** 2 / n).sum())
        mean = (s["d"] - k * s["e"]) / n
        var = np.maximum((s["dd"] - 2 * k * s["ed"] + k * k * s["ee"]) / n - mean**2, 0)
        raw = float(np.sqrt(s["dd"].sum() / n.sum()))
        corrected = float(np.sqrt(var.mean()) / abs(1 + k))  # corrected eps - eps = (r - bias) / (1 + k)
        applied = corrected < raw
        if not applied:  # dividing by 1 + k < 1 can amplify more than the fit removes: leave eps as it is
            k, mean = 0.0, np.zeros(C)
            var = np.maximum(s["dd"] / n - (s["d"] / n) ** 2, 0)  # what stays in eps: d's own spread
        out.append({"index": g.index, "t_start": g.t_start, "t_end": g.t_end, "k": k,
                    "bias": mean.tolist(), "var": var.tolist(), "samples": int(n[0]), "applied": applied,
                    "rms_error": raw, "rms_error_corrected": corrected if applied else raw})
    sampling = sampling.resolved(fp.schedule)
    return {"method": "ptqd", "sampler": sampling.name, "steps": sampling.steps, "trajectories": size, "seed": seed, "groups": out}
