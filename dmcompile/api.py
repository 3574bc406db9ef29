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


def probe_inputs(fp: Path, tensors_of, calib, config: AnalysisConfig):
    """(probe, X, T, fp bundle) for an fp32 export: the probe fake-quantizes
    ``tensors_of(proto, layer_map)``; X, T are each group's inputs from fp32 trajectories."""
    import onnx

    from .analysis.probe import make_probe
    from .analysis.rd import group_inputs
    from .frontend.layermap import LayerMap

    layer_map = LayerMap.load(fp / "layer_map.json")
    proto = onnx.load(str(fp / "model.onnx"))
    bundle = Bundle.open(fp)
    probe = make_probe(proto, layer_map, tensors_of(proto, layer_map), bundle.sample_shape)
    X, T = group_inputs(bundle, calib.groups, config, calib.config.steps, config.seed)
    return probe, X, T, bundle


def _analyze(fp: Path, calib, config: AnalysisConfig, progress=None):
    from .analysis.rd import RDCurves
    from .analysis.rd import analyze as run_analysis
    from .calibration.trajectory import layer_input_tensors

    key = _rd_key(calib.config.to_dict(), config.to_dict())
    path = cache_dir() / "rd" / f"{fp.name}-{key}"
    if (path / "curves.json").is_file():
        return RDCurves.load(path)
    # Activation curves are per layer input (the Conv outputs the bundle also quantizes, for
    # fusion, are not a layer's choice).
    probe, X, T, _ = probe_inputs(fp, layer_input_tensors, calib, config)
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


from .compiler import BuildResult, build  # noqa: E402  (compiler uses the stage functions above)
