"""The Python API: one function per stage, artefact in, artefact out.

    import dmcompile.api as dm
    model = dm.load_model("digits16")
    result = dm.export(model, "build/digits16-fp")
    images = dm.sample("build/digits16-fp", dm.SampleConfig(n=16))
    report = dm.evaluate("build/digits16-fp")
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
from dmruntime import Bundle, DDIMSampler

from . import __version__
from .config import AnalysisConfig, BuildConfig, CalibrationConfig, EvalConfig, ExportConfig, SampleConfig
from .errors import ModelError
from .frontend.export import ExportResult, export_model
from .frontend.load import LoadedModel, load_model
from .frontend.torch_model import TorchEpsModel

__all__ = ["AnalysisConfig", "analyze", "BuildConfig", "BuildResult", "CalibrationConfig", "EvalConfig", "EvalResult", "ExportConfig",
           "SampleConfig", "build", "cache_dir", "calibrate", "digit_scores", "evaluate", "export",
           "fp_bundle", "load_model", "open_bundle", "reference_model", "sample", "sample_model"]


def export(model: LoadedModel | str | Path | None, out: str | Path,
           config: ExportConfig = ExportConfig()) -> ExportResult:
    """Trace a model (LoadedModel, zoo name or folder; None = digits16) to an fp32 export folder."""
    if not isinstance(model, LoadedModel):
        model = load_model(model, seed=config.seed)
    return export_model(model, Path(out), config)


def cache_dir() -> Path:
    """Where cached artefacts (fp32 exports) live: $DMCOMPILE_CACHE or ~/.cache/dmcompile."""
    return Path(os.environ.get("DMCOMPILE_CACHE", Path.home() / ".cache" / "dmcompile"))


def _model_key(model: LoadedModel, config: ExportConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([__version__, model.id, model.seed, model.unet_config, model.scheduler_config,
                         config.to_dict()], sort_keys=True, default=str).encode())
    for name, p in sorted(model.unet.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def fp_bundle(model: LoadedModel | str | Path | None, config: ExportConfig = ExportConfig()) -> Path:
    """The fp32 export folder of a model, exported once and cached by weights and config."""
    if not isinstance(model, LoadedModel):
        model = load_model(model, seed=config.seed)
    path = cache_dir() / "exports" / f"{model.id.replace('/', '_')}-{_model_key(model, config)}"
    if not (path / "manifest.json").is_file():
        export_model(model, path, config)
    return path


def open_bundle(path: str | Path, threads: int = 0, correction: bool = True) -> Bundle:
    """Open a bundle or export folder with dmruntime, turning a model name into a clear error.
    ``correction``: apply the bundle's PTQD noise correction when it has one."""
    p = Path(path)
    if not (p / "manifest.json").exists() and (p.name in _zoo_names() or (p / "config.json").exists()):
        raise ModelError(f"{path} is a model, not a bundle: export or build it first, or pass --fp to sample "
                         "its full-precision model")
    return Bundle.open(p, threads=threads, correction=correction)


def _zoo_names() -> list[str]:
    from . import zoo

    return zoo.names()


def reference_model(bundle: Bundle) -> LoadedModel:
    """The full-precision PyTorch model a bundle was compiled from (from its manifest)."""
    m = bundle.manifest["model"]
    if m["source"] in ("zoo", "preset"):
        return load_model(m["id"], seed=m.get("seed") or 0)
    return load_model(m["source"])


def sample_model(model, config: SampleConfig = SampleConfig(), progress=None) -> np.ndarray:
    """DDIM samples from anything with the runtime's model interface (Bundle, TorchEpsModel)."""
    sampler = DDIMSampler(model, steps=config.steps, eta=config.eta, batch_size=config.batch_size)
    return sampler.sample(config.n, seed=config.seed, progress=progress)


def sample(target: str | Path, config: SampleConfig = SampleConfig(), fp: bool = False, progress=None,
           correction: bool = True) -> np.ndarray:
    """Sample a bundle folder through dmruntime. With ``fp``, ``target`` may also be a model
    (zoo name or folder) and its cached fp32 ONNX export is sampled instead."""
    if fp:
        p = Path(target)
        if (p / "manifest.json").is_file():
            bundle = Bundle.open(p)
            if bundle.manifest.get("format") != "fp32":
                bundle = Bundle.open(fp_bundle(reference_model(bundle)))
        else:
            bundle = Bundle.open(fp_bundle(str(target)))
    else:
        bundle = open_bundle(target, correction=correction)
    return sample_model(bundle, config, progress=progress)


@functools.cache
def real_digit_features() -> np.ndarray:
    """Classifier features of the 1797 real digits (computed once per process)."""
    from .zoo.data import load_digits16

    return _scorer()(load_digits16()[0])[0]


@functools.cache
def _scorer():
    from .eval.classifier import DigitScorer

    return DigitScorer()


def digit_scores(images: np.ndarray, threshold: float = 0.9) -> dict:
    """FD to the real digits, confident-class rate and class histogram of [N, 1, 16, 16] samples."""
    from .eval.metrics import confident_rate, frechet_distance

    feats, probs = _scorer()(images)
    return {"fd_to_real": frechet_distance(feats, real_digit_features()),
            "confident_rate": confident_rate(probs, threshold),
            "class_histogram": np.bincount(probs.argmax(1), minlength=10).tolist(),
            "features": feats}


def is_digits_shape(shape) -> bool:
    return tuple(shape) == (1, 16, 16)


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """The JSON-able report and the evaluated bundle's samples."""

    report: dict
    images: np.ndarray


def evaluate(target: str | Path, config: EvalConfig = EvalConfig(), progress=None, correction: bool = True) -> EvalResult:
    """Fidelity of a bundle against its full-precision PyTorch model, same seeds.

    Paired PSNR / SSIM between the bundle's and the reference's samples; for digits models
    also FD to the real digits, the FP noise floor (FD between two FP sample sets with
    different seeds), FD of the bundle's samples to that second FP set (comparable with the
floor) and confident-class rates.
    """
    from .eval.metrics import frechet_distance, psnr, ssim

    bundle = open_bundle(target, correction=correction)
    ref = TorchEpsModel(reference_model(bundle))
    sc = config.sample
    got = sample_model(bundle, sc, progress=progress and (lambda i, n: progress("bundle", i, n)))
    want = sample_model(ref, sc, progress=progress and (lambda i, n: progress("fp reference", i, n)))
    p, s = psnr(got, want), ssim(got, want)
    report = {
        "schema_version": 1, "target": str(target), "format": bundle.manifest.get("format"),
        "model": bundle.manifest["model"]["id"], "config": config.to_dict(),
        "correction": bundle.corrections is not None,
        "paired_vs_fp": {"psnr_db_mean": float(np.mean(np.minimum(p, 200.0))), "psnr_db_median": float(np.median(p)),
                         "ssim_mean": float(np.mean(s)), "max_abs_diff": float(np.max(np.abs(got - want)))},
    }
    if is_digits_shape(bundle.sample_shape):
        floor_cfg = dataclasses.replace(sc, seed=sc.seed + config.floor_seed_offset)
        other = sample_model(ref, floor_cfg, progress=progress and (lambda i, n: progress("fp noise floor", i, n)))
        mine = digit_scores(got, config.confident_threshold)
        fp = digit_scores(want, config.confident_threshold)
        fp2 = digit_scores(other, config.confident_threshold)
        real = real_digit_features()
        halves = np.random.default_rng(sc.seed).permutation(len(real))
        report["digits"] = {
            "fd_to_real": mine["fd_to_real"], "fp_fd_to_real": fp["fd_to_real"],
            "noise_floor_fd": frechet_distance(fp["features"], fp2["features"]),
            # The real set's own sampling noise: FD between two random halves of the real digits.
            "real_halves_fd": frechet_distance(real[halves[::2]], real[halves[1::2]]),
            "fd_to_fp": frechet_distance(mine["features"], fp2["features"]),
            "confident_rate": mine["confident_rate"], "fp_confident_rate": fp["confident_rate"],
            "class_histogram": mine["class_histogram"],
        }
    return EvalResult(report, got)


def calibrate(model: LoadedModel | str | Path | None, config: CalibrationConfig = CalibrationConfig(),
              progress=None):
    """Per-group activation statistics along DDIM trajectories of the fp32 model; cached on
    disk by model and config (``cache_dir()/calib``), so rebuilding with other lowering
    options does not recalibrate."""
    return _calibrate(fp_bundle(model), config, progress)


def _calibrate(fp: Path, config: CalibrationConfig, progress=None):
    from .calibration.trajectory import CalibrationResult
    from .calibration.trajectory import calibrate as run_calibration
    from .frontend.layermap import LayerMap

    from .calibration.trajectory import CALIB_SCHEMA_VERSION

    # The schema version is in the key so that calibrations cached by older code are not reused.
    key = hashlib.sha256(json.dumps([CALIB_SCHEMA_VERSION, config.to_dict()], sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / "calib" / f"{fp.name}-{key}"
    if (path / "calibration.json").is_file():
        return CalibrationResult.load(path)
    manifest = json.loads((fp / "manifest.json").read_text())
    result = run_calibration(fp / "model.onnx", LayerMap.load(fp / "layer_map.json"), manifest["scheduler"],
                             config, progress=progress)
    result.save(path)
    return result


def analyze(model: LoadedModel | str | Path | None, config: AnalysisConfig = AnalysisConfig(),
            calibration: CalibrationConfig = CalibrationConfig(), out: str | Path | None = None, progress=None):
    """Rate-distortion curves per timestep group (RDCurves), cached by model, calibration and
    analysis config under ``cache_dir()/rd`` and resumable; copied to ``out`` when given."""
    if not isinstance(model, LoadedModel):
        model = load_model(model)
    fp = fp_bundle(model)
    calib = _calibrate(fp, calibration, progress=progress and (lambda i, n: progress("calibrate", i, n)))
    curves = _analyze(fp, calib, config, progress)
    if out is not None:
        curves.save(Path(out))
    return curves


def _analyze(fp: Path, calib, config: AnalysisConfig, progress=None):
    import onnx

    from .analysis.probe import make_probe
    from .analysis.rd import RDCurves, group_inputs
    from .analysis.rd import analyze as run_analysis
    from .calibration.trajectory import layer_input_tensors
    from .frontend.layermap import LayerMap

    key = _rd_key(calib.config.to_dict(), config.to_dict())
    path = cache_dir() / "rd" / f"{fp.name}-{key}"
    if (path / "curves.json").is_file():
        return RDCurves.load(path)
    layer_map = LayerMap.load(fp / "layer_map.json")
    proto = onnx.load(str(fp / "model.onnx"))
    bundle = Bundle.open(fp)
    # Activation curves are per layer input (the Conv outputs the bundle also quantizes, for
    # fusion, are not a layer's choice).
    probe = make_probe(proto, layer_map, layer_input_tensors(proto, layer_map), bundle.sample_shape)
    X, T = group_inputs(bundle, calib.groups, config, calib.config.steps, config.seed)
    ranges = {b: calib.ranges(bits=b) for b in config.act_bits}
    curves = run_analysis(probe, X, T, ranges, config, state_dir=path.with_name(path.name + ".partial"),
                          progress=progress)
    curves.groups = [(g.t_start, g.t_end) for g in calib.groups]
    curves.config = {"analysis": config.to_dict(), "calibration": calib.config.to_dict()}
    curves.save(path)
    import shutil

    shutil.rmtree(path.with_name(path.name + ".partial"), ignore_errors=True)
    return curves


def _rd_key(calibration: dict, analysis: dict) -> str:
    from .analysis.rd import RD_SCHEMA_VERSION
    from .calibration.trajectory import CALIB_SCHEMA_VERSION

    versions = [RD_SCHEMA_VERSION, CALIB_SCHEMA_VERSION]
    return hashlib.sha256(json.dumps([versions, calibration, analysis], sort_keys=True).encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """The bundle folder and what the build measured."""

    path: Path
    manifest: dict


def build(model: LoadedModel | str | Path | None, out: str | Path, config: BuildConfig = BuildConfig(),
          progress=None) -> BuildResult:
    """Compile a model into a bundle: per timestep group, activation scales calibrated on the
    inputs that group sees. ``w8a8``: int8 weights everywhere. ``mixed``: per-layer weight
    widths chosen by rate-distortion allocation under ``config.budget`` (or given explicitly),
    4-bit weights stored packed. Groups with the same weights share one fused integer ONNX
    Runtime engine and feed it their own scales, zero points and int32 biases (group_XX.npz).
    The folder is written to a temporary path and renamed when complete."""
    import time

    import onnx

    from .artifacts import atomic_dir, write_manifest
    from .backends import onnxruntime as backend
    from .backends.onnxruntime import (ENGINE_FILE, WEIGHTS_FILE, externalize_weights, fusion_report, merge_groups,
                                       optimize_for_cpu)
    from .frontend.layermap import LayerMap
    from .lowering.precision import quantized_nodes
    from .lowering.profiles import PROFILES
    from .lowering.qdq import lower_group, quantize_weight, weight_axis

    t0 = time.perf_counter()
    if not isinstance(model, LoadedModel):
        model = load_model(model, seed=config.seed)
    fp = fp_bundle(model)
    layer_map = LayerMap.load(fp / "layer_map.json")
    qnodes = quantized_nodes(layer_map, config.float_layers)
    profile = PROFILES[config.profile]
    calib = _calibrate(fp, config.calibration, progress=progress and (lambda i, n: progress("calibrate", i, n)))
    ranges = calib.ranges()
    fp_proto = onnx.load(str(fp / "model.onnx"))
    wlayers = [l for l in layer_map.layers if l.node in qnodes and l.weight]
    groups = calib.groups
    K = len(groups)
    plan = None
    if config.format == "mixed":
        bits, plan = _mixed_bits(fp, layer_map, wlayers, qnodes, calib, config, profile, progress)
    else:
        bits = np.full((K, len(wlayers)), 8)
    inits = {i.name: i for i in fp_proto.graph.initializer}
    qcache = {}

    def weights_of(g: int) -> dict:
        out = {}
        for l, b in zip(wlayers, bits[g]):
            if (l.weight, int(b)) not in qcache:
                w = onnx.numpy_helper.to_array(inits[l.weight])
                qcache[(l.weight, int(b))] = quantize_weight(w, weight_axis(l), int(b))
            out[l.weight] = qcache[(l.weight, int(b))]
        return out

    fused = []
    for g in groups:
        fused.append(optimize_for_cpu(lower_group(fp_proto, layer_map, qnodes, weights_of(g.index),
                                                  ranges[g.index], profile)))
        if progress:
            progress("lower", g.index + 1, K)
    # Groups with the same weight widths share one engine (their weights are byte-identical).
    sets: dict[tuple, list[int]] = {}
    for g in range(K):
        sets.setdefault(tuple(int(b) for b in bits[g]), []).append(g)
    engine_of, params, engines = {}, [None] * K, {}
    for i, gids in enumerate(sets.values()):
        merged, ps = merge_groups([fused[g] for g in gids])
        name = ENGINE_FILE if len(sets) == 1 else f"unet_{i}.onnx"
        engines[name] = merged
        for g, p in zip(gids, ps):
            engine_of[g], params[g] = name, p
    group_files = [f"group_{g.index:02d}.npz" for g in groups]
    with atomic_dir(Path(out)) as tmp:
        fusion, engines_meta, weights_meta, stored = {}, {}, None, {}
        for name, merged in engines.items():
            fusion[name] = fusion_report(merged)
            if config.format == "mixed":
                gbits = dict(zip((l.weight for l in wlayers), bits[_first_group_of(engine_of, name)]))
                engines_meta[name] = {"external_weights": externalize_weights(merged, gbits, stored)}
        files = backend.save_engine(tmp, engines, params, group_files)
        if config.format == "mixed":
            weights_meta = _save_weights(tmp / WEIGHTS_FILE, stored)
            files.append(WEIGHTS_FILE)
        from dmruntime.weights import storage_bits

        body = {
            "format": config.format, "profile": profile.name,
            "model": model.describe(), "scheduler": model.scheduler_config,
            "groups": [{"index": g.index, "t_start": g.t_start, "t_end": g.t_end, "engine": engine_of[g.index],
                        "inputs": f} for g, f in zip(groups, group_files)],
            "engine": {"file": sorted(engines)[0], "runtime": "onnxruntime", "onnxruntime_version": _ort_version(),
                       "group_inputs": sorted(params[0])},
            "precision": {"activation_dtype": profile.activation_dtype, "layers": _precision_layers(
                layer_map, qnodes, wlayers, bits, profile, storage_bits)},
            "calibration": calib.config.to_dict(),
            "build": {"config": config.to_dict(), "fusion": fusion[ENGINE_FILE] if len(fusion) == 1 else
                      {"ratio": min(f["ratio"] for f in fusion.values()), "engines": fusion}},
        }
        if engines_meta:
            body["engines"] = engines_meta
            body["weights"] = weights_meta
        if plan:
            body["plan"] = plan
        write_manifest(tmp, body, files)
        if config.correction:
            from .calibration.correction import estimate_correction

            body["correction"] = estimate_correction(
                Bundle.open(tmp, correction=False), Bundle.open(fp), calib.config.steps, config.correction_size,
                config.seed, progress=progress and (lambda i, n: progress("correction", i, n)))
            write_manifest(tmp, body, files)
        if config.step_aware:
            body["step_aware_activation"] = _step_aware(fp, layer_map, wlayers, bits, calib, config, profile)
            write_manifest(tmp, body, files)
        if config.eval_samples:
            body["fidelity"] = _build_fidelity(tmp, fp, config.eval_samples, config.seed)
        body["build"]["seconds"] = round(time.perf_counter() - t0, 2)
        manifest = write_manifest(tmp, body, files)
    return BuildResult(Path(out), manifest)


def _first_group_of(engine_of: dict, name: str) -> int:
    """The first group served by engine ``name``."""
    return min(g for g, e in engine_of.items() if e == name)


def _save_weights(path: Path, stored: dict) -> dict:
    from dmruntime.weights import encode

    arrays, tensors = {}, {}
    for key, (q, b) in sorted(stored.items()):
        arrays[key], tensors[key] = encode(q, b)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return {"file": path.name, "tensors": tensors}


def _precision_layers(layer_map, qnodes, wlayers, bits, profile, storage_bits) -> list[dict]:
    from .analysis.plan import bops

    col = {l.node: i for i, l in enumerate(wlayers)}
    out = []
    for l in layer_map.layers:
        q = l.node in qnodes
        wb = [int(b) for b in bits[:, col[l.node]]] if l.node in col else None
        out.append({"node": l.node, "module": l.module, "op_type": l.op_type, "weight": l.weight, "weight_bits": wb,
                    "storage_bits": [storage_bits(b) for b in wb] if wb else None,
                    "activation": profile.activation_dtype if q else "float", "activation_bits": 8 if q else None,
                    "macs": l.macs, "params": l.params,
                    "bops": [bops(l, b, 8 if q else None) for b in (wb or [None] * len(bits))]})
    return out


def _step_aware(fp: Path, layer_map, wlayers, bits, calib, config: BuildConfig, profile) -> dict:
    import onnx

    from .analysis.probe import make_probe
    from .analysis.rd import group_inputs
    from .analysis.stepaware import select_activation_bits
    from .calibration.trajectory import quantized_tensors

    proto = onnx.load(str(fp / "model.onnx"))
    fpb = Bundle.open(fp)
    probe = make_probe(proto, layer_map, quantized_tensors(proto, layer_map), fpb.sample_shape)
    X, T = group_inputs(fpb, calib.groups, config.analysis, calib.config.steps, config.analysis.seed)
    col = {l.node: i for i, l in enumerate(wlayers)}
    wb = np.array([[bits[g, col[l.node]] if l.node in col else None for l in probe.layers]
                   for g in range(len(calib.groups))], dtype=object)
    cands = tuple(config.analysis.act_bits)
    ranges = {b: calib.ranges(bits=b) for b in cands}
    return select_activation_bits(probe, X, T, ranges, wb, fpb.schedule, calib.groups, cands, profile.activation_bits)


def _mixed_bits(fp, layer_map, wlayers, qnodes, calib, config: BuildConfig, profile, progress):
    """Weight widths [G, L] of a mixed build and the plan record for the manifest."""
    from .analysis.allocate import parse_budget
    from .analysis.plan import bops, check_bits, plan_bits
    from .lowering.precision import explicit_bits

    K = len(calib.groups)
    if config.weight_bits:
        bits = np.tile(explicit_bits(layer_map, wlayers, config.weight_bits), (K, 1))
        plan = {"weight_bits": dict(config.weight_bits), "share_weights": True}
    else:
        allowed = config.analysis.weight_bits if config.allow_simulated_bits else profile.weight_bits
        curves = _analyze(fp, calib, config.analysis, progress)
        idx = [curves.layers.index(l.node) for l in wlayers]
        fixed = sum(bops(l, None, 8 if l.node in qnodes else None) for l in layer_map.layers
                    if l not in wlayers)
        bits, plan = plan_bits(curves.weight[:, idx], wlayers, curves.weight_bits, tuple(allowed),
                               parse_budget(config.budget), config.allocator, config.share_weights, fixed)
        plan["curves"] = {"config": curves.config, "seconds": curves.seconds}
    check_bits({int(b) for b in bits.ravel()}, profile.weight_bits, config.allow_simulated_bits)
    n = sum(l.params for l in wlayers)
    plan["average_weight_bits"] = [float((bits[g] * [l.params for l in wlayers]).sum() / n) for g in range(K)]
    return bits, plan


def inspect_plots(bundle: Bundle, folder: str | Path, curves_dir: str | Path | None = None) -> list[Path]:
    """bits_heatmap.png from the manifest; rd_curves.png from ``curves_dir`` or, for a mixed
    bundle, from the cached curves it was planned with."""
    from .analysis.plots import save_bits_heatmap, save_rd_curves
    from .analysis.rd import RDCurves

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = [l for l in bundle.manifest["precision"]["layers"] if l.get("weight_bits")]
    bits = np.array([l["weight_bits"] for l in layers]).T
    groups = [(g.t_start, g.t_end) for g in bundle.groups]
    out = [save_bits_heatmap([l["node"] for l in layers], bits, groups, folder / "bits_heatmap.png")]
    curves = None
    if curves_dir:
        curves = RDCurves.load(Path(curves_dir))
    else:
        cfg = ((bundle.manifest.get("plan") or {}).get("curves") or {}).get("config")
        if cfg:
            key = _rd_key(cfg["calibration"], cfg["analysis"])
            hits = sorted((cache_dir() / "rd").glob(f"*-{key}/curves.json"))
            curves = RDCurves.load(hits[0].parent) if hits else None
    if curves is not None:
        out.append(save_rd_curves(curves, folder / "rd_curves.png"))
    return out


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _build_fidelity(bundle_dir: Path, fp_dir: Path, n: int, seed: int) -> dict:
    """Paired PSNR/SSIM of the bundle against the fp32 export: DDIM 50 steps, eta 0, same seeds."""
    from .eval.metrics import psnr, ssim

    cfg = SampleConfig(n=n, steps=50, seed=seed)
    got = sample_model(Bundle.open(bundle_dir), cfg)
    want = sample_model(Bundle.open(fp_dir), cfg)
    return {"samples": n, "steps": 50, "eta": 0.0, "seed": seed, "reference": "fp32 ONNX export",
            "psnr_db_mean": float(np.mean(np.minimum(psnr(got, want), 200.0))), "ssim_mean": float(np.mean(ssim(got, want)))}
