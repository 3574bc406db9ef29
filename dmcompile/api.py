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
from .config import BuildConfig, CalibrationConfig, EvalConfig, ExportConfig, SampleConfig
from .errors import ModelError
from .frontend.export import ExportResult, export_model
from .frontend.load import LoadedModel, load_model
from .frontend.torch_model import TorchEpsModel

__all__ = ["BuildConfig", "BuildResult", "CalibrationConfig", "EvalConfig", "EvalResult", "ExportConfig",
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


def open_bundle(path: str | Path, threads: int = 0) -> Bundle:
    """Open a bundle or export folder with dmruntime, turning a model name into a clear error."""
    p = Path(path)
    if not (p / "manifest.json").exists() and (p.name in _zoo_names() or (p / "config.json").exists()):
        raise ModelError(f"{path} is a model, not a bundle: export or build it first, or pass --fp to sample "
                         "its full-precision model")
    return Bundle.open(p, threads=threads)


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


def sample(target: str | Path, config: SampleConfig = SampleConfig(), fp: bool = False, progress=None) -> np.ndarray:
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
        bundle = open_bundle(target)
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


def evaluate(target: str | Path, config: EvalConfig = EvalConfig(), progress=None) -> EvalResult:
    """Fidelity of a bundle against its full-precision PyTorch model, same seeds.

    Paired PSNR / SSIM between the bundle's and the reference's samples; for digits models
    also FD to the real digits, the FP noise floor (FD between two FP sample sets with
    different seeds), FD of the bundle's samples to that second FP set (comparable with the
floor) and confident-class rates.
    """
    from .eval.metrics import frechet_distance, psnr, ssim

    bundle = open_bundle(target)
    ref = TorchEpsModel(reference_model(bundle))
    sc = config.sample
    got = sample_model(bundle, sc, progress=progress and (lambda i, n: progress("bundle", i, n)))
    want = sample_model(ref, sc, progress=progress and (lambda i, n: progress("fp reference", i, n)))
    p, s = psnr(got, want), ssim(got, want)
    report = {
        "schema_version": 1, "target": str(target), "format": bundle.manifest.get("format"),
        "model": bundle.manifest["model"]["id"], "config": config.to_dict(),
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

    key = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / "calib" / f"{fp.name}-{key}"
    if (path / "calibration.json").is_file():
        return CalibrationResult.load(path)
    manifest = json.loads((fp / "manifest.json").read_text())
    result = run_calibration(fp / "model.onnx", LayerMap.load(fp / "layer_map.json"), manifest["scheduler"],
                             config, progress=progress)
    result.save(path)
    return result


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """The bundle folder and what the build measured."""

    path: Path
    manifest: dict


def build(model: LoadedModel | str | Path | None, out: str | Path, config: BuildConfig = BuildConfig(),
          progress=None) -> BuildResult:
    """Compile a model into a bundle: per timestep group, activation scales calibrated on the
    inputs that group sees; weights quantized once. All groups share one fused integer ONNX
    Runtime engine and feed it their own scales, zero points and int32 biases (group_XX.npz).
    The folder is written to a temporary path and renamed when complete."""
    import time

    import onnx

    from .artifacts import atomic_dir, write_manifest
    from .backends.onnxruntime import ENGINE_FILE, fusion_report, merge_groups, optimize_for_cpu, save_engine
    from .frontend.layermap import LayerMap
    from .lowering.precision import quantized_nodes
    from .lowering.profiles import PROFILES
    from .lowering.qdq import lower_group, quantize_weights

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
    weights = quantize_weights(fp_proto, [l for l in layer_map.layers if l.node in qnodes])
    groups = calib.groups
    fused = []
    for g in groups:
        fused.append(optimize_for_cpu(lower_group(fp_proto, layer_map, qnodes, weights, ranges[g.index], profile)))
        if progress:
            progress("lower", g.index + 1, len(groups))
    merged, params = merge_groups(fused)
    K = len(groups)
    group_files = [f"group_{g.index:02d}.npz" for g in groups]
    with atomic_dir(Path(out)) as tmp:
        files = save_engine(tmp, merged, params, group_files)
        fusion = fusion_report(tmp / ENGINE_FILE)
        body = {
            "format": config.format, "profile": profile.name,
            "model": model.describe(), "scheduler": model.scheduler_config,
            "groups": [{"index": g.index, "t_start": g.t_start, "t_end": g.t_end, "engine": ENGINE_FILE,
                        "inputs": f} for g, f in zip(groups, group_files)],
            "engine": {"file": ENGINE_FILE, "runtime": "onnxruntime", "onnxruntime_version": _ort_version(),
                       "group_inputs": sorted(params[0])},
            "precision": {"activation_dtype": profile.activation_dtype, "layers": [
                {"node": l.node, "module": l.module, "op_type": l.op_type,
                 "weight_bits": [8] * K if (l.node in qnodes and l.weight) else None,
                 "activation": profile.activation_dtype if l.node in qnodes else "float",
                 "macs": l.macs, "params": l.params} for l in layer_map.layers]},
            "calibration": calib.config.to_dict(),
            "build": {"config": config.to_dict(), "fusion": fusion},
        }
        write_manifest(tmp, body, files)
        if config.eval_samples:
            body["fidelity"] = _build_fidelity(tmp, fp, config.eval_samples, config.seed)
        body["build"]["seconds"] = round(time.perf_counter() - t0, 2)
        manifest = write_manifest(tmp, body, files)
    return BuildResult(Path(out), manifest)


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
