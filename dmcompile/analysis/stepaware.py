"""PTQD's step-aware activation precision: per timestep group, the lowest activation width
whose quantized-output SNR stays above the noise schedule's SNR in that group.

SNR_q(b) = |eps|^2 / |eps_q(b) - eps|^2 of the UNet output with the bundle's weights and every
quantized activation at b bits (this group's calibrated ranges), on the group's inputs;
SNR_schedule = alpha_t / (1 - alpha_t) at the group's smallest timestep (the most demanding
one). Where quantization noise is far below the noise the schedule itself carries, fewer
activation bits do no harm.
"""

from __future__ import annotations

import numpy as np

from .probe import Probe, act_params


def select_activation_bits(probe: Probe, X: np.ndarray, T: np.ndarray, act_ranges: dict, weight_bits: np.ndarray,
                           schedule, groups, candidates: tuple[int, ...], deployable: tuple[int, ...],
                           C: dict | None = None) -> dict:
    """weight_bits: [G, L] widths of probe.layers per group; X, T, C: group inputs (C: their
    conditions, or None). Returns the manifest record."""
    out = []
    for g in groups:
        x, t = X[g.index], T[g.index]
        c = None if C is None else {k: v[g.index] for k, v in C.items()}
        n = len(x)
        feeds = {}
        for layer, b in zip(probe.layers, weight_bits[g.index]):
            feeds.update(probe.weight_feed(layer, None if b is None else int(b)))
        w0 = probe.layers[0].weight
        off = {name: (np.ones(n, np.float32), np.zeros(n, np.float32), np.full(n, 255.0, np.float32),
                      np.zeros(n, np.float32)) for name in probe.tensors}
        ref = probe.run(x, t, weights={w0: probe.weights[w0]}, acts=off, cond=c).astype(np.float64)
        snr = {}
        for b in candidates:
            acts = {name: act_params(*act_ranges[b][g.index][name], b, n) for name in probe.tensors}
            q = probe.run(x, t, weights=feeds, acts=acts, cond=c).astype(np.float64)
            snr[b] = float(10 * np.log10(np.sum(ref**2) / max(np.sum((q - ref) ** 2), 1e-30)))
        a = schedule.alpha(g.t_start)
        sched = float(10 * np.log10(a / (1 - a)))
        ok = [b for b in sorted(candidates) if snr[b] >= sched]
        out.append({"index": g.index, "t_start": g.t_start, "t_end": g.t_end, "schedule_snr_db": sched,
                    "quantized_snr_db": {str(b): v for b, v in snr.items()},
                    "selected_bits": ok[0] if ok else max(candidates), "meets_schedule": bool(ok)})
    note = ("selection only: this target runs activations as uint8 (no integer kernels narrower than 8 "
            "bits), so the engines keep 8-bit activations" if tuple(deployable) == (8,) else "selection only")
    return {"candidates": list(candidates), "deployable": list(deployable), "groups": out, "applied": False,
            "note": note}
