"""The pipeline's stages over an fp32 export folder, each artefact in and artefact out, with
their on-disk caches. The build (:mod:`dmcompile.compiler`) runs them as its steps; the public
API (:mod:`dmcompile.api`, a floor above both) re-exports them and the build.

Cache layout (``cache_dir()``, default ``~/.cache/dmcompile``, or ``$DMCOMPILE_CACHE``):

    exports/<model id>-<key>/      fp32 export: key = dmcompile version, model id, seed,
                                   UNet and scheduler configs, export config, every weight
    calib/<export>-<key>/          calibration: key = calibration schema, config, profile;
                                   ``moments/`` holds the layer inputs' second moments (GPTQ);
                                   ``<...>.partial/`` the checkpoint of an interrupted pass
    rounded/<calibration>-<key>/   GPTQ-rounded weights, one file per layer, width and scope
    rd/<export>-<key>/             RD curves: key = RD + calibration schemas, both configs,
                                   profile; ``<...>.partial/`` holds an interrupted run
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from dmruntime import Bundle, SamplingLoop
from dmruntime.conditioning import cycle_rows, take_rows

from . import __version__, onnxio, scratch, zoo
from .analysis.probe import make_probe
from .analysis.rd import RD_SCHEMA_VERSION, RDCurves, group_inputs, measure_curves
from .calibration import hessian
from .calibration.hessian import MOMENTS_SCHEMA_VERSION, MOMENT_ROWS, Moments
from .calibration.rounding import GPTQ_VERSION, rounding_method
from .calibration.trajectory import CALIB_SCHEMA_VERSION, CalibrationResult, calibrate_trajectories
from .artifacts import cache_dir
from .config import AnalysisConfig, CalibrationConfig, ExportConfig, SampleConfig
from .errors import ArtifactError, ConfigError, ModelError
from .frontend.export import export_model
from .frontend.layermap import LayerMap
from .frontend.load import LoadedModel, load_model
from .frontend.text import text_digest_parts
from .frontend.torch_model import TorchEpsModel
from .targets import ORT_CPU, TargetProfile


def as_model(model: LoadedModel | str | Path | None, seed: int = 0) -> LoadedModel:
    """A LoadedModel from a LoadedModel, a zoo name, a folder, or None (the default model)."""
    return model if isinstance(model, LoadedModel) else load_model(model, seed=seed)


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True, default=str).encode()).hexdigest()


def model_key(model: LoadedModel, config: ExportConfig) -> str:
    """Cache key of a model's fp32 export: configs, version and every weight's bytes."""
    h = hashlib.sha256()
    h.update(json.dumps([__version__, model.id, model.seed, model.unet_config, model.scheduler_config,
                         config.to_dict()] + ([model.force_zeros_for_empty_prompt] if model.text else []),
                        sort_keys=True, default=str).encode())
    for name, p in sorted(model.unet.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    if model.vae is not None:  # latent models: the decoder is part of the export
        h.update(json.dumps(model.vae_config, sort_keys=True, default=str).encode())
        for name, p in sorted(model.vae.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().contiguous().numpy().tobytes())
    if model.default_prompts is not None:
        h.update(Path(model.default_prompts).read_bytes())
    for name, part in text_digest_parts(model.text):  # text-to-image: tokenizers and encoders too
        h.update(str(name).encode())
        h.update(part if isinstance(part, bytes) else str(part).encode())
    return h.hexdigest()[:16]


def fp_bundle(model: LoadedModel | str | Path | None, config: ExportConfig = ExportConfig()) -> Path:
    """The fp32 export folder of a model, exported once and cached by weights and config."""
    model = as_model(model, seed=config.seed)
    path = cache_dir() / "exports" / f"{model.id.replace('/', '_')}-{model_key(model, config)}"
    if not (path / "manifest.json").is_file():
        export_model(model, path, config)
    return path


def open_bundle(path: str | Path, *, threads: int = 0, correction: bool = True) -> Bundle:
    """Open a bundle or export folder with dmruntime, turning a model name into a clear error.
    ``correction``: apply the bundle's PTQD noise correction when it has one. TensorRT bundles
    run on ONNX Runtime (device "cpu"). OpenVINO bundles
    keep their compiled engines in ``cache_dir()/openvino`` (a second run skips compiling)."""
    p = Path(path)
    if not (p / "manifest.json").exists() and (p.name in zoo.names() or (p / "config.json").exists()):
        raise ModelError(f"{path} is a model, not a bundle: export or build it first, or pass --fp to sample "
                         "its full-precision model")
    # tensorrt bundles run here on ONNX Runtime over their FP16 engine graphs (dmcompile's checks);
    # their TensorRT engines run through dmruntime on the GPU machine
    return Bundle.open(p, threads=threads, correction=correction, cache_dir=cache_dir() / "openvino", device="cpu")


def reference_model(bundle: Bundle) -> LoadedModel:
    """The full-precision PyTorch model a bundle was compiled from (from its manifest)."""
    m = bundle.manifest["model"]
    if m["source"] in ("zoo", "preset"):
        return load_model(m["id"], seed=m.get("seed") or 0)
    return load_model(m["source"])


def sample_model(model, config: SampleConfig = SampleConfig(), progress=None, cond: dict | None = None,
                 null_cond: dict | None = None, pool=None, spec: "ModelSpec | None" = None) -> np.ndarray:
    """Samples from anything with the runtime's model interface (Bundle, TorchEpsModel) with
    ``config``'s sampler (unset parts: the bundle's calibrated sampler, else the model's scheduler
    class); ``cond``: conditions of a conditional model, guided when ``config.guidance_scale`` is set.
    With a ``pool`` of several workers and ``spec`` (how a worker opens ``model``), the samples
    are drawn in shards of ``config.batch_size`` rows as tasks (:func:`sample_shard`): the same
    arrays as here, bit for bit."""
    if pool is None or pool.workers == 1 or spec is None:
        loop = SamplingLoop(model, config.choice(model), batch_size=config.batch_size,
                            guidance_scale=config.guidance_scale, null_cond=null_cond)
        return loop.sample(config.n, seed=config.seed, progress=progress, cond=cond)
    shards = [(a, min(a + config.batch_size, config.n)) for a in range(0, config.n, config.batch_size)]
    out = [None] * len(shards)
    for done, (i, x) in enumerate(pool.map(sample_shard, (spec, config, cond, null_cond), shards), 1):
        out[i] = x
        if progress is not None:
            progress(done, len(shards))
    return np.concatenate(out)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How a worker opens a model to sample from: a bundle (``kind="bundle"``) or the fp32
    PyTorch model a bundle was compiled from (``"reference"``), by the bundle's path (a path
    every node sees)."""

    kind: str
    path: str
    correction: bool = True
    torch_threads: int = 0  # the driver's: PyTorch's convolutions round differently with other thread counts

    def open(self):
        bundle = open_bundle(self.path, threads=1, correction=self.correction)
        if self.kind == "bundle":
            return bundle
        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)
        return TorchEpsModel(reference_model(bundle), null=bundle.conditioning.null,
                             class_table=bundle.conditioning.class_table)


class RowSlice:
    """A random generator's draws for ``rows`` of an ``n``-row batch: each draw is made for all n
    rows and sliced, so a shard's stochastic sampler gets the noise the whole batch would."""

    def __init__(self, rng: np.random.Generator, n: int, rows: slice):
        self.rng, self.n, self.rows = rng, n, rows

    def standard_normal(self, shape, dtype=np.float64):
        return self.rng.standard_normal((self.n, *shape[1:]), dtype=dtype)[self.rows]


_opened: dict = {}  # worker side: the model last opened for sampling


def sample_shard(shared: tuple, rows: tuple[int, int]) -> np.ndarray:
    """Rows ``rows`` of :func:`sample_model`'s samples: the same x_T rows, model calls and (for a
    stochastic sampler) noise as the whole run gives them."""
    spec, config, cond, null_cond = shared
    if _opened.get("spec") != spec:
        _opened.clear()
        _opened.update(spec=spec, model=spec.open())
    model = _opened["model"]
    loop = SamplingLoop(model, config.choice(model), batch_size=config.batch_size,
                        guidance_scale=config.guidance_scale, null_cond=null_cond)
    x, rng = loop.initial_noise(config.n, config.seed)
    checker = getattr(model, "conditioning", None)
    if checker is not None and (cond or checker):
        cond = checker.check(cond, config.n)
    sl = slice(*rows)
    noise = RowSlice(rng, config.n, sl) if loop.sampler.stochastic else rng
    return loop.run(x[sl], noise, cond=take_rows(cond, sl))


def calibration_key(config: CalibrationConfig, profile: TargetProfile, conditions: dict | None = None,
                    null: dict | None = None) -> str:
    # The schema version is in the key so that calibrations cached by older code are not reused;
    # conditional calibrations also key on the conditions and the null condition themselves.
    extra = [] if conditions is None else [_arrays_digest(conditions), _arrays_digest(null or {})]
    return _digest(CALIB_SCHEMA_VERSION, config.to_dict(), *_profile_part(profile), *extra)[:12]


def _arrays_digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def conditioning(fp: Path, config: CalibrationConfig, null_class: int | None = None):
    """(Conditioning with its null condition and class table, calibration conditions: one
    row per trajectory) of an export; (Conditioning.none(), None) for an unconditional model.
    The export's own defaults (a zoo pipeline's conditions.npz) apply unless ``config.conditions``
    or ``null_class`` replace them. Raises ConfigError for conditions that do not fit."""
    from dmruntime.conditioning import COND_STREAM, Conditioning

    manifest = json.loads((fp / "manifest.json").read_text())
    base = Conditioning.from_manifest(manifest, fp)
    if manifest.get("text") and not config.conditions:
        return prompt_conditioning(fp, manifest, base, config, null_class)
    if config.prompts is not None or config.negative_prompt is not None:
        raise ConfigError("--calib-prompts and --negative-prompt apply to text-to-image models (a pipeline folder "
                          "with tokenizer/ and text_encoder/); this model has no text encoder: use --calib-conditions")
    if not base:
        given = [n for n, v in (("--calib-conditions", config.conditions), ("--null-class", null_class),
                               ("guidance", config.guidance_scale)) if v is not None]
        if given:
            raise ConfigError(f"this model is unconditional: {', '.join(given)} do(es) not apply")
        return base, None
    rows, null, table = load_conditions(Path(config.conditions), base) if config.conditions else (None, None, None)
    null = null if null is not None else base.null
    table = table if table is not None else base.class_table
    if null_class is not None:
        if "class_labels" not in base.names:
            raise ConfigError("--null-class applies to class-conditional models; this one takes "
                              f"{', '.join(base.describe())}")
        if not 0 <= null_class < (base.num_classes or 0):
            raise ConfigError(f"--null-class {null_class} is outside the model's classes [0, {base.num_classes})")
        null = {**(null or {}), "class_labels": np.asarray(null_class, np.int64)}
        null = {k: v[0] for k, v in _checked(base, {k: np.asarray(v)[None] for k, v in null.items()}, 1,
                                             "the null condition").items()}
    if null is not None:
        missing = [n for n in base.names if n not in null]
        if missing:
            raise ConfigError(f"the null condition lacks {missing}; give null_{missing[0]} in --calib-conditions"
                              + (" or --null-class" if missing == ["class_labels"] else ""))
    spec = dataclasses.replace(base, null=null, class_table=table)
    if config.guidance_scale is not None and null is None:
        raise ConfigError("calibrating with guidance needs a null condition: pass --null-class (class labels) or "
                          "put null_<input> arrays in --calib-conditions")
    if rows is None:
        return spec, spec.random(config.size, np.random.default_rng([config.seed, COND_STREAM]))
    return spec, cycle_rows(rows, config.size)


PROMPT_STREAM = 0x7E47  # the seeded selection of calibration prompts


def calibration_prompts(fp: Path, manifest: dict, config: CalibrationConfig) -> list[str]:
    """config.size prompts, one per trajectory: a seeded permutation of the prompt file (the
    config's, else the pipeline's ``calibration_prompts.txt``, else dmcompile's default set),
    cycled."""
    from dmruntime import InputError
    from dmruntime.text import read_prompts

    path = Path(config.prompts) if config.prompts else (
        fp / manifest["calibration_prompts"] if manifest.get("calibration_prompts") else zoo.DEFAULT_PROMPTS)
    try:
        prompts = read_prompts(path)
    except InputError as e:
        raise ConfigError(str(e)) from None
    order = np.random.default_rng([config.seed, PROMPT_STREAM]).permutation(len(prompts))
    return [prompts[order[i % len(prompts)]] for i in range(config.size)]


def prompt_conditioning(fp: Path, manifest: dict, base, config: CalibrationConfig, null_class: int | None):
    """(Conditioning, rows) of a text-to-image export: the calibration prompts through its fp32
    text encoders, the null condition the negative prompt's encoding (the empty prompt's, as
    diffusers, unless ``config.negative_prompt``)."""
    from dmruntime import InputError
    from dmruntime.text import TextEncoders

    if null_class is not None:
        raise ConfigError("--null-class applies to class-conditional models; this text-to-image model's null "
                          "condition is the negative prompt (--negative-prompt, default empty)")
    encoders = TextEncoders(fp, manifest["text"], ())
    try:
        rows = encoders.encode(calibration_prompts(fp, manifest, config))
        rows = base.with_defaults(rows, config.size)  # inputs the pipeline derives (SDXL's time_ids)
        null = base.null
        if config.negative_prompt is not None:
            null = encoders.encode_negative(config.negative_prompt)
    except InputError as e:
        raise ConfigError(str(e)) from None
    return dataclasses.replace(base, null=null), rows


def load_conditions(path: Path, spec) -> tuple[dict | None, dict | None, np.ndarray | None]:
    """(rows, null condition, class table) from a conditions .npz (dmruntime's format);
    ConfigError when it cannot be read or does not fit the model."""
    from dmruntime import InputError
    from dmruntime.conditioning import read_conditions

    try:
        return read_conditions(path, spec)
    except InputError as e:
        raise ConfigError(str(e)) from None


def _checked(spec, cond: dict, n: int, what: str) -> dict:
    from dmruntime import InputError

    try:
        return spec.check(cond, n)
    except InputError as e:
        raise ConfigError(f"{what}: {e}") from None


def _profile_part(profile: TargetProfile) -> list:
    # ort-cpu keys stay what they were before profiles were part of them (caches stay valid)
    if profile == ORT_CPU:
        return []
    # placement options added after a profile's caches existed key on their own
    return [profile.name] + (["residual-skip"] if profile.quantize_residual_skip else [])


def cached_calibration(fp: Path, config: CalibrationConfig, profile: TargetProfile = ORT_CPU, progress=None,
                       null_class: int | None = None, conditions: tuple | None = None, moments: str | None = None,
                       pool=None):
    """Per-group activation statistics of an fp32 export (CalibrationResult), cached under
    ``cache_dir()/calib``; a cached entry that cannot be read is measured again. Conditional
    models are calibrated on ``conditions`` ((Conditioning, rows), as :func:`conditioning`
    returns them; worked out from ``config`` and ``null_class`` when not given).
    ``moments`` (``"pooled"`` or ``"groups"``): the layer inputs' second moments are needed too
    (GPTQ rounding); a cached calibration without them is measured again, in one pass, and
    replaced (its ranges come out identical: the moments draw from a stream of their own).
    ``pool`` (:mod:`dmcompile.parallel`): where the shards run (default here; the same result)."""
    spec, rows = conditions if conditions is not None else conditioning(fp, config, null_class)
    path = cache_dir() / "calib" / f"{fp.name}-{calibration_key(config, profile, rows, spec.null)}"
    if (path / "calibration.json").is_file():
        try:
            cached = CalibrationResult.load(path)
            have = Moments(cached.moments) if moments and cached.moments is not None else None  # checks its schema
            complete = set(profile.quantized_tensors(load_graph(fp), load_layer_map(fp).layers)) \
                <= set(cached.tensors)  # a profile that now records more tensors measures again
            if complete and (moments is None or (have is not None and (moments == "pooled" or have.per_group))):
                return cached
        except ArtifactError:
            shutil.rmtree(path, ignore_errors=True)  # our own cache entry, unreadable: measure again
    manifest = json.loads((fp / "manifest.json").read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # resumable: an interrupted pass goes on from here
    result = calibrate_trajectories(fp / "model.onnx", load_layer_map(fp), manifest["scheduler"], config, profile,
                                    progress=progress, conditioning=spec, conditions=rows, moments=moments,
                                    work_dir=path.parent, checkpoint=partial, pool=pool)
    saved = result.save(path, move_moments=True)
    held = scratch.try_lock(partial) if partial.is_dir() else None
    if held is not None or (partial.is_dir() and scratch.fcntl is None):  # else a concurrent pass still uses it
        shutil.rmtree(partial, ignore_errors=True)
    if held is not None:
        os.close(held)
    return saved


def load_graph(fp: Path):
    """The export's graph without its weights."""
    return onnxio.load(fp / "model.onnx", weights=False)


def load_layer_map(fp: Path):
    """The layer map of an export folder."""
    return LayerMap.load(fp / "layer_map.json")


def rounder(calib, rounding: str, max_bits: int = 8):
    """The weight rounding method ``rounding`` (``calibration.rounding.ROUNDING_METHODS``) over a
    calibration's second moments where it needs them, widths past ``max_bits`` rounded to that
    grid (the target's ``weight_grid_bits``); results of methods that take time (GPTQ) are cached
    under ``cache_dir()/rounded``."""
    method = rounding_method(rounding)
    if not method.needs_moments:
        return method(max_bits)
    if calib.moments is None:
        raise ArtifactError(f"{rounding} rounding needs a calibration with second moments "
                            "(stages.cached_calibration(..., moments='pooled'))")
    made = method(Moments(calib.moments), max_bits=max_bits)
    made.cache = cache_dir() / "rounded" / f"{calib.moments.parent.name}-{_digest(*made.key())[:8]}"
    return made


def moments_needed(rounding: str, per_group: bool) -> str | None:
    """What calibration must gather for ``rounding``: None, ``pooled`` or ``groups``."""
    if not rounding_method(rounding).needs_moments:
        return None
    return "groups" if per_group else "pooled"


def check_moments_fit(layers, moments: str | None) -> None:
    """ConfigError, before any work, when GPTQ's pooled second moments would pass the limit
    (``hessian.MAX_MOMENTS_BYTES``; the full-size SD 1.5 UNet needs 28 GB of them, and GPTQ on a
    23040-column layer takes minutes here). Per-group moments add one such set per group, on
    disk (memory-mapped), not in memory."""
    need = hessian.moments_bytes(layers)
    if moments is not None and need > hessian.MAX_MOMENTS_BYTES:  # read here: tests lower the limit
        raise ConfigError(f"GPTQ rounding needs the second moments of every layer's input: {need / 1e9:.1f} GB for "
                          f"this model (limit {hessian.MAX_MOMENTS_BYTES / 1e9:.0f} GB); pass --rounding rtn (round to "
                          "nearest)")


def probe_inputs(fp: Path, tensors_of, calib, config: AnalysisConfig, conditions: tuple | None = None,
                 weight_grid_bits: int = 8):
    """(probe, X, T, C, fp bundle) for an fp32 export: the probe fake-quantizes
    ``tensors_of(proto, layers)``; X, T (C: conditions, None for unconditional models) are each
    group's inputs from fp32 trajectories, guided like the calibration's. ``conditions``:
    (Conditioning, rows) as :func:`conditioning` returns them (worked out from the calibration's
    config when not given). Weights are rounded as the target stores them (``weight_grid_bits``)."""
    spec, rows = conditions if conditions is not None else conditioning(fp, calib.config)
    layer_map = load_layer_map(fp)
    proto = onnxio.load(fp / "model.onnx", weights=False)
    bundle = Bundle.open(fp)
    probe = make_probe(proto, layer_map, tensors_of(proto, layer_map.layers), bundle.sample_shape, source=fp / "model.onnx",
                       conditioning=spec, base_dir=fp, rounder=rounder(calib, config.rounding, weight_grid_bits))
    X, T, C = group_inputs(bundle, calib.groups, config, calib.config.sampling(bundle.schedule), config.seed,
                           conditioning=spec,
                           cond=rows, guidance_scale=calib.config.guidance_scale)
    return probe, X, T, C, bundle


def rd_record(calib, config: AnalysisConfig, conditions: tuple | None = None, per_group: bool = False) -> dict:
    """What RD curves are measured from (stored with them, and in a mixed bundle's plan):
    both configs, ``per_group_rounding`` when each group's weights are rounded on its own
    moments, and, for conditional models, a digest of the conditions and null condition."""
    record = {"analysis": config.to_dict(), "calibration": calib.config.to_dict()}
    if per_group and moments_needed(config.rounding, per_group):  # weights rounded on each group's moments
        record["per_group_rounding"] = True
    if conditions is not None and conditions[0]:
        spec, rows = conditions
        record["conditions"] = _digest(_arrays_digest(rows), _arrays_digest(spec.null or {}))[:16]
    return record


def rd_key(record: dict, profile: TargetProfile = ORT_CPU) -> str:
    """Cache key of RD curves from their record (:func:`rd_record`)."""
    extra = [record["conditions"]] if "conditions" in record else []
    extra += ["per_group_rounding"] if record.get("per_group_rounding") else []
    if moments_needed(record["analysis"].get("rounding", "rtn"), False):
        # the curves hold weights rounded on the moments: the method's version and the moments' schema

        extra += [f"gptq{GPTQ_VERSION}", f"moments{MOMENTS_SCHEMA_VERSION}x{MOMENT_ROWS}"]
    if profile.weight_grid_bits < 8:  # the curves' weights are rounded to this grid
        extra.append(f"grid{profile.weight_grid_bits}")
    return _digest([RD_SCHEMA_VERSION, CALIB_SCHEMA_VERSION], record["calibration"], record["analysis"],
                   *_profile_part(profile), *extra)[:12]


def rd_curves(fp: Path, calib, config: AnalysisConfig, profile: TargetProfile = ORT_CPU, progress=None,
              conditions: tuple | None = None, per_group: bool = False, pool=None):
    """RD curves of an fp32 export (RDCurves), cached under ``cache_dir()/rd`` and resumable.
    Conditional models are measured on ``conditions`` ((Conditioning, rows), see
    :func:`conditioning`; worked out from the calibration's config when not given). Weights
    are rounded by ``config.rounding`` as the build stores them (``calib`` must carry moments
    for gptq); ``per_group``: per-group weights, each group rounded on its own moments."""
    conditions = conditions if conditions is not None else conditioning(fp, calib.config)
    record = rd_record(calib, config, conditions, per_group)
    path = cache_dir() / "rd" / f"{fp.name}-{rd_key(record, profile)}"
    if (path / "curves.json").is_file():
        try:
            return RDCurves.load(path)
        except ArtifactError:
            shutil.rmtree(path, ignore_errors=True)
    # Activation curves are per layer input (the Conv outputs the bundle also quantizes, for
    # fusion, are not a layer's choice).
    probe, X, T, C, _ = probe_inputs(fp, profile.layer_input_tensors, calib, config, conditions,
                                     profile.weight_grid_bits)
    ranges = {b: calib.ranges(bits=b) for b in config.act_bits}
    state = path.with_name(path.name + ".partial")
    curves = measure_curves(probe, X, T, ranges, config, groups=[(g.t_start, g.t_end) for g in calib.groups],
                          record=record, state_dir=state, progress=progress, C=C,
                          per_group=bool(record.get("per_group_rounding")), pool=pool)
    curves.save(path)
    shutil.rmtree(state, ignore_errors=True)
    return curves


def find_curves(record: dict, profile: TargetProfile = ORT_CPU):
    """The cached RD curves a plan record ({"calibration": ..., "analysis": ...}) names, or None."""
    key = rd_key(record, profile)
    for hit in sorted((cache_dir() / "rd").glob(f"*-{key}/curves.json")):
        try:
            return RDCurves.load(hit.parent)
        except ArtifactError:
            continue
    return None
