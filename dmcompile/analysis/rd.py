"""Rate-distortion curves per timestep group: D_{l,g}(b), the output distortion when only
layer l is quantized to b bits (weights; separately, its input activations), measured on
inputs that group g sees along the fp32 model's trajectories (the calibration's sampler).

Cached and resumable: progress is saved every few seconds, a rerun continues where it stopped.
``sweep="model"`` measures two weight widths per layer and fills the others in proportion to
the layer's weight-quantization noise power P(b) (exact, cheap): D(b) = c * P(b).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from dmruntime import group_lookup
from dmruntime.conditioning import cycle_rows, take_rows

from .. import scratch
from ..artifacts import CURVES, atomic_dir, write_marker
from ..calibration.recorder import record_trajectories
from ..calibration.trajectory import no_steps_error
from ..config import AnalysisConfig
from ..errors import ArtifactError
from ..parallel import SerialPool, default_threads
from ..eval.metrics import ssim
from ..quant import noise_power, weight_axis
from .probe import Probe, act_params

RD_SCHEMA_VERSION = 2  # 2: activation curves per layer input only
ANALYSIS_STREAM = 0xA1A


def distortion(ref: np.ndarray, out: np.ndarray, kind: str) -> float:
    """mse; sqnr (noise power / signal power, linear); ssim+mse ((1 - SSIM) + MSE, the paper's,
    SSIM per output image over the reference's value range, averaged)."""
    mse = float(np.mean((ref.astype(np.float64) - out) ** 2))
    if kind == "mse":
        return mse
    if kind == "sqnr":
        return mse / float(np.mean(ref.astype(np.float64) ** 2))
    rng = float(ref.max() - ref.min()) or 1.0
    return float(1.0 - np.mean(ssim(out, ref, data_range=rng))) + mse


@dataclass
class RDCurves:
    """weight[g, l, i]: distortion of layer l's weights at weight_bits[i] in group g;
    act[g, j, k]: of activation tensor j at act_bits[k]. ``measured[l, i]`` says which weight
    points were measured (the rest modelled)."""

    config: dict
    groups: list  # [(t_start, t_end)]
    layers: list  # node names of the weighted layers
    tensors: list
    weight_bits: tuple
    act_bits: tuple
    weight: np.ndarray
    act: np.ndarray
    measured: np.ndarray
    seconds: float = 0.0
    run: dict | None = None  # where the jobs ran: {"workers": N, "ray": address or None}

    def save(self, folder: Path, plot=None) -> None:
        """curves.json + curves.npz, atomically; ``plot(curves, path)``, when given, also writes
        rd_curves.png into the folder."""
        with atomic_dir(Path(folder), CURVES) as tmp:
            np.savez(tmp / "curves.npz", weight=self.weight, act=self.act, measured=self.measured)
            files = ["curves.json", "curves.npz"]
            if plot is not None:
                plot(self, tmp / "rd_curves.png")
                files.append("rd_curves.png")
            write_marker(tmp, CURVES, {
                "schema_version": RD_SCHEMA_VERSION, "config": self.config, "groups": self.groups,
                "layers": self.layers, "tensors": self.tensors, "weight_bits": list(self.weight_bits),
                "act_bits": list(self.act_bits), "seconds": self.seconds, "run": self.run}, files)

    @classmethod
    def load(cls, folder: Path) -> RDCurves:
        """Read saved curves; ArtifactError if they are missing, corrupt or of another schema."""
        try:
            meta = json.loads((Path(folder) / "curves.json").read_text())
            a = np.load(Path(folder) / "curves.npz")
        except (OSError, ValueError) as e:
            raise ArtifactError(f"cannot read RD curves in {folder}: {e}; run `dmcompile analyze` to write them") from e
        if meta.get("schema_version") != RD_SCHEMA_VERSION:
            raise ArtifactError(f"RD curves in {folder} have schema_version {meta.get('schema_version')}, this "
                                f"dmcompile reads {RD_SCHEMA_VERSION}; measure them again with `dmcompile analyze`")
        return cls(meta["config"], [tuple(g) for g in meta["groups"]], meta["layers"], meta["tensors"],
                   tuple(meta["weight_bits"]), tuple(meta["act_bits"]), a["weight"], a["act"], a["measured"],
                   meta["seconds"], meta.get("run"))


def group_inputs(fp_bundle, groups, config: AnalysisConfig, sampling, seed: int, conditioning=None,
                 cond: dict | None = None, guidance_scale: float | None = None):
    """Per group, ``config.samples_per_group`` rows (x_t, t, condition) from fp32 trajectories of
    ``sampling`` (the calibration's sampler; a random stream of their own), spread evenly over the
    group's recorded steps.
    Conditional models: ``cond`` (rows, cycled over the trajectories) drives them under
    ``conditioning`` (dmruntime's Conditioning, with its null condition); with
    ``guidance_scale`` the guided sampler runs both branches and both are recorded, as
    calibration records them. Returns X [G, n, ...], T [G, n], C (input -> [G, n, ...], or None)."""
    lookup = group_lookup(groups, fp_bundle.num_train_timesteps)
    calls = len(sampling.model_timesteps(fp_bundle.schedule))
    per_group = max(1, round(calls * (groups[0].t_end - groups[0].t_start) / fp_bundle.num_train_timesteps))
    n_traj = max(1, -(-config.samples_per_group // per_group))
    rows: dict[int, list] = {g.index: [] for g in groups}

    def collect(x, t, c, got):
        rows[int(lookup[t])].append((x.copy(), t, c))

    record_trajectories(lambda x, t, c: {"eps": fp_bundle.predict(x, t, c)}, fp_bundle.schedule,
                        fp_bundle.sample_shape, [collect], n=n_traj, sampling=sampling, seed=[seed, ANALYSIS_STREAM],
                        guidance_scale=guidance_scale, cond=cycle_rows(cond, n_traj),
                        conditioning=conditioning if conditioning else fp_bundle.conditioning)
    xs, ts, cs = [], [], []
    empty = [g for g in groups if not rows[g.index]]
    if empty:
        raise no_steps_error(empty, sampling.resolved(fp_bundle.schedule), len(groups))
    for g in groups:
        got = rows[g.index]
        x = np.concatenate([r[0] for r in got])
        t = np.concatenate([np.full(len(r[0]), r[1], np.int64) for r in got])
        pick = np.linspace(0, len(x) - 1, config.samples_per_group).round().astype(int)
        xs.append(x[pick])
        ts.append(t[pick])
        if got[0][2]:
            cs.append({k: np.concatenate([r[2][k] for r in got])[pick] for k in got[0][2]})
    C = {k: np.stack([c[k] for c in cs]) for k in cs[0]} if cs else None
    return np.stack(xs), np.stack(ts), C  # [G, n, ...], [G, n], {input: [G, n, ...]} | None


def flat_rows(C: dict | None) -> dict | None:
    """Group-major conditions {input: [G, n, ...]} as rows {input: [G * n, ...]}."""
    return None if C is None else {k: v.reshape(-1, *v.shape[2:]) for k, v in C.items()}


def _tile(cond: dict | None, times: int) -> dict | None:
    return None if cond is None else {k: np.concatenate([v] * times) for k, v in cond.items()}


def _run_chunked(probe: Probe, x, t, max_rows, weights=None, acts=None, cond=None):
    outs = []
    for i in range(0, len(x), max_rows):
        sl = slice(i, i + max_rows)
        a = {k: tuple(v[sl] for v in vals) for k, vals in (acts or {}).items()}
        outs.append(probe.run(x[sl], t[sl], weights, a, take_rows(cond, sl)))
    return np.concatenate(outs)


@dataclass
class _Rows:
    """What every batch of jobs runs on (shipped to workers once): the group inputs as rows,
    their conditions, the references and how distortion is measured."""

    x: np.ndarray
    t: np.ndarray
    c: dict | None
    G: int
    n: int
    ref_w: np.ndarray
    ref_a: np.ndarray
    kind: str
    max_rows: int
    per_group: bool


def job_batches(jobs: list, per_call: int) -> list[list]:
    """The fixed partition of the jobs into model calls: each weight job alone, activation jobs
    ``per_call`` at a time in job order. Fixed so that a job is measured in the same batch
    (the same rows, the same float results) however the run is split, resumed or distributed."""
    out, acts = [], []
    for j in jobs:
        if j[0] == "w":
            out.append([j])
        else:
            acts.append(j)
    return out + [acts[i:i + per_call] for i in range(0, len(acts), per_call)]


def _payload(probe: Probe, batch: list, act_ranges: dict, wbits, abits, G: int, n: int, per_group: bool) -> dict:
    """What a batch's call feeds beyond the rows: a weight job's fake-quantized weight (rounded
    here, where the rounding method and its moments are), or the activation jobs' per-row
    quantizer parameters."""
    layers, tensors = probe.layers, probe.tensors
    if batch[0][0] == "w":
        _, li, bi = batch[0]
        feeds = [probe.weight_feed(layers[li], wbits[bi], groups=(g,)) for g in range(G)] if per_group else \
            [probe.weight_feed(layers[li], wbits[bi])]
        return {"jobs": batch, "weights": feeds}
    rows = G * n
    acts = {}
    for p, (_, ti, ai) in enumerate(batch):
        name, bits = tensors[ti], abits[ai]
        vals = [np.zeros(rows * len(batch), np.float32) for _ in range(4)]
        vals[0][:] = 1.0
        vals[2][:] = 255.0
        if name in acts:  # a tensor twice in one call: keep both in separate slices
            vals = list(acts[name])
        for g in range(G):
            s, z, lv, on = act_params(*act_ranges[bits][g][name], bits, n)
            sl = slice(p * rows + g * n, p * rows + (g + 1) * n)
            vals[0][sl], vals[1][sl], vals[2][sl], vals[3][sl] = s, z, lv, on
        acts[name] = tuple(vals)
    return {"jobs": batch, "acts": acts}


def run_batch(shared: tuple, payload: dict) -> list[list[float]]:
    """One batch's model call(s) and each job's distortion per group (in a worker or here)."""
    probe, r = shared
    probe = probe.opened()
    G, n = r.G, r.n
    if "weights" in payload:
        if r.per_group:
            out = np.concatenate([_run_chunked(
                probe, r.x[g * n:(g + 1) * n], r.t[g * n:(g + 1) * n], r.max_rows, weights=payload["weights"][g],
                cond=take_rows(r.c, slice(g * n, (g + 1) * n))) for g in range(G)])
        else:
            out = _run_chunked(probe, r.x, r.t, r.max_rows, weights=payload["weights"][0], cond=r.c)
        out = out.reshape(G, n, *out.shape[1:])
        return [[distortion(r.ref_w[g], out[g], r.kind) for g in range(G)]]
    k = len(payload["jobs"])
    rows = G * n
    out = _run_chunked(probe, np.concatenate([r.x] * k), np.concatenate([r.t] * k), r.max_rows,
                       acts=payload["acts"], cond=_tile(r.c, k))
    return [[distortion(r.ref_a[g], o[g], r.kind) for g in range(G)]
            for o in (out[p * rows:(p + 1) * rows].reshape(G, n, *out.shape[1:]) for p in range(k))]


def measure_curves(probe: Probe, X: np.ndarray, T: np.ndarray, act_ranges: dict, config: AnalysisConfig,
            groups: list, record: dict, state_dir: Path | None = None, progress=None,
            C: dict | None = None, per_group: bool = False, pool=None) -> RDCurves:
    """Measure the curves. X, T (C: conditions, or None): [G, n, ...] group inputs, as
    :func:`group_inputs` returns them; act_ranges[bits][g][tensor] -> (lo, hi);
    groups: [(t_start, t_end)] of the G groups; record: the configs stored with the curves.
    Weights are rounded by ``probe.rounder`` as the build stores them; ``per_group``: each
    group's curve with that group's own rounding (per-group weights: GPTQ on the group's
    moments), else one rounding for all (shared weights).
    With ``state_dir``, partial results are saved there and picked up again. ``pool``
    (:mod:`dmcompile.parallel`; default: this process): where the batches of jobs run; the
    curves are the same bytes whichever runs them."""
    pool = pool or SerialPool()
    if not probe.threads:
        # With its weights fed as inputs, ONNX Runtime's result depends on the thread count: one
        # count everywhere, so that curves are the same bytes whoever measures them.
        probe.threads = default_threads()
    t0 = time.perf_counter()
    G, n = X.shape[:2]
    x, t, c = X.reshape(G * n, *X.shape[2:]), T.reshape(-1), flat_rows(C)
    wbits, abits = tuple(config.weight_bits), tuple(config.act_bits)
    layers, tensors = probe.layers, probe.tensors
    meas_bits = wbits if config.sweep == "full" else tuple(b for b in config.model_bits)
    W = np.full((G, len(layers), len(wbits)), np.nan)
    A = np.full((G, len(tensors), len(abits)), np.nan)
    partial = Path(state_dir) / "partial.npz" if state_dir else None
    elapsed0 = 0.0
    if partial and partial.is_file():
        p = np.load(partial)
        if p["weight"].shape == W.shape and p["act"].shape == A.shape:
            W, A, elapsed0 = p["weight"], p["act"], float(p["seconds"])
    # References from the same session variants as the sweeps (fp32 values fed, switches off),
    # so a distortion holds quantization error only, not graph-optimisation differences.
    w0 = probe.layers[0].weight
    ref_w = _run_chunked(probe, x, t, config.max_rows, weights={w0: probe.weights[w0]}, cond=c)
    ref_w = ref_w.reshape(G, n, *ref_w.shape[1:])
    rows_all = G * n
    off = (np.ones(rows_all, np.float32), np.zeros(rows_all, np.float32), np.full(rows_all, 255.0, np.float32),
           np.zeros(rows_all, np.float32))
    ref_a = _run_chunked(probe, x, t, config.max_rows, acts={tensors[0]: off}, cond=c)
    ref_a = ref_a.reshape(G, n, *ref_a.shape[1:])
    jobs = [("w", li, bi) for li in range(len(layers)) for bi, b in enumerate(wbits) if b in meas_bits]
    jobs += [("a", ti, ai) for ti in range(len(tensors)) for ai in range(len(abits))]
    # Activation jobs batch several perturbations into one call (rows carry their own switches).
    batches = job_batches(jobs, max(1, config.max_rows // (G * n)))
    todo = [b for b in batches if any(np.isnan((W if j[0] == "w" else A)[0, j[1], j[2]]) for j in b)]
    last_save = time.perf_counter()

    def save():
        if partial:
            partial.parent.mkdir(parents=True, exist_ok=True)
            tmp = scratch.temp_file(partial, ".npz")
            np.savez(tmp, weight=W, act=A, seconds=elapsed0 + time.perf_counter() - t0)
            tmp.replace(partial)

    done = len(jobs) - sum(len(b) for b in todo)
    shared = (probe.for_workers() if pool.workers > 1 else probe,
              _Rows(x, t, c, G, n, ref_w, ref_a, config.distortion, config.max_rows, per_group))
    payloads = (_payload(probe, b, act_ranges, wbits, abits, G, n, per_group) for b in todo)
    try:
        for i, values in pool.map(run_batch, shared, payloads, cpus=probe.threads):
            for (kind, a, b), v in zip(todo[i], values):
                (W if kind == "w" else A)[:, a, b] = v
            done += len(todo[i])
            if progress:
                progress("rd curves", done, len(jobs))
            if time.perf_counter() - last_save > 10:
                save()
                last_save = time.perf_counter()
    finally:  # an interrupted run keeps what it measured
        save()
    measured = np.array([[b in meas_bits for b in wbits] for _ in layers])
    if config.sweep == "model":
        W = model_fill(W, probe.layers, probe.weights, wbits, meas_bits, power=probe.error_power)
    return RDCurves(record, [tuple(g) for g in groups], [l.node for l in layers], list(tensors), wbits, abits, W,
                    A, measured, round(elapsed0 + time.perf_counter() - t0, 2), pool.describe())


def model_fill(W: np.ndarray, layers, weights: dict, wbits, meas_bits, power=None) -> np.ndarray:
    """Fill unmeasured widths from D(b) = c * P(b), P(b) the layer's weight-quantization noise
    power (``power(layer, bits)``; default round-to-nearest's), c fitted per group and layer
    through the measured points (geometric mean of D / P).
    Measured on digits16 this beats a two-point power law (bench_rd.py curves)."""
    W = W.copy()
    idx = [wbits.index(b) for b in meas_bits]
    power = power or (lambda layer, b: noise_power(weights[layer.weight], weight_axis(layer), b))
    for li, layer in enumerate(layers):
        P = np.array([max(power(layer, b), 1e-30) for b in wbits])
        logc = np.mean(np.log(np.maximum(W[:, li, idx], 1e-15)) - np.log(P[idx]), axis=1)
        for bi, b in enumerate(wbits):
            if b not in meas_bits:
                W[:, li, bi] = np.exp(logc) * P[bi]
    return W


def model_error(full: RDCurves, modelled_weight: np.ndarray, measured: np.ndarray) -> dict:
    """How far modelled curves are from fully measured ones, on the modelled points only."""
    from scipy.stats import spearmanr

    mask = ~measured[None].repeat(full.weight.shape[0], 0)
    a, b = full.weight[mask], modelled_weight[mask]
    rel = np.abs(np.log(np.maximum(b, 1e-12) / np.maximum(a, 1e-12)))
    return {"median_abs_log_ratio": float(np.median(rel)), "p90_abs_log_ratio": float(np.quantile(rel, 0.9)),
            "spearman": float(spearmanr(a, b).statistic), "points": int(mask.sum())}


def check_additivity(probe: Probe, X: np.ndarray, T: np.ndarray, act_ranges: dict, curves: RDCurves,
                     allocations: int = 16, act_bits: int = 8, seed: int = 0, progress=None,
                     C: dict | None = None) -> dict:
    """Predicted sum_l D_{l,g}(b_l) (+ each of ``curves.tensors``' D at ``act_bits``; the probe
    must fake-quantize the same tensors) against the
    measured distortion of the whole model quantized that way, for random weight allocations
    (each one a random mix around a random average width). Returns per group the Spearman
    rank correlation and the ratio measured / predicted."""
    from scipy.stats import spearmanr

    G, n = X.shape[:2]
    x, t, c = X.reshape(G * n, *X.shape[2:]), T.reshape(-1), flat_rows(C)
    rng = np.random.default_rng(seed)
    kind = curves.config.get("analysis", curves.config).get("distortion", "ssim+mse")
    max_rows = curves.config.get("analysis", curves.config).get("max_rows", 256)
    ai = curves.act_bits.index(act_bits)
    acts = {}
    for ti, name in enumerate(curves.tensors):
        vals = [np.empty(G * n, np.float32) for _ in range(4)]
        for g in range(G):
            for v, p in zip(vals, act_params(*act_ranges[act_bits][g][name], act_bits, n)):
                v[g * n:(g + 1) * n] = p
        acts[name] = tuple(vals)
    act_pred = curves.act[:, :, ai].sum(1)
    w0 = probe.layers[0].weight
    off = {k: (v[0], v[1], v[2], np.zeros_like(v[3])) for k, v in acts.items()}
    ref = _run_chunked(probe, x, t, max_rows, weights={w0: probe.weights[w0]}, acts=off,
                       cond=c).reshape(G, n, *X.shape[2:])
    pred, meas = [], []
    wb = np.array(curves.weight_bits)
    for k in range(allocations):
        centre = rng.uniform(wb.min(), wb.max())
        p = np.exp(-np.abs(wb - centre))
        choice = rng.choice(len(wb), size=len(probe.layers), p=p / p.sum())
        feeds = {}
        for layer, ci in zip(probe.layers, choice):
            feeds.update(probe.weight_feed(layer, int(wb[ci])))
        out = _run_chunked(probe, x, t, max_rows, weights=feeds, acts=acts, cond=c).reshape(ref.shape)
        li = [curves.layers.index(l.node) for l in probe.layers]
        pred.append(curves.weight[:, li, choice].sum(1) + act_pred)
        meas.append([distortion(ref[g], out[g], kind) for g in range(G)])
        if progress:
            progress("additivity", k + 1, allocations)
    pred, meas = np.array(pred), np.array(meas)  # [A, G]
    return {"spearman": [float(spearmanr(pred[:, g], meas[:, g]).statistic) for g in range(G)],
            "measured_over_predicted": [float(np.median(meas[:, g] / pred[:, g])) for g in range(G)],
            "predicted": pred.tolist(), "measured": meas.tolist()}
