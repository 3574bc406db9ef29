"""Calibration along the sampling trajectory, statistics bucketed by timestep group.

The fp32 ONNX model is run with every quantized tensor as an output, a piece of the graph at a
time (``pieces``); the runtime's own sampler drives it from seeded noise (``recorder.record_chunk``,
a shard of trajectories at a time), so the UNet sees exactly the inputs it sees when sampling. Each call's tensors go to the observers of the
group holding t, and with GPTQ to the layer inputs' second moments.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from dmruntime import Group, NoiseSchedule, group_lookup
from dmruntime.conditioning import Conditioning

from .. import onnxio, parallel, scratch
from ..artifacts import CALIBRATION, atomic_dir, write_marker
from ..config import CalibrationConfig
from ..errors import ArtifactError, ConfigError
from ..frontend.layermap import LayerMap
from ..targets import ORT_CPU, TargetProfile
from .hessian import MOMENTS, MomentRecorder, layer_columns
from .observers import HistogramObserver
from .checkpoint import Checkpoint
from . import pieces
from .recorder import record_chunk

CALIB_SCHEMA_VERSION = 5  # 2: cache keys carry it; 3: trajectories recorded a chunk of batch_size at a time;
# 4: tensors recorded in producer order (a call may run in pieces); 5: shards of batch_size trajectories,
# each with its own random streams, folded in order (the same bytes serial or on Ray)
CALIB_STREAM = 0xCA11B
STATE_KEYS = ("lo", "hi", "origin", "width", "count", "hist")  # a HistogramObserver's state


def equal_groups(num_train_timesteps: int, k: int) -> tuple[Group, ...]:
    """K contiguous groups of (nearly) equal length partitioning [0, T)."""
    edges = [round(num_train_timesteps * g / k) for g in range(k + 1)]
    return tuple(Group(g, edges[g], edges[g + 1]) for g in range(k))


def no_steps_error(empty: list, sampling, groups: int) -> ConfigError:
    """The error for timestep groups that no step of a run of ``sampling`` (a SamplerChoice)
    visits (``empty``, of ``groups``): what RD curves and the step-aware check would have no
    inputs for."""
    g = empty[0]
    return ConfigError(f"no step of the calibration sampler ({sampling.describe()}) falls in timestep group {g.index} [{g.t_start}, "
                       f"{g.t_end}) ({len(empty)} of {groups} groups are empty), so RD curves and the step-aware "
                       "check have no inputs there; use fewer groups (--groups) or more calibration steps "
                       "(--calib-steps)")


def groups_without_steps(schedule: NoiseSchedule, config: CalibrationConfig) -> list[Group]:
    """The groups of ``config`` that no step of its calibration sampler's run visits."""
    groups = equal_groups(schedule.num_train_timesteps, config.groups)
    lookup = group_lookup(groups, schedule.num_train_timesteps)
    seen = {int(lookup[t]) for t in config.sampling(schedule).model_timesteps(schedule)}
    return [g for g in groups if g.index not in seen]


class _Rows:
    """Which rows of each model call a collector records: calls walk the trajectories' rows in
    batch order, step after step (``total`` rows per step, ``per_trajectory`` of them for each
    trajectory: 2 when guided); ``record_steps(t)`` gives a row mask (PTQ4DM's timestep
    sampling), None records every row. ``begin_chunk`` narrows the walk to one chunk of
    trajectories (a shard, ``recorder.record_chunk``)."""

    def __init__(self, record_steps, total: int, per_trajectory: int = 1):
        self.record_steps = record_steps
        self.total, self.per = total, per_trajectory
        self.base, self.span = 0, total
        self.offset = 0

    def begin_chunk(self, first: int, rows: int) -> None:
        self.base, self.span = first * self.per, rows * self.per
        self.offset = self.base

    def mask(self, n: int, t: int) -> np.ndarray | None | bool:
        rows = slice(self.offset, self.offset + n)
        self.offset = self.base + (self.offset - self.base + n) % self.span
        return self.record_steps(t)[rows] if self.record_steps else None


class HistogramCollector:
    """Recorded rows of a call's tensors into the observers of the group holding t (big tensors
    subsampled to ``sample_per_tensor`` values by ``rng`` for the percentile/MSE search), in the
    order they are handed in (producer order, however many pieces the call is run in)."""

    def __init__(self, names, observers, rng, sample_per_tensor: int):
        self.names, self.observers = set(names), observers
        self.rng, self.sample_per_tensor = rng, sample_per_tensor

    def add(self, group: int, mask, share: dict) -> None:
        obs = self.observers[group]
        for name, value in share.items():
            if name not in self.names:
                continue
            flat = (value if mask is None else value[mask]).ravel()
            sub = None
            if flat.size > self.sample_per_tensor:
                sub = flat[self.rng.integers(0, flat.size, self.sample_per_tensor)]
            obs[name].update(flat, sub)


class _Chunks:
    """Tells the row walk where a shard's trajectories start (``record_chunk``); records
    nothing itself (the calibration run records as the pieces of a call come out)."""

    def __init__(self, rows: _Rows):
        self.rows = rows

    def begin_chunk(self, first: int, rows: int) -> None:
        self.rows.begin_chunk(first, rows)

    def __call__(self, x, t, cond, got) -> None:
        pass


@dataclass(frozen=True)
class CalibrationResult:
    """Per-group observers of every quantized tensor, and what produced them."""

    config: CalibrationConfig
    groups: tuple[Group, ...]
    tensors: tuple[str, ...]
    observers: tuple[dict, ...]  # group index -> {tensor: HistogramObserver}
    moments: Path | None = None  # folder of the layer inputs' second moments (hessian.Moments), if gathered
    run: dict | None = None  # where the shards ran: {"workers": N, "ray": address or None}

    def ranges(self, kind: str | None = None, bits: int = 8) -> list[dict[str, tuple[float, float]]]:
        """Per group, tensor -> (lo, hi). A group that recorded nothing for a tensor (PTQ4DM's
        timestep sampling can miss a group) takes the min-max range over all groups."""
        kind = kind or self.config.observer
        pooled = {n: (min(o[n].lo for o in self.observers), max(o[n].hi for o in self.observers))
                  for n in self.tensors}
        return [{n: obs[n].range(kind, bits, self.config.percentile) if obs[n].count else
                 (min(pooled[n][0], 0.0), max(pooled[n][1], 0.0)) for n in self.tensors} for obs in self.observers]

    def save(self, folder: Path, move_moments: bool | None = None) -> "CalibrationResult":
        """calibration.json (settings, groups, chosen ranges) + histograms.npz (+ the second
        moments' folder, moved when ``move_moments`` (default: when it is a temporary), else
        copied), atomically. Returns the result as saved (moments there)."""
        with atomic_dir(Path(folder), CALIBRATION) as tmp:
            files = ["calibration.json", "histograms.npz"]
            if self.moments is not None:  # a fresh pass's temporary folder moves in; a saved one is copied
                fresh = scratch.is_temporary(self.moments) if move_moments is None else move_moments
                (shutil.move if fresh else shutil.copytree)(str(self.moments), tmp / MOMENTS)
                scratch.release(self.moments)
                files.append(MOMENTS)
            arrays = {}
            for g, obs in enumerate(self.observers):
                for i, n in enumerate(self.tensors):
                    for k, v in obs[n].state().items():
                        arrays[f"g{g}_t{i}_{k}"] = np.asarray(v)
            np.savez_compressed(tmp / "histograms.npz", **arrays)
            ranges = self.ranges()
            write_marker(tmp, CALIBRATION, {
                "schema_version": CALIB_SCHEMA_VERSION, "config": self.config.to_dict(),
                "groups": [{"index": g.index, "t_start": g.t_start, "t_end": g.t_end} for g in self.groups],
                "tensors": list(self.tensors),
                "ranges": [{n: list(r[n]) for n in self.tensors} for r in ranges],
                "counts": [{n: obs[n].count for n in self.tensors} for obs in self.observers],
                "run": self.run,
            }, files)
        return dataclasses.replace(self, moments=Path(folder) / MOMENTS if self.moments is not None else None)

    @classmethod
    def load(cls, folder: Path) -> "CalibrationResult":
        """Read a saved calibration; ArtifactError if it is corrupt or of another schema version."""
        try:
            meta = json.loads((Path(folder) / "calibration.json").read_text())
            arrays = np.load(Path(folder) / "histograms.npz")
        except (OSError, ValueError) as e:
            raise ArtifactError(f"cannot read calibration {folder}: {e}; delete the folder to recalibrate") from e
        if meta.get("schema_version") != CALIB_SCHEMA_VERSION:
            raise ArtifactError(f"calibration {folder} has schema_version {meta.get('schema_version')}, this "
                                f"dmcompile reads {CALIB_SCHEMA_VERSION}; delete the folder to recalibrate")
        tensors = tuple(meta["tensors"])
        observers = []
        for g in range(len(meta["groups"])):
            observers.append({n: HistogramObserver.from_state(
                {k: arrays[f"g{g}_t{i}_{k}"] for k in STATE_KEYS})
                for i, n in enumerate(tensors)})
        groups = tuple(Group(d["index"], d["t_start"], d["t_end"]) for d in meta["groups"])
        moments = Path(folder) / MOMENTS
        return cls(CalibrationConfig.from_dict(meta["config"]), groups, tensors, tuple(observers),
                   moments if (moments / "moments.json").is_file() else None, meta.get("run"))


def _ptq4dm_steps(timesteps: np.ndarray, n: int, T: int, rng: np.random.Generator) -> np.ndarray:
    """PTQ4DM's normally distributed time-step calibration: each trajectory is recorded at the
    one step nearest a timestep drawn from N(0.4 T, 0.2 T) (clipped to [0, T)); the step of each."""
    target = np.clip(rng.normal(0.4 * T, 0.2 * T, n), 0, T - 1)
    return timesteps[np.abs(timesteps[None, :] - target[:, None]).argmin(1)]


@dataclass
class _Pass:
    """What every shard of a calibration pass needs; shipped once to each Ray worker (the graph
    through the object store when small, else read from ``source``, a path all nodes see)."""

    model: object  # onnx.ModelProto without its external weights, or None: read ``source``
    source: Path
    base_dir: Path | None
    names: tuple[str, ...]  # the tensors whose histograms are kept
    recorded: tuple[str, ...]  # those and the moments' layer inputs
    scheduler_config: dict
    config: CalibrationConfig
    conditioning: Conditioning
    conditions: dict | None  # one row per trajectory
    chosen: np.ndarray | None  # PTQ4DM: the step each trajectory is recorded at
    columns: dict | None  # second moments: the layers' columns, in producer order
    moment_groups: int | None
    sample_shape: tuple[int, ...] = ()
    progress: object = None  # a serial pass's step callback (workers report per shard)
    threads: int = 0  # ONNX Runtime's intra-op threads (0: all cores; 1 on Ray workers, one task per CPU)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("progress", "_session")}

    def session(self, feeds: dict):
        """The pass's piecewise session, cut at the first call's shapes, kept for its shards."""
        if getattr(self, "_session", None) is None:
            import onnxruntime as ort

            model, base_dir = parallel.opened(self.model, self.source, self.base_dir)
            so = ort.SessionOptions()
            so.intra_op_num_threads = self.threads
            if onnxio.external_files(model):
                # A big model (SD 1.5: every quantized tensor an output is GBs per call): without the
                # arena that memory goes back after each call. Measured on sd15-unet: build peak 18.5 ->
                # 14.8 GB, calibration 2.5x slower, so small models keep the arena.
                so.enable_cpu_mem_arena = False
                so.enable_mem_pattern = False
            self._session = pieces.open_session(model, self.recorded, feeds, so, base_dir=base_dir)
        return self._session


def record_shard(p: _Pass, job: tuple) -> dict:
    """Shard ``k`` of a pass (trajectories ``k * batch_size`` on): its own histograms, random
    streams and, with moments, sums in ``folder``; returned to be folded in shard order."""
    k, folder = job
    cfg = p.config
    schedule = NoiseSchedule.from_config(p.scheduler_config)
    groups = equal_groups(schedule.num_train_timesteps, cfg.groups)
    lookup = group_lookup(groups, schedule.num_train_timesteps)
    observers = tuple({n: HistogramObserver(cfg.bins) for n in p.names} for _ in groups)
    histograms = HistogramCollector(p.names, observers, np.random.default_rng([cfg.seed + 7, k]), cfg.sample_per_tensor)
    recorder = None
    if p.columns is not None:
        shutil.rmtree(folder, ignore_errors=True)  # a shard run again (its worker died) starts afresh
        recorder = MomentRecorder(Path(folder), p.columns, p.moment_groups, cfg.seed, stream=k)
    per = 2 if cfg.guidance_scale is not None else 1  # guided: both branches
    rows = _Rows((lambda t: p.chosen == t) if p.chosen is not None else None, cfg.size * per, per)
    outputs = None

    def run(x, t, cond):
        nonlocal outputs
        feeds = {"sample": x, "timestep": np.full(len(x), t, np.int64), **(cond or {})}
        session = p.session(feeds)
        outputs = outputs or set(session.outputs)
        keep = rows.mask(len(x), t)
        record = keep is None or keep.any()
        group = int(lookup[t])
        out = {}
        for share in session.run(feeds):
            if record:
                histograms.add(group, keep, share)
                if recorder is not None:
                    recorder.add(group, {n: v if keep is None else v[keep] for n, v in share.items()
                                         if n in recorder.tensors})
            out.update((o, share[o]) for o in outputs if o in share)
        return out

    record_chunk(run, schedule, p.sample_shape, [_Chunks(rows)], n=cfg.size, sampling=cfg.sampling(schedule),
                 seed=[cfg.seed, CALIB_STREAM], chunk=cfg.batch_size, index=k, guidance_scale=cfg.guidance_scale,
                 cond=p.conditions, conditioning=p.conditioning, progress=p.progress and (lambda i, n: p.progress(k, i)))
    if recorder is not None:
        recorder.close()
    return {"observers": _observer_arrays(observers, p.names),
            "counts": {s: c.tolist() for s, c in recorder.counts.items()} if recorder else None}


def calibrate_trajectories(fp_model_path: Path, layer_map: LayerMap, scheduler_config: dict, config: CalibrationConfig,
              profile: TargetProfile = ORT_CPU, progress=None, conditioning: Conditioning | None = None,
              conditions: dict | None = None, moments: str | None = None,
              work_dir: Path | None = None, checkpoint: Path | None = None, pool=None) -> CalibrationResult:
    """Run ``config.size`` trajectories of the calibration sampler through the fp32 ONNX
    model and return per-group statistics of every tensor ``profile`` may quantize (for all
    quantizable layers, so that builds which keep some layers float reuse the calibration).
    Conditional models: ``conditions`` (one row per trajectory) drive the trajectories, and with
    ``config.guidance_scale`` the guided sampler runs both branches, so both are recorded.
    ``moments``: also gather every weighted layer's input second moments (GPTQ rounding), in
    the same pass: ``"pooled"`` over all recorded steps, or ``"groups"`` (one per timestep
    group, and pooled); kept under ``work_dir`` (a temporary folder there) until saved.

    The pass is cut into shards of ``config.batch_size`` trajectories, each with histograms,
    random streams and moment sums of its own, folded in shard order: the result is the same
    bytes whether the shards run here one after another or as Ray tasks (``pool``, see
    :mod:`dmcompile.parallel`) in any order. ``checkpoint``: a folder where the pass commits
    after every shard folded and from which an interrupted pass resumes (the same result as one
    never stopped; :mod:`dmcompile.calibration.checkpoint`); shards' moment sums are written
    under it (with Ray on several nodes, the cache must be on a filesystem they all see)."""
    pool = pool or parallel.SerialPool()
    model = onnxio.load(fp_model_path, weights=False)  # the weights stay on disk (big models)
    names = profile.quantized_tensors(model, layer_map.layers)
    ckpt = Checkpoint.open(checkpoint, {"config": config.to_dict(), "tensors": list(names), "moments": moments,
                                        "schema_version": CALIB_SCHEMA_VERSION}) \
        if checkpoint is not None else None
    recorder = columns = None
    if moments is not None:
        if moments not in ("pooled", "groups"):
            raise ValueError(f"moments must be 'pooled' or 'groups', got {moments!r}")
        if work_dir is not None:
            scratch.reclaim(work_dir)  # moments of passes killed before they were saved
        # the sums live in the checkpoint when there is one (begin() puts them there), else in a temporary
        folder = ckpt.work_folder() if ckpt is not None else \
            scratch.temp_dir(work_dir or Path(tempfile.gettempdir()), "moments")
        columns = layer_columns(model, layer_map.layers)
        rank = {t: i for i, t in enumerate(pieces.producer_order(model, {c.tensor: 0 for c in columns.values()}))}
        columns = dict(sorted(columns.items(), key=lambda kv: rank[kv[1].tensor]))  # the order calls hand them in
        recorder = MomentRecorder(folder, columns, config.groups if moments == "groups" else None, config.seed)
    schedule = NoiseSchedule.from_config(scheduler_config)
    groups = equal_groups(schedule.num_train_timesteps, config.groups)
    observers = tuple({n: HistogramObserver(config.bins) for n in names} for _ in groups)
    chosen = None
    if config.timesteps == "ptq4dm":
        chosen = _ptq4dm_steps(config.sampling(schedule).model_timesteps(schedule), config.size,
                               schedule.num_train_timesteps, np.random.default_rng(config.seed + 7))
    conditioning = conditioning or Conditioning.none()
    if conditions and conditioning is not None:
        conditions = conditioning.check(conditions, config.size)
    recorded = tuple(dict.fromkeys([*names, *sorted(recorder.tensors - set(names) if recorder else ())]))
    shards = -(-config.size // config.batch_size)
    calls = len(config.sampling(schedule).resolved(schedule).model_timesteps(schedule))
    step = None
    if progress is not None and pool.workers == 1:
        def step(k, i):
            progress(k * calls + i, shards * calls)
    base = Path(fp_model_path).parent
    dims = next(i for i in model.graph.input if i.name == "sample").type.tensor_type.shape.dim[1:]
    p = _Pass(model, Path(fp_model_path), base, tuple(names), recorded, scheduler_config, config, conditioning,
              conditions, chosen, columns, config.groups if moments == "groups" else None,
              tuple(int(d.dim_value) for d in dims), step)
    if pool.workers > 1:
        shipped, _ = parallel.portable(model, base)
        p = dataclasses.replace(p, model=shipped, progress=None, threads=1)
    shard_root = (ckpt.folder / "shards") if ckpt is not None else \
        (scratch.temp_dir(work_dir or Path(tempfile.gettempdir()), "shards") if recorder is not None else None)
    done = _resume(ckpt, observers, names, recorder)
    if done and progress is not None:
        progress(f"calibration: resuming after {done} of {config.size} trajectories (checkpoint {ckpt.folder})", 0, 0)
    first = -(-done // config.batch_size)
    jobs = [(k, str(shard_root / f"{k:05d}") if shard_root is not None else None) for k in range(first, shards)]
    waiting: dict[int, dict] = {}
    nxt = first
    try:
        if ckpt is not None:
            ckpt.begin(recorder)
        for i, res in pool.map(record_shard, p, jobs):
            waiting[jobs[i][0]] = res
            while nxt in waiting:  # fold in shard order, whatever order they finished in
                _fold(waiting.pop(nxt), observers, names, recorder, columns, config, jobs[nxt - first][1])
                nxt += 1
                end = min(nxt * config.batch_size, config.size)
                if ckpt is not None:
                    ckpt.commit(end, _observer_arrays(observers, names),
                                {"moments": recorder.state() if recorder else None}, recorder)
                    if end < config.size:
                        ckpt.begin(recorder)
                if progress is not None and pool.workers > 1:
                    progress(nxt * calls, shards * calls)
        if recorder is not None:
            if ckpt is not None:
                ckpt.finishing()
            recorder.finish()
    except BaseException:
        if recorder is not None and ckpt is None:  # no half-measured moments left behind
            shutil.rmtree(recorder.folder, ignore_errors=True)
            scratch.release(recorder.folder)
        raise
    finally:
        if ckpt is not None:
            ckpt.close()
        if shard_root is not None and ckpt is None:
            shutil.rmtree(shard_root, ignore_errors=True)
            scratch.release(shard_root)
    return CalibrationResult(config, groups, tuple(names), observers, recorder.folder if recorder else None,
                             pool.describe())


def _fold(res: dict, observers, names, recorder: MomentRecorder | None, columns, config, folder) -> None:
    """Add one shard's histograms and moment sums to the pass's."""
    arrays = res["observers"]
    for g, obs in enumerate(observers):
        for i, n in enumerate(names):
            obs[n].merge(HistogramObserver.from_state({k: arrays[f"g{g}_t{i}_{k}"] for k in STATE_KEYS}))
    if recorder is not None:
        shard = MomentRecorder(Path(folder), columns, recorder.groups, config.seed)
        shard.counts = {s: np.asarray(c, np.int64) for s, c in res["counts"].items()}
        recorder.absorb(shard)


def _observer_arrays(observers, names) -> dict[str, np.ndarray]:
    return {f"g{g}_t{i}_{k}": np.asarray(v) for g, obs in enumerate(observers) for i, n in enumerate(names)
            for k, v in obs[n].state().items()}


def _resume(ckpt: Checkpoint | None, observers, names, recorder: MomentRecorder | None) -> int:
    """Trajectories a checkpoint holds (0 without one), its state put back into the pass's."""
    state = ckpt.load() if ckpt is not None else None
    if state is None:
        return 0
    arrays = state["observers"]
    for g, obs in enumerate(observers):
        for i, n in enumerate(names):
            obs[n] = HistogramObserver.from_state({k: arrays[f"g{g}_t{i}_{k}"] for k in STATE_KEYS})
    if recorder is not None:
        recorder.restore(state["json"]["moments"])  # the sums: begin() copies the checkpoint's
    return state["done"]
