"""Compiling a model into a bundle, as a short list of named steps (see :func:`build`).

Each step takes and returns typed values; only the last one writes the manifest. The stages
it runs (fp32 export, calibration, RD curves) come from :mod:`dmcompile.stages`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from dmruntime import Bundle
from dmruntime.conditioning import NULL_FILE, TABLE_FILE, Conditioning, cycle_rows

from . import onnxio, stages
from .artifacts import BUNDLE, atomic_dir, check_replaceable, write_manifest
from .calibration.trajectory import CalibrationResult, groups_without_steps
from .config import BuildConfig, MixedRecipe, SampleConfig
from .errors import ConfigError
from .frontend.layermap import Layer, LayerMap
from .frontend.load import LoadedModel
from .lowering.precision import LayerPrecision, resolve
from .memory import memory_entry
from .targets import ORT_CPU, TargetProfile, get_profile

__all__ = ["BuildResult", "build"]


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """The bundle folder and its manifest."""

    path: Path
    manifest: dict


@dataclasses.dataclass(frozen=True)
class Workspace:
    """What every step works on: the model's description, its fp32 export and layer map, the
    target profile, and the resolved per-layer precision. The torch model itself is not kept:
    after the export every step reads the ONNX files (3.4 GB less resident for SD 1.5)."""

    model: dict  # LoadedModel.describe()
    scheduler: dict  # the diffusers scheduler config
    fp: Path
    layer_map: LayerMap
    profile: TargetProfile
    precision: LayerPrecision
    conditioning: Conditioning  # the model's conditioning inputs and the null condition (none: unconditional)
    conditions: dict | None  # calibration conditions, one row per trajectory
    decoder: dict | None  # latent models: the export's decoder entry (decoder.onnx in ``fp``)

    @property
    def calibration_conditions(self) -> tuple:
        """(Conditioning, rows): what calibration, RD curves and the step-aware check are driven by."""
        return self.conditioning, self.conditions

    @property
    def weight_layers(self) -> list[Layer]:
        """Quantized layers with weights, in graph order: the columns of a WeightPlan."""
        return self.precision.weight_layers(self.layer_map)


@dataclasses.dataclass(frozen=True)
class WeightPlan:
    """bits[g, l]: weight width of ``Workspace.weight_layers[l]`` in timestep group g;
    record: the manifest's "plan" entry (None for W8A8); per_group_rounding: each engine's
    weights are rounded on its own groups' moments (GPTQ with per-group weights), so groups
    with equal widths still hold different weights."""

    bits: np.ndarray
    record: dict | None
    per_group_rounding: bool = False

    def scope(self, members) -> tuple[int, ...] | None:
        """The groups whose moments round an engine's weights (None: all, pooled)."""
        return tuple(int(g) for g in members) if self.per_group_rounding else None


def per_group_weights(config: BuildConfig) -> bool:
    """Whether the recipe gives each timestep group its own weights (``--per-group-weights``)."""
    return isinstance(config.recipe, MixedRecipe) and not config.recipe.share_weights


@dataclasses.dataclass(frozen=True)
class EngineSet:
    """Engines by file name (fused graphs to write; on openvino-cpu the files already written);
    per group, its engine and the inputs it feeds it (none on openvino-cpu: scales are compiled in)."""

    engines: dict[str, onnx.ModelProto | Path]
    engine_of: tuple[str, ...]
    params: tuple[dict, ...]
    first_group: dict[str, int]  # engine -> a group it serves (all its groups share weights)
    fusion: dict[str, dict]  # engine -> integer-kernel counts after the backend's optimisation
    written: tuple[str, ...] = ()  # files the backend wrote into the bundle already


@dataclasses.dataclass(frozen=True)
class StoredWeights:
    """Quantized weights kept outside the engines (weights.npz): key -> (int8 array, grid
    bits), and per engine the initializers it takes from there."""

    tensors: dict[str, tuple[np.ndarray, int]]
    external: dict[str, dict[str, str]]


def build(model: LoadedModel | str | Path | None, out: str | Path, config: BuildConfig = BuildConfig(),
          progress=None) -> BuildResult:
    """Compile a model into a bundle: per timestep group, activation scales calibrated on the
    inputs that group sees. ``W8A8Recipe``: int8 weights everywhere. ``MixedRecipe``: per-layer
    weight widths chosen by rate-distortion allocation under a budget (or pinned by
    overrides), 4-bit weights stored packed. On ort-cpu, groups with the same weights share one
    fused integer ONNX Runtime engine and feed it their own scales, zero points and int32 biases
    (group_XX.npz); on openvino-cpu each engine is a group's (or, with ``max_engines``, a run of
    groups') QDQ graph with its scales in it, all engines reading one weights.bin. ``out`` must be absent, empty or an earlier bundle; it is written to a
    temporary folder and renamed when complete."""
    t0 = time.perf_counter()
    check_replaceable(Path(out), BUNDLE)  # before minutes of work; atomic_dir checks again at the end
    ws = prepare(model, config)
    calib = calibrate(ws, config, progress)
    plan = allocate(ws, calib, config, progress)
    qdq_files = ws.profile.backend in ("openvino", "tensorrt")  # engines are QDQ graphs, scales in them
    engines = stored = None
    if not qdq_files:
        engines = fuse_and_merge(lower(ws, calib, plan, progress, rounding=config.analysis.rounding))
        stored = externalize_weights(ws, engines, plan) if isinstance(config.recipe, MixedRecipe) else None
    decoder = lower_decoder(ws, config, progress) if config.decoder == "w8a8" else None
    # OpenVINO's compile cache for this build: the correction and the fidelity check open the bundle
    # in turn, the second one imports the compiled engines (a second start: 4.9x faster on
    # ddpm-cifar10-32, benchmarks/README.md)
    with tempfile.TemporaryDirectory(prefix="dmcompile-ov-") as cache, atomic_dir(Path(out), BUNDLE) as tmp:
        if qdq_files:  # written as they are lowered: one QDQ graph in memory at a time
            engines = write_qdq_engines(tmp, ws, calib, plan, config, progress)
        files = write_engines(tmp, engines, stored, ws, decoder)
        if ws.profile.backend == "tensorrt":
            from .backends.tensorrt import write_build_script

            files.append(write_build_script(tmp))
        body = describe(ws, calib, plan, engines, stored, config, decoder)
        if config.correction:
            body["correction"] = estimate_corrections(tmp, body, ws, calib, config, progress, cache)
        if config.step_aware:
            body["step_aware_activation"] = step_aware(ws, calib, plan, config)
        if config.eval_samples:
            body["fidelity"] = check_fidelity(tmp, body, ws, config, cache)
        body["build"]["seconds"] = round(time.perf_counter() - t0, 2)
        manifest = write_manifest(tmp, body, files)
        if ws.profile.backend == "tensorrt" and body["engine"]["tensorrt"]["built_here"]:
            from dmruntime.tensorrt.build import build_engines

            build_engines(tmp, progress=progress and (lambda i, n: progress("tensorrt", i, n)))
    return BuildResult(Path(out), manifest)


def prepare(model: LoadedModel | str | Path | None, config: BuildConfig) -> Workspace:
    """Load the model, export it (cached), resolve the overrides; fail early on options that
    cannot work with this model (before minutes of calibration)."""
    model = stages.as_model(model, seed=config.seed)
    fp = stages.fp_bundle(model)
    layer_map = stages.load_layer_map(fp)
    spec, rows = stages.conditioning(fp, config.calibration, config.null_class)
    decoder = json.loads((fp / "manifest.json").read_text()).get("decoder")
    profile = get_profile(config.profile)
    if profile.quantize_residual_skip and not config.residual_int8:
        profile = dataclasses.replace(profile, quantize_residual_skip=False)
    ws = Workspace(model.describe(), model.scheduler_config, fp, layer_map, profile,
                   resolve(layer_map, config.overrides, profile), spec, rows, decoder)
    stages.check_moments_fit(layer_map.layers, stages.moments_needed(config.analysis.rounding,
                                                                     per_group_weights(config)))
    if config.decoder != "fp32" and not decoder:
        raise ConfigError(f"--decoder {config.decoder} applies to latent models (a pipeline folder with vae/); "
                          f"{model.id} has no decoder")
    recipe = config.recipe
    if config.step_aware or (isinstance(recipe, MixedRecipe) and recipe.budget is not None):
        from dmruntime import NoiseSchedule

        empty = groups_without_steps(NoiseSchedule.from_config(model.scheduler_config), config.calibration)
        if empty:
            g = empty[0]
            raise ConfigError(f"no step of a {config.calibration.steps}-step DDIM run falls in timestep group "
                              f"{g.index} [{g.t_start}, {g.t_end}) ({len(empty)} of {config.calibration.groups} "
                              "groups are empty), so RD curves and the step-aware check have no inputs there; "
                              "use fewer groups (--groups) or more calibration steps (--calib-steps)")
    return ws


def calibrate(ws: Workspace, config: BuildConfig, progress=None) -> CalibrationResult:
    """Per-group activation statistics of every tensor the profile quantizes (cached)."""
    return stages.calibrate(ws.fp, config.calibration, ws.profile,
                            progress=progress and (lambda i, n: progress("calibrate", i, n)),
                            conditions=ws.calibration_conditions,
                            moments=stages.moments_needed(config.analysis.rounding, per_group_weights(config)))


def allocate(ws: Workspace, calib: CalibrationResult, config: BuildConfig, progress=None) -> WeightPlan:
    """Weight widths per group and layer: 8 everywhere (W8A8), the overrides' widths, or an
    RD allocation under the budget with pinned layers fixed."""
    from .analysis.plan import bops, check_bits, check_feasible, plan_bits

    layers = ws.weight_layers
    K, recipe = len(calib.groups), config.recipe
    per_group = per_group_weights(config) and config.analysis.rounding != "rtn"
    if not isinstance(recipe, MixedRecipe):
        return WeightPlan(np.full((K, len(layers)), 8), None)
    pinned = {i: ws.precision.pinned_bits[l.node] for i, l in enumerate(layers) if l.node in ws.precision.pinned_bits}
    if recipe.budget is None:
        free = [l.node for i, l in enumerate(layers) if i not in pinned]
        if free:
            raise ConfigError(f"no weight width for layer {free[0]} ({len(free)} layers have none); add a '*' rule "
                              "(e.g. --weight-bits '*=4,first_conv=8') or pass --budget to allocate the rest")
        bits = np.tile([pinned[i] for i in range(len(layers))], (K, 1))
        record = {"overrides": [str(o) for o in recipe.overrides], "share_weights": True}
    else:
        allowed = tuple(config.analysis.weight_bits if recipe.allow_simulated_bits else ws.profile.weight_bits)
        quantized = ws.precision.quantized
        fixed = sum(bops(l, None, 8 if l.node in quantized else None) for l in ws.layer_map.layers
                    if l not in layers)
        storage = ws.profile.storage_bits  # bytes budgets: what this target really stores
        check_feasible(layers, allowed, recipe.budget, fixed, pinned=pinned, storage=storage)  # before the curves
        curves = stages.analyze(ws.fp, calib, config.analysis, ws.profile, progress,
                                conditions=ws.calibration_conditions, per_group=per_group)
        idx = [curves.layers.index(l.node) for l in layers]
        bits, record = plan_bits(curves.weight[:, idx], layers, curves.weight_bits, allowed, recipe.budget,
                                 recipe.allocator, share=recipe.share_weights, fixed_bops=fixed, pinned=pinned,
                                 storage=storage, allow_float=recipe.allow_float,
                                 group_weights=_step_shares(ws, calib))
        record["overrides"] = [str(o) for o in recipe.overrides]
        record["curves"] = {"config": curves.config, "seconds": curves.seconds}
    check_bits({int(b) for b in bits.ravel()}, ws.profile.weight_bits, allow_simulated=recipe.allow_simulated_bits)
    n = sum(l.params for l in layers)
    record["average_weight_bits"] = [float((bits[g] * [l.params for l in layers]).sum() / n) for g in range(K)]
    if ws.profile.weight_only_ops:  # tensorrt: 4-bit only as INT4 weight-only MatMul/Gemm
        int8 = [l.node for i, l in enumerate(layers) if any(2 <= b <= 4 for b in bits[:, i])
                and not weight_only(ws.profile, l, int(bits[:, i].min()))]
        if int8:
            record["stored_int8"] = {"layers": int8, "why": f"{ws.profile.name} has 4-bit weights only as INT4 "
                                     "weight-only MatMul/Gemm blocks: these run as INT8 with their 4-bit values"}
    record["rounding"] = config.analysis.rounding
    return WeightPlan(bits, record, per_group)


def _step_shares(ws: Workspace, calib: CalibrationResult) -> np.ndarray:
    """Each group's share of the steps of a DDIM run like the calibration's."""
    from dmruntime import NoiseSchedule, group_lookup, sampler_timesteps

    schedule = NoiseSchedule.from_config(ws.scheduler)
    lookup = group_lookup(calib.groups, schedule.num_train_timesteps)
    steps = np.bincount([int(lookup[t]) for t in sampler_timesteps(schedule, calib.config.steps)],
                        minlength=len(calib.groups))
    return steps / steps.sum()


def lower(ws: Workspace, calib: CalibrationResult, plan: WeightPlan, progress=None,
          clusters: list[list[int]] | None = None, ranges: list[dict] | None = None,
          *, rounding: str) -> Iterator[tuple[int, tuple, onnx.ModelProto]]:
    """Per group: (group index, its weights' key: (widths, rounding scope), its QDQ graph with
    that group's activation ranges), yielded one at a time so that only one unfused graph is
    held; graphs with equal keys hold byte-identical weights. With ``clusters`` (lists of groups
    with equal widths), one graph per cluster instead, with the union of its groups' ranges,
    indexed by cluster. Weights are rounded by ``rounding`` (``calib`` carries the moments
    GPTQ needs), each (weight, width, scope) once."""
    from .analysis.plan import FLOAT_BITS
    from .quant import merge_ranges
    from .lowering.qdq import lower_group

    # The graph only: a big model's weights stay on disk until quantized one at a time.
    fp_proto = onnxio.load(ws.fp / "model.onnx", weights=False)
    inits = {i.name: i for i in fp_proto.graph.initializer}
    ranges = ranges or calib.ranges()  # (the caller may have them already: computing them is not free)
    clusters = clusters or [[g.index] for g in calib.groups]
    rounder = stages.rounder(calib, rounding)
    cache: dict[tuple, object] = {}  # each weight quantized once per width and scope
    for c, members in enumerate(clusters):
        widths = plan.bits[members[0]]
        assert all((plan.bits[g] == widths).all() for g in members), "a cluster mixes weight widths"
        scope = plan.scope(members)
        weights = {}
        floats = {layer.node for layer, b in zip(ws.weight_layers, widths) if b == FLOAT_BITS}
        for layer, b in zip(ws.weight_layers, widths):
            if b == FLOAT_BITS:  # kept in float in these groups (allow_float)
                continue
            key = (layer.weight, int(b), scope)
            if key not in cache:
                cache[key] = rounder.quantize(layer, onnxio.array(inits[layer.weight], ws.fp), int(b), scope)
            weights[layer.weight] = cache[key]
        yield c, (tuple(int(b) for b in widths), scope), lower_group(
            fp_proto, ws.layer_map, set(ws.precision.quantized) - floats, weights,
            merge_ranges([ranges[g] for g in members]),
            ws.profile, ws.fp)
        if progress:
            progress("lower", c + 1, len(clusters))


def write_qdq_engines(folder: Path, ws: Workspace, calib: CalibrationResult, plan: WeightPlan,
                      config: BuildConfig, progress=None) -> EngineSet:
    """openvino-cpu and tensorrt: one QDQ graph per engine (a group, or adjacent groups merged down
    to ``config.max_engines``), written as lowered; the weights they share go once into weights.bin.
    openvino-cpu counts the int8 layers after OpenVINO compiles each distinct weight layout;
    tensorrt types each graph FP16, checks TensorRT's rules and counts what it quantizes."""
    from .backends.openvino import WEIGHTS_FILE, SharedWeights, cluster_groups, engine_file

    if ws.profile.backend == "tensorrt":
        from .backends.tensorrt import engine_report, finish_engine

        def report(path):
            return engine_report(onnx.load(str(path), load_external_data=False))
    else:
        from .backends.openvino import fusion_report as report

        finish_engine = None
    K = len(calib.groups)
    ranges = calib.ranges()
    clusters = cluster_groups(ranges, [tuple(plan.bits[g]) for g in range(K)], config.max_engines)
    writer = SharedWeights(folder)
    engines, engine_of, first, layout = {}, {}, {}, {}
    try:
        for c, (widths, _), model in lower(ws, calib, plan, progress, clusters=clusters, ranges=ranges,
                                           rounding=config.analysis.rounding):
            if finish_engine is not None:
                model = finish_engine(model, ws.profile.quantize_residual_skip)
            name = writer.add(model, engine_file(c))
            del model
            engines[name], first[name] = folder / name, clusters[c][0]
            layout.setdefault(widths, name)
            for g in clusters[c]:
                engine_of[g] = name
    finally:
        writer.close()
    # Engines of one layout differ only in scales: the backend treats them alike.
    reports = {name: report(folder / name) for name in layout.values()}
    fusion = {name: reports[layout[tuple(int(b) for b in plan.bits[first[name]])]] for name in engines}
    return EngineSet(engines, tuple(engine_of[g] for g in range(K)), tuple({} for _ in range(K)), first, fusion,
                     written=(*engines, WEIGHTS_FILE))


def fuse_and_merge(lowered) -> EngineSet:
    """Fuse each group's QDQ graph with ONNX Runtime; groups with the same weights (equal
    keys from :func:`lower`: byte-identical weights) become one engine whose per-group constants
    are inputs; count the integer kernels of each engine."""
    from .backends.onnxruntime import ENGINE_FILE, GroupMerger, fusion_report, optimize_for_cpu

    sets: dict[tuple, tuple[GroupMerger, list[int]]] = {}
    for g, key, model in lowered:
        merger, members = sets.setdefault(key, (GroupMerger(), []))
        merger.add(optimize_for_cpu(model))
        members.append(g)
        del model
    engines, engine_of, params, first = {}, {}, {}, {}
    for i, (merger, members) in enumerate(sets.values()):
        merged, ps = merger.result()
        name = ENGINE_FILE if len(sets) == 1 else f"unet_{i}.onnx"
        engines[name], first[name] = merged, members[0]
        for g, p in zip(members, ps):
            engine_of[g], params[g] = name, p
    K = len(engine_of)
    fusion = {name: fusion_report(model) for name, model in engines.items()}
    return EngineSet(engines, tuple(engine_of[g] for g in range(K)), tuple(params[g] for g in range(K)), first, fusion)


def externalize_weights(ws: Workspace, engines: EngineSet, plan: WeightPlan) -> StoredWeights:
    """Take the quantized weights out of the engines (marked external, no bytes) into one
    store that the runtime expands (4-bit ones unpacked) and hands every engine; the float
    weights of layers a group keeps float stay in its engine."""
    from .analysis.plan import FLOAT_BITS
    from .backends.onnxruntime import externalize_weights as externalize

    tensors: dict = {}
    external = {}
    for name, model in engines.engines.items():
        first = engines.first_group[name]
        widths = {l.weight: b for l, b in zip(ws.weight_layers, plan.bits[first]) if b != FLOAT_BITS}
        scope = plan.scope([first])  # per-group rounding: one engine per group, its own weights
        external[name] = externalize(model, widths, tensors, "" if scope is None else f"/g{first}")
    return StoredWeights(tensors, external)


def write_engines(folder: Path, engines: EngineSet, stored: StoredWeights | None, ws: Workspace,
                  decoder: DecoderEngine | None = None) -> list[str]:
    """Engine files, one group_XX.npz of engine inputs per group, weights.npz, the null
    condition of guidance and the class table, the decoder (the export's fp32 one, or
    ``decoder``'s int8 one); their names."""
    from .backends.onnxruntime import WEIGHTS_FILE, save_engine

    if engines.written:
        files = list(engines.written)
    else:
        files = save_engine(folder, engines.engines, list(engines.params), group_files(len(engines.engine_of)))
    if stored is not None:
        _save_weights(folder / WEIGHTS_FILE, stored.tensors)
        files.append(WEIGHTS_FILE)
    null, table = ws.conditioning.null, ws.conditioning.class_table
    if null:
        with open(folder / NULL_FILE, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in sorted(null.items())})
        files.append(NULL_FILE)
    if table is not None:
        with open(folder / TABLE_FILE, "wb") as f:
            np.savez(f, class_table=table)
        files.append(TABLE_FILE)
    if decoder is not None:
        files += onnxio.save(decoder.model, folder / ws.decoder["file"])
    elif ws.decoder:  # latent models: the fp32 decoder of the export, as it is
        shutil.copyfile(ws.fp / ws.decoder["file"], folder / ws.decoder["file"])
        files.append(ws.decoder["file"])
    return files


DECODER_STREAM = 0xDEC


@dataclasses.dataclass(frozen=True)
class DecoderEngine:
    """The int8 decoder and its manifest record (calibration, fidelity against fp32, fusion)."""

    model: onnx.ModelProto
    record: dict


def lower_decoder(ws: Workspace, config: BuildConfig, progress=None) -> DecoderEngine:
    """W8A8 decoder: activation ranges from ``config.decoder_calib_size`` latents the fp32 model
    samples (guided and conditioned like the calibration); PSNR against the fp32 decoder on as
    many latents of another random stream."""
    from dmruntime import DDIMSampler

    from .backends.onnxruntime import fusion_report, optimize_for_cpu
    from .eval.metrics import psnr
    from .lowering.decoder import lower_decoder as lower

    cal = config.calibration
    fpb = Bundle.open(ws.fp)
    n = config.decoder_calib_size

    def latents(stream: int) -> np.ndarray:
        sampler = DDIMSampler(fpb, steps=cal.steps, batch_size=cal.batch_size, guidance_scale=cal.guidance_scale,
                              null_cond=ws.conditioning.null)
        return sampler.sample(n, seed=[config.seed, DECODER_STREAM, stream], cond=cycle_rows(ws.conditions, n))

    calib, held_out = latents(0), latents(1)
    if progress:
        progress("decoder", 1, 2)
    # the decoder runs on ONNX Runtime whatever the UNet's target: lowered for ort-cpu
    qdq, layers = lower(ws.fp / ws.decoder["file"], calib, ORT_CPU, cal.observer, cal.percentile, cal.bins)
    model = optimize_for_cpu(qdq)
    want = fpb.decode(held_out)
    got = onnxio.session(model).run(["image"], {"latents": held_out})[0]
    if progress:
        progress("decoder", 2, 2)
    return DecoderEngine(model, {
        "calibration": {"latents": n, "steps": cal.steps, "guidance_scale": cal.guidance_scale,
                        "observer": cal.observer},
        "layers": layers, "fusion": fusion_report(model),
        "psnr_db_vs_fp32": float(np.mean(psnr(got, want))), "max_abs_err_vs_fp32": float(np.abs(got - want).max())})


def group_files(k: int) -> list[str]:
    return [f"group_{g:02d}.npz" for g in range(k)]


def describe(ws: Workspace, calib: CalibrationResult, plan: WeightPlan, engines: EngineSet,
             stored: StoredWeights | None, config: BuildConfig, decoder: DecoderEngine | None = None) -> dict:
    """The manifest body (everything but measurements and file hashes)."""
    fusion = engines.fusion
    names = group_files(len(calib.groups))
    body = {
        "format": config.format, "profile": ws.profile.name,
        "model": ws.model, "scheduler": ws.scheduler,
        "groups": [{"index": g.index, "t_start": g.t_start, "t_end": g.t_end, "engine": engines.engine_of[g.index],
                    "inputs": f if engines.params[g.index] else None} for g, f in zip(calib.groups, names)],
        "engine": {"file": sorted(engines.engines)[0], "runtime": ws.profile.backend,
                   "onnxruntime_version": _ort_version(), "group_inputs": sorted(engines.params[0]),
                   **_backend_entry(ws, engines)},
        "precision": {"activation_dtype": ws.profile.activation_dtype, "layers": _precision_layers(ws, plan)},
        "calibration": calib.config.to_dict(),
        "build": {"config": config.to_dict(), "fusion": next(iter(fusion.values())) if len(fusion) == 1 else
                  {"ratio": min(f["ratio"] for f in fusion.values()), "engines": fusion}},
    }
    if stored is not None:
        from .backends.onnxruntime import WEIGHTS_FILE

        body["engines"] = {name: {"external_weights": ext} for name, ext in stored.external.items()}
        body["weights"] = _weights_entry(WEIGHTS_FILE, stored.tensors)
    if plan.record:
        body["plan"] = plan.record
    if ws.decoder:
        body["decoder"] = ws.decoder if decoder is None else {**ws.decoder, "precision": "w8a8",
                                                               "w8a8": decoder.record}
    # Activation liveness of the fp32 graphs: `dmcompile inspect`'s resident-memory estimate.
    body["memory"] = memory_entry(ws.fp, ws.decoder["file"] if ws.decoder else None,
                                  ws.conditioning.sequence_length if ws.conditioning else None)
    if ws.conditioning:
        body["conditioning"] = ws.conditioning.to_manifest(
            NULL_FILE if ws.conditioning.null else None, TABLE_FILE if ws.conditioning.class_table is not None else None)
        body["conditioning"]["calibration_guidance_scale"] = calib.config.guidance_scale
    return body


def estimate_corrections(folder: Path, body: dict, ws: Workspace, calib: CalibrationResult, config: BuildConfig,
                         progress=None, cache_dir=None) -> dict:
    """PTQD statistics of the written engines (read through the runtime, correction off)."""
    from .calibration.correction import estimate_correction

    bundle = Bundle(Path(folder), body, correction=False, cache_dir=cache_dir, device="cpu")
    return estimate_correction(bundle, Bundle.open(ws.fp),
                               calib.config.steps, config.correction_size, config.seed,
                               progress=progress and (lambda i, n: progress("correction", i, n)),
                               cond=cycle_rows(ws.conditions, config.correction_size),
                               guidance_scale=calib.config.guidance_scale)


def step_aware(ws: Workspace, calib: CalibrationResult, plan: WeightPlan, config: BuildConfig) -> dict:
    """PTQD's step-aware activation widths per group (a report on ort-cpu)."""
    from .analysis.plan import FLOAT_BITS
    from .analysis.stepaware import select_activation_bits

    # every tensor the bundle quantizes, Conv outputs included: this judges the whole engine
    probe, X, T, C, fpb = stages.probe_inputs(ws.fp, ws.profile.quantized_tensors, calib, config.analysis,
                                              ws.calibration_conditions)
    col = {l.node: i for i, l in enumerate(ws.weight_layers)}
    wb = np.array([[plan.bits[g, col[l.node]] if l.node in col and plan.bits[g, col[l.node]] != FLOAT_BITS else None
                    for l in probe.layers] for g in range(len(calib.groups))], dtype=object)
    cands = tuple(config.analysis.act_bits)
    ranges = {b: calib.ranges(bits=b) for b in cands}
    return select_activation_bits(probe, X, T, ranges, wb, fpb.schedule, calib.groups, cands,
                                  ws.profile.activation_bits, C=C)


def check_fidelity(folder: Path, body: dict, ws: Workspace, config: BuildConfig, cache_dir=None) -> dict:
    """Paired PSNR/SSIM of the bundle (as the runtime runs it) against the fp32 export:
    DDIM 50 steps, eta 0, same seeds."""
    from .eval.metrics import psnr, ssim

    n, seed = config.eval_samples, config.seed
    guidance = config.calibration.guidance_scale
    cfg = SampleConfig(n=n, steps=50, seed=seed, guidance_scale=guidance)
    cond, null = cycle_rows(ws.conditions, n), ws.conditioning.null
    got = stages.sample_model(Bundle(Path(folder), body, cache_dir=cache_dir, device="cpu"), cfg, cond=cond)
    want = stages.sample_model(Bundle.open(ws.fp), cfg, cond=cond, null_cond=null)
    return {"samples": n, "steps": 50, "eta": 0.0, "seed": seed, "guidance_scale": guidance,
            "reference": "fp32 ONNX export",
            "psnr_db_mean": float(np.mean(np.minimum(psnr(got, want), 200.0))),
            "ssim_mean": float(np.mean(ssim(got, want)))}


def _save_weights(path: Path, tensors: dict) -> None:
    from .quant import encode

    arrays = {key: encode(q, b)[0] for key, (q, b) in sorted(tensors.items())}
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _weights_entry(name: str, tensors: dict) -> dict:
    from .quant import encode

    return {"file": name, "tensors": {key: encode(q, b)[1] for key, (q, b) in sorted(tensors.items())}}


def _precision_layers(ws: Workspace, plan: WeightPlan) -> list[dict]:
    """Per layer: widths per group (32: kept float in that group, ``float_groups`` lists them)."""
    from .analysis.plan import FLOAT_BITS, bops

    col = {l.node: i for i, l in enumerate(ws.weight_layers)}
    bits = plan.bits
    out = []
    for l in ws.layer_map.layers:
        q = l.node in ws.precision.quantized
        wb = [int(b) for b in bits[:, col[l.node]]] if l.node in col else None
        entry = {"node": l.node, "module": l.module, "op_type": l.op_type, "weight": l.weight, "weight_bits": wb,
                 "storage_bits": [b if b == FLOAT_BITS else _storage(ws.profile, l, b) for b in wb] if wb else None,
                 "activation": ws.profile.activation_dtype if q else "float", "activation_bits": 8 if q else None,
                 "macs": l.macs, "params": l.params,
                 "bops": [bops(l, b, 8 if q and b != FLOAT_BITS else None) for b in (wb or [None] * len(bits))]}
        if wb and FLOAT_BITS in wb:
            entry["float_groups"] = [g for g, b in enumerate(wb) if b == FLOAT_BITS]
        wo = [g for g, b in enumerate(wb or []) if b != FLOAT_BITS and weight_only(ws.profile, l, b)]
        if wo:  # TensorRT's INT4 MatMul/Gemm: the input stays float in these groups
            entry["weight_only_groups"] = wo
            entry["bops"] = [bops(l, b, None) if g in wo else x for g, (b, x) in enumerate(zip(wb, entry["bops"]))]
        out.append(entry)
    return out


def _storage(profile: TargetProfile, layer: Layer, bits: int) -> int:
    """Bits per stored weight; a weight-only width with no block layout for this shape: int8."""
    st = profile.storage_bits(bits, layer.op_type)
    return 8 if profile.weight_only_ops and st == 4 and not weight_only(profile, layer, bits) else st


def weight_only(profile: TargetProfile, layer: Layer, bits: int) -> bool:
    """Whether ``layer`` at ``bits`` runs weight-only on ``profile`` (an INT4 block layout exists)."""
    from .lowering.qdq import int4_layout

    return int4_layout(profile, layer, bits) is not None


def _backend_entry(ws: Workspace, engines: EngineSet) -> dict:
    """What the runtime needs to know beyond the ONNX Runtime fields, per backend."""
    if ws.profile.backend == "tensorrt":
        from .backends.tensorrt import engine_entry, tensorrt_available

        entry = engine_entry(list(engines.engines), ws.conditioning.null is not None)
        entry["built_here"] = tensorrt_available() is not None
        return {"tensorrt": entry}
    if ws.profile.backend != "openvino":
        return {}
    from .backends.openvino import openvino_version

    return {"openvino_version": openvino_version(), "inference_precision": "f32"}


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
