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
import tempfile
from pathlib import Path

import numpy as np
from dmruntime import Bundle, Text2Image
from dmruntime.text2image import DEFAULT_GUIDANCE
from dmruntime.progress import reporter

from . import parallel, stages, zoo
from .analysis.plots import save_rd_curves
from .artifacts import CURVES, EVAL, atomic_dir, check_replaceable, write_marker
from .backends import get_backend
from .budget import Budget
from .cache import CacheReport
from .cache import clean as clean_cache
from .cache import report as cache_report
from .calibration.trajectory import groups_without_steps, no_steps_error
from .compiler import BuildResult, build, check_build
from .config import (AnalysisConfig, BuildConfig, CalibrationConfig, EvalConfig, ExportConfig, MixedRecipe, Override,
                     SampleConfig, W8A8Recipe)
from .errors import ConfigError
from .eval.classifier import DigitScorer
from .eval.grid import save_fd_figure, save_grid
from .eval.metrics import confident_rate, frechet_distance, psnr, ssim
from .eval.prompts import evaluation_prompts, training_prompts
from .frontend.export import ExportResult, export_model
from .frontend.load import LoadedModel, load_model
from .frontend.torch_model import TorchEpsModel
from .inspect import bundle_report, format_report, inspect_plots
from .stages import cache_dir, fp_bundle, load_conditions, open_bundle, probe_inputs, reference_model, sample_model
from .zoo.data import load_digits16

__all__ = ["AnalysisConfig", "Budget", "BuildConfig", "BuildResult", "CalibrationConfig", "EvalConfig", "EvalResult",
           "ExportConfig", "MixedRecipe", "Override", "SampleConfig", "W8A8Recipe", "analyze", "build", "build_notes", "check_build",
           "bundle_report", "cache_dir", "cache_report", "calibrate", "clean_cache", "CacheReport", "digit_scores", "evaluate", "export", "format_report", "fp_bundle", "generate", "inspect_plots",
           "load_conditions", "load_model", "open_bundle", "probe_inputs", "reference_model", "sample", "sample_model", "sampling_config",
           "write_eval"]


def build_notes(result: BuildResult) -> list[str]:
    """What to tell the user after a build, from its target's backend (e.g. where TensorRT's plans
    are built)."""
    return get_backend(result.manifest["engine"]["runtime"]).notes(result.manifest, result.path)


def export(model: LoadedModel | str | Path | None, out: str | Path,
           config: ExportConfig = ExportConfig()) -> ExportResult:
    """Trace a model (LoadedModel, zoo name or folder; None = digits16) to an fp32 export
    folder. ``out`` must be absent, empty, or an earlier bundle or export (replaced)."""
    if not isinstance(model, LoadedModel):
        model = load_model(model, seed=config.seed)
    return export_model(model, Path(out), config)


def sampling_config(target: str | Path, config: SampleConfig = SampleConfig(), *, fp: bool = False) -> SampleConfig:
    """``config`` with the sampler, steps and Karras setting a run of ``target`` takes: what is
    set in ``config``, else what the bundle was calibrated with (its manifest), else the model's
    scheduler class and 50 steps. With ``fp`` a bundle's fp32 reference samples as the bundle would."""
    p = Path(target)
    if (p / "manifest.json").is_file():
        return config.resolved(Bundle.open(p, verify=False))
    if fp:
        return config.resolved(Bundle.open(fp_bundle(str(target)), verify=False))
    return config.resolved(open_bundle(target))  # reports what is wrong with the target


def sample(target: str | Path, config: SampleConfig = SampleConfig(), *, fp: bool = False, progress="auto",
           correction: bool = True, cond: dict | None = None) -> np.ndarray:
    """Sample a bundle folder through dmruntime, with ``config``'s sampler (unset: the one the
    bundle was calibrated with; :func:`sampling_config`). With ``fp``, ``target`` may also be a
    model (zoo name or folder) and its cached fp32 ONNX export is sampled instead. ``cond``: the
    conditions of a conditional model ({"class_labels": ...} or {"encoder_hidden_states": ...},
    one row per sample or one for all); ``config.guidance_scale`` turns guidance on."""
    progress = reporter(progress, "sample")
    bundle, config, null = _sampled_bundle(target, config, fp, correction)
    out = sample_model(bundle, config, progress=progress, cond=cond, null_cond=null)
    return bundle.decode(out) if bundle.decoder is not None else out


def _sampled_bundle(target: str | Path, config: SampleConfig, fp: bool, correction: bool):
    """(the bundle a run samples, ``config`` with its sampler resolved, the null condition to guide
    with or None): ``target`` itself, or with ``fp`` its fp32 export (a bundle's reference samples
    with the bundle's sampler and null condition; a model's export with its own)."""
    null = None
    if fp:
        p = Path(target)
        if (p / "manifest.json").is_file():
            bundle = Bundle.open(p)
            config = config.resolved(bundle)  # the bundle's sampler, also for its fp reference
            if bundle.manifest.get("format") != "fp32":
                null = bundle.conditioning.null  # the fp export may have none: guide with the bundle's
                bundle = Bundle.open(fp_bundle(reference_model(bundle)))
        else:
            bundle = Bundle.open(fp_bundle(str(target)))
    else:
        bundle = open_bundle(target, correction=correction)
    return bundle, config.resolved(bundle), null


def generate(target: str | Path, prompts, config: SampleConfig = SampleConfig(n=1), *,
             negative_prompt: str | None = None, fp: bool = False, progress="auto", correction: bool = True,
             **sdxl) -> np.ndarray:
    """Images [len(prompts) * config.n, 3, H, W] in [-1, 1] from a text-to-image bundle:
    ``config.n`` per prompt, in prompt order (dmruntime's :class:`Text2Image`), with ``config``'s
    sampler (unset: the bundle's calibrated one) and guidance (unset: the calibration's scale,
    else 7.5). ``negative_prompt``: None is diffusers' default (the empty prompt; zeros for SDXL
    pipelines that force them). ``sdxl``: ``prompts_2``, ``negative_prompt_2``, ``original_size``,
    ``crops_coords_top_left``, ``target_size`` as :meth:`Text2Image.generate` takes them. With
    ``fp`` the bundle's fp32 export (or a model's) generates them."""
    progress = reporter(progress, "sample")
    bundle, config, _ = _sampled_bundle(target, config, fp, correction)  # the null branch: the negative prompt
    neg2 = sdxl.pop("negative_prompt_2", None)
    pipe = Text2Image(bundle, config.sampler, steps=config.steps, karras=config.karras, eta=config.eta,
                      guidance_scale=config.guidance_scale, batch_size=config.batch_size,
                      negative_prompt=negative_prompt, negative_prompt_2=neg2)
    return pipe.generate(prompts, n=config.n, seed=config.seed, progress=progress, **sdxl)


@functools.cache
def real_digit_features() -> np.ndarray:
    """Classifier features of the 1797 real digits (computed once per process)."""
    return _scorer()(load_digits16()[0])[0]


@functools.cache
def _scorer():
    return DigitScorer()


def digit_scores(images: np.ndarray, threshold: float = 0.9) -> dict:
    """FD to the real digits, confident-class rate and class histogram of [N, 1, 16, 16] samples."""
    feats, probs = _scorer()(images)
    return {"fd_to_real": frechet_distance(feats, real_digit_features()),
            "confident_rate": confident_rate(probs, threshold),
            "class_histogram": np.bincount(probs.argmax(1), minlength=10).tolist(),
            "features": feats}


def is_digits_shape(shape) -> bool:
    return tuple(shape) == (1, 16, 16)


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """The JSON-able report, the evaluated bundle's samples and the config as run (its sampler
    filled in)."""

    report: dict
    images: np.ndarray
    config: EvalConfig | None = None


def evaluate(target: str | Path, config: EvalConfig = EvalConfig(), *, progress="auto",
             correction: bool = True, cond: dict | None = None, ray: str | None = None,
             workers: int | None = None) -> EvalResult:
    """Fidelity of a bundle against its full-precision PyTorch model, same seeds.

    Paired PSNR / SSIM between the bundle's and the reference's samples; for digits models
    also FD to the real digits, the FP noise floor (FD between two FP sample sets with
    different seeds), FD of the bundle's samples to that second FP set (comparable with the
    floor) and confident-class rates. Latent models are judged on images: the bundle's decoder
    for its samples, the PyTorch VAE for the reference's. ``ray``, ``workers``: the bundle's, the
    reference's and the noise floor's samples in shards of ``batch_size`` rows as Ray tasks (as
    in :func:`analyze`; the same samples, bit for bit; every node must see ``target``).
    """
    with parallel.pool(ray, workers) as pool:
        result = _evaluate(target, config, progress, correction, cond, pool)
    result.report["run"] = pool.describe()
    return result


def _evaluate(target, config: EvalConfig, progress, correction: bool, cond, pool) -> EvalResult:
    progress = reporter(progress, "eval")
    shards = {"pool": pool, "spec": stages.ModelSpec("bundle", str(Path(target).resolve()), correction)}
    import torch

    ref_shards = {"pool": pool, "spec": stages.ModelSpec("reference", str(Path(target).resolve()), correction,
                                                         torch.get_num_threads())}
    bundle = open_bundle(target, correction=correction)
    reference = reference_model(bundle)
    ref = TorchEpsModel(reference, null=bundle.conditioning.null, class_table=bundle.conditioning.class_table)
    sc = config.sample.resolved(bundle)  # the bundle's calibrated sampler unless told otherwise
    prompts = digits_named = None  # text bundles: the prompts, and the digit each names
    cond_ref, null_got, null_ref = cond, None, None
    if "text" in bundle.components and cond is None:  # prompts: each side through its own text encoders
        prompts, digits_named = eval_prompts(config.prompts, sc.n,
                                             is_digits_shape(bundle.manifest["decoder"]["image_shape"]))
        if sc.guidance_scale is None:
            sc = dataclasses.replace(sc, guidance_scale=(bundle.manifest.get("conditioning") or {}).get(
                "calibration_guidance_scale") or DEFAULT_GUIDANCE)
        cond, null_got = _encoded(Text2Image(bundle), prompts)
        cond_ref, null_ref = _encoded(Text2Image(Bundle.open(fp_bundle(reference))), prompts)
    config = dataclasses.replace(config, sample=sc)
    got = sample_model(bundle, sc, progress=progress and (lambda i, n: progress("bundle", i, n)), cond=cond,
                       null_cond=null_got, **shards)
    want = sample_model(ref, sc, progress=progress and (lambda i, n: progress("fp reference", i, n)), cond=cond_ref,
                        null_cond=null_ref, **ref_shards)
    if bundle.decoder is not None:  # latent models are judged on images: the bundle's decoder, and the
        got, want = bundle.decode(got), ref.decode(want)  # PyTorch VAE for the reference (a W8A8 decoder counts)
    p, s = psnr(got, want), ssim(got, want)
    sim = None
    with tempfile.TemporaryDirectory(prefix="dmcompile-sim-") as tmp:
        # engines that compute in other arithmetic than FP32 (tensorrt's FP16) against the same graphs in FP32
        reference = get_backend(bundle.runtime).reference(bundle, tmp)
        if reference is not None:
            sim = sample_model(reference, sc, cond=cond, progress=progress and (lambda i, n: progress("simulated", i, n)))
            if bundle.decoder is not None:
                sim = bundle.decode(sim)
    report = {
        "schema_version": 1, "target": str(target), "format": bundle.manifest.get("format"),
        "model": bundle.manifest["model"]["id"], "config": config.to_dict(),
        "correction": bundle.corrections is not None,
        "paired_vs_fp": {"psnr_db_mean": float(np.mean(np.minimum(p, 200.0))), "psnr_db_median": float(np.median(p)),
                         "ssim_mean": float(np.mean(s)), "max_abs_diff": float(np.max(np.abs(got - want)))},
    }
    if sim is not None:
        report["tensorrt_reference"] = {
            "runs": "ONNX Runtime on the CPU over the bundle's FP16 engine graphs (not TensorRT)",
            "engines_vs_simulated_psnr_db_mean": float(np.mean(np.minimum(psnr(got, sim), 200.0))),
            "simulated_vs_fp_psnr_db_mean": float(np.mean(np.minimum(psnr(sim, want), 200.0))),
            "simulated": "the same Q/DQ graphs in FP32 arithmetic"}
    if is_digits_shape(got.shape[1:]):
        floor_cfg = dataclasses.replace(sc, seed=sc.seed + config.floor_seed_offset)
        other = sample_model(ref, floor_cfg, progress=progress and (lambda i, n: progress("fp noise floor", i, n)),
                             cond=cond_ref, null_cond=null_ref, **ref_shards)
        if bundle.decoder is not None:
            other = ref.decode(other)
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
        labels = None if not cond or "class_labels" not in cond else np.broadcast_to(cond["class_labels"], (sc.n,))
        if labels is not None:  # class-conditional digits: the class asked for?
            report["digits"]["class_accuracy"] = class_accuracy(got, labels)
            report["digits"]["fp_class_accuracy"] = class_accuracy(want, labels)
    if prompts is not None:
        report["prompts"] = {"count": len(dict.fromkeys(prompts)), "source": config.prompts or (
            "digit evaluation prompts" if digits_named is not None else "default calibration prompts")}
    if digits_named is not None and is_digits_shape(got.shape[1:]):  # text to digits: the digit the prompt names?
        held_out = np.array([p in HELD_OUT for p in prompts])
        report["prompt_accuracy"] = {
            "accuracy": class_accuracy(got, digits_named), "fp_accuracy": class_accuracy(want, digits_named),
            # None when n is too small to reach them (the evaluation prompts start with seen phrasings)
            "held_out_phrasings": class_accuracy(got[held_out], digits_named[held_out]) if held_out.any() else None,
            "fp_held_out_phrasings": class_accuracy(want[held_out], digits_named[held_out]) if held_out.any() else None,
            "samples": len(digits_named), "held_out_samples": int(held_out.sum())}
    return EvalResult(report, got, config)


HELD_OUT = {p for p, _ in evaluation_prompts() if not any(p == q for q, _ in training_prompts())}


def eval_prompts(path: str | None, n: int, digits: bool) -> tuple[list[str], np.ndarray | None]:
    """n prompts (cycled) for evaluating a text-to-image bundle and, for dmcompile's digit
    evaluation set, the digit each names (None otherwise)."""
    from dmruntime import InputError
    from dmruntime.text import read_prompts

    if path is None and digits:
        pairs = evaluation_prompts()
        return [pairs[i % len(pairs)][0] for i in range(n)], np.array([pairs[i % len(pairs)][1] for i in range(n)])
    try:
        given = read_prompts(path or zoo.DEFAULT_PROMPTS)
    except InputError as e:
        raise ConfigError(str(e)) from None
    return [given[i % len(given)] for i in range(n)], None


def _encoded(pipe: Text2Image, prompts: list[str]) -> tuple[dict, dict]:
    """(conditions of the prompts, the empty negative prompt's row) through one side's encoders."""
    return pipe.encode(prompts), pipe.null_condition()


def class_accuracy(images: np.ndarray, labels: np.ndarray) -> float:
    """Share of digit images the classifier assigns to the requested class."""
    _, probs = _scorer()(images)
    return float(np.mean(probs.argmax(1) == np.asarray(labels)))


def calibrate(model: LoadedModel | str | Path | None, config: CalibrationConfig = CalibrationConfig(),
              progress="auto", null_class: int | None = None, ray: str | None = None, workers: int | None = None):
    """Per-group activation statistics along trajectories of the calibration sampler over the fp32
    model (for the default ort-cpu profile); cached on disk by model and config (``cache_dir()/calib``), so
    rebuilding with other lowering options does not recalibrate. Conditional models: see
    :class:`CalibrationConfig` (conditions, guidance) and ``null_class`` (the guidance's null
    class of a class-conditional model). ``ray``, ``workers``: the shards of ``config.batch_size``
    trajectories as Ray tasks, as in :func:`analyze` (the same statistics, bit for bit)."""
    progress = reporter(progress, "calibrate")
    with parallel.pool(ray, workers) as pool:
        return stages.cached_calibration(fp_bundle(model), config, progress=progress, null_class=null_class, pool=pool)


def analyze(model: LoadedModel | str | Path | None, config: AnalysisConfig = AnalysisConfig(),
            calibration: CalibrationConfig = CalibrationConfig(), out: str | Path | None = None, progress="auto",
            null_class: int | None = None, ray: str | None = None, workers: int | None = None):
    """Rate-distortion curves per timestep group (RDCurves), cached by model, calibration and
    analysis config under ``cache_dir()/rd`` and resumable. With ``out``, also written there
    (curves.json, curves.npz, rd_curves.png); ``out`` must be absent, empty or earlier curves.
    Conditional models are measured on the calibration's conditions, guided like it (both
    branches), with ``null_class`` as in :func:`calibrate`. ``ray``: run the calibration's shards
    and the probes as Ray tasks
    (``"local"``: a cluster started here with ``workers`` CPUs, default all; ``"auto"``: the one
    running on this node; else its address); the curves are the same bytes as without."""
    progress = reporter(progress, "analyze")
    from dmruntime import NoiseSchedule

    if out is not None:
        check_replaceable(Path(out), CURVES)  # before minutes of measuring
    model = stages.as_model(model)
    schedule = NoiseSchedule.from_config(model.scheduler_config)
    empty = groups_without_steps(schedule, calibration)
    if empty:
        raise no_steps_error(empty, calibration.sampling(schedule), calibration.groups)
    fp = fp_bundle(model)
    stages.check_moments_fit(stages.load_layer_map(fp).layers, stages.moments_needed(config.rounding, False))
    conditions = stages.conditioning(fp, calibration, null_class)
    with parallel.pool(ray, workers) as pool:
        calib = stages.cached_calibration(fp, calibration, progress=progress and (lambda i, n: progress("calibrate", i, n)),
                                          conditions=conditions, moments=stages.moments_needed(config.rounding, False),
                                          pool=pool)
        curves = stages.rd_curves(fp, calib, config, progress=progress, conditions=conditions, pool=pool)
    if out is not None:
        curves.save(Path(out), plot=save_rd_curves)
    return curves


def write_eval(result: EvalResult, out: str | Path) -> list[Path]:
    """Write eval.json, samples.png (up to 64 samples) and, for digits models, fd.png into
    ``out`` atomically; ``out`` must be absent, empty or an earlier evaluation folder."""
    r = result.report
    out = Path(out)
    with atomic_dir(out, EVAL) as tmp:
        save_grid(result.images[:64], tmp / "samples.png")
        files = ["eval.json", "samples.png"]
        d = r.get("digits")
        if d:
            c = r["config"]["sample"]
            save_fd_figure({"model vs real": d["fd_to_real"], "FP vs real": d["fp_fd_to_real"],
                            "model vs FP": d["fd_to_fp"], "FP noise floor": d["noise_floor_fd"]},
                           tmp / "fd.png",
                           f"{r['model']} {r['format']}: {c['n']} samples, {c.get('sampler') or 'ddim'} {c['steps']} steps")
            files.append("fd.png")
        write_marker(tmp, EVAL, r, files)
    return [out / f for f in files]
