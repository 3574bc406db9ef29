"""The build's steps up to the engines: prepare the workspace, calibrate, allocate weight widths,
quantize the decoder. Each takes and returns typed values (``compiler/workspace.py``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
from dmruntime import Bundle, InputError, NoiseSchedule, group_lookup
from dmruntime import COMPONENTS
from dmruntime.conditioning import cycle_rows

from .. import onnxio, parallel, stages
from ..analysis.plan import bops, check_bits, check_feasible, plan_bits
from ..backends.onnxruntime import ort_fusion_report, optimize_for_cpu
from ..calibration.recorder import record_trajectories
from ..calibration.trajectory import CalibrationResult, groups_without_steps, no_steps_error
from ..config import BuildConfig, ExportConfig, MixedRecipe
from ..errors import ConfigError
from ..eval.metrics import psnr
from ..frontend.layermap import Layer
from ..frontend.load import LoadedModel
from ..lowering.decoder import lower_decoder
from ..lowering.precision import resolve
from ..lowering.qdq import int4_layout
from ..targets import ORT_CPU, TargetProfile, conv_params_choice, get_profile
from .workspace import ComponentEngine, WeightPlan, Workspace, per_group_weights


def prepare(model: LoadedModel | str | Path | None, config: BuildConfig) -> Workspace:
    """Load the model, export it (cached), resolve the overrides; fail early on options that
    cannot work with this model (before minutes of calibration)."""
    model = stages.as_model(model, seed=config.seed)
    fp = stages.fp_bundle(model, ExportConfig(clip_skip=config.clip_skip))
    layer_map = stages.load_layer_map(fp)
    spec, rows = stages.conditioning(fp, config.calibration, config.null_class)
    exported = json.loads((fp / "manifest.json").read_text())
    components = {key: exported[key] for key in COMPONENTS if exported.get(key)}
    profile = get_profile(config.profile)
    if profile.quantize_residual_skip and not config.residual_int8:
        profile = dataclasses.replace(profile, quantize_residual_skip=False)
    if profile.constant_conv_params and not conv_params_choice(config.constant_conv_params)[0]:
        profile = dataclasses.replace(profile, constant_conv_params=False)
    default_float = model.family.default_float if profile.family_default_float else ()
    ws = Workspace(model.describe(), model.scheduler_config, fp, layer_map, profile,
                   resolve(layer_map, config.overrides, profile, default_float), spec, rows, components)
    stages.check_moments_fit(layer_map.layers, stages.moments_needed(config.analysis.rounding,
                                                                     per_group_weights(config)))
    if config.text_encoder != "fp32" and "text" not in components:
        raise ConfigError(f"--text-encoder {config.text_encoder} applies to text-to-image models (a pipeline folder "
                          f"with tokenizer/ and text_encoder/); {model.id} has none")
    if config.decoder != "fp32" and "decoder" not in components:
        raise ConfigError(f"--decoder {config.decoder} applies to latent models (a pipeline folder with vae/); "
                          f"{model.id} has no decoder")
    recipe = config.recipe
    schedule = NoiseSchedule.from_config(model.scheduler_config)
    sampling = config.calibration.sampling(schedule)
    try:  # the sampler takes these steps (PNDM's minimum, no more than the training timesteps)
        sampling.make(schedule)
    except InputError as e:
        raise ConfigError(f"calibration sampler: {e}") from None
    if config.step_aware or (isinstance(recipe, MixedRecipe) and recipe.budget is not None):
        empty = groups_without_steps(schedule, config.calibration)
        if empty:
            raise no_steps_error(empty, sampling, config.calibration.groups)
    if isinstance(recipe, MixedRecipe) and recipe.budget is None:
        _require_widths(ws)
    if isinstance(recipe, MixedRecipe) and recipe.budget is not None:
        layers, allowed, budget, fixed, pinned, storage = _budget_terms(ws, config)
        # arithmetic on the layer map: before any calibration
        check_feasible(layers, allowed, budget, fixed, pinned=pinned, storage=storage)
    return ws


def _require_widths(ws: Workspace) -> None:
    """Without a budget, the overrides must give every weighted layer its width."""
    free = [l.node for l in ws.weight_layers if l.node not in ws.precision.pinned_bits]
    if free:
        raise ConfigError(f"no weight width for layer {free[0]} ({len(free)} layers have none); add a '*' rule "
                          "(e.g. --weight-bits '*=4,first_conv=8') or pass --budget to allocate the rest")


def _budget_terms(ws: Workspace, config: BuildConfig) -> tuple:
    """(layers, allowed widths, budget, fixed BOPs) and the pinned widths and storage widths a
    mixed-precision budget is allocated over."""
    layers, recipe = ws.weight_layers, config.recipe
    pinned = {i: ws.precision.pinned_bits[l.node] for i, l in enumerate(layers) if l.node in ws.precision.pinned_bits}
    allowed = tuple(config.analysis.weight_bits if recipe.allow_simulated_bits else ws.profile.weight_bits)
    quantized = ws.precision.quantized
    fixed = sum(bops(l, None, 8 if l.node in quantized else None) for l in ws.layer_map.layers if l not in layers)
    return layers, allowed, recipe.budget, fixed, pinned, ws.profile.storage_bits


def calibrate_workspace(ws: Workspace, config: BuildConfig, progress=None) -> CalibrationResult:
    """Per-group activation statistics of every tensor the profile quantizes (cached)."""
    with parallel.pool(config.ray, config.ray_workers) as workers:
        return stages.cached_calibration(ws.fp, config.calibration, ws.profile,
                                         progress=progress and (lambda i, n: progress("calibration trajectories", i, n)),
                                         conditions=ws.calibration_conditions, pool=workers,
                                         moments=stages.moments_needed(config.analysis.rounding, per_group_weights(config)))


def allocate_widths(ws: Workspace, calib: CalibrationResult, config: BuildConfig, progress=None) -> WeightPlan:
    """Weight widths per group and layer: 8 everywhere (W8A8), the overrides' widths, or an
    RD allocation under the budget with pinned layers fixed."""
    layers = ws.weight_layers
    K, recipe = len(calib.groups), config.recipe
    # each group's weights rounded on its own moments (a method without moments rounds them alike)
    per_group = per_group_weights(config) and stages.moments_needed(config.analysis.rounding, True) is not None
    if not isinstance(recipe, MixedRecipe):
        return WeightPlan(np.full((K, len(layers)), 8), None)
    pinned = {i: ws.precision.pinned_bits[l.node] for i, l in enumerate(layers) if l.node in ws.precision.pinned_bits}
    if recipe.budget is None:
        _require_widths(ws)
        bits = np.tile([pinned[i] for i in range(len(layers))], (K, 1))
        record = {"overrides": [str(o) for o in recipe.overrides], "share_weights": True}
    else:
        _, allowed, _, fixed, _, storage = _budget_terms(ws, config)  # storage: what this target really stores
        with parallel.pool(config.ray, config.ray_workers) as workers:
            curves = stages.rd_curves(ws.fp, calib, config.analysis, ws.profile, progress,
                                      conditions=ws.calibration_conditions, per_group=per_group, pool=workers)
        idx = [curves.layers.index(l.node) for l in layers]
        bits, record = plan_bits(curves.weight[:, idx], layers, curves.weight_bits, allowed, recipe.budget,
                                 recipe.allocator, share=recipe.share_weights, fixed_bops=fixed, pinned=pinned,
                                 storage=storage, allow_float=recipe.allow_float,
                                 group_weights=_step_shares(ws, calib))
        record["overrides"] = [str(o) for o in recipe.overrides]
        record["curves"] = {"config": curves.config, "seconds": curves.seconds, "run": curves.run}
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
    """Each group's share of the model calls of a run of the calibration's sampler."""
    schedule = NoiseSchedule.from_config(ws.scheduler)
    lookup = group_lookup(calib.groups, schedule.num_train_timesteps)
    steps = np.bincount([int(lookup[t]) for t in calib.config.sampling(schedule).model_timesteps(schedule)],
                        minlength=len(calib.groups))
    return steps / steps.sum()


DECODER_STREAM = 0xDEC


def quantize_decoder(ws: Workspace, config: BuildConfig, lowered: tuple = (), progress=None) -> tuple:
    """W8A8 decoder: activation ranges from ``config.decoder_calib_size`` latents the fp32 model
    samples (guided and conditioned like the calibration); PSNR against the fp32 decoder on as
    many latents of another random stream."""
    cal = config.calibration
    fpb = Bundle.open(ws.fp)
    n = config.decoder_calib_size

    def latents(stream: int) -> np.ndarray:  # the final samples of fp32 trajectories (nothing collected on the way)
        return record_trajectories(lambda x, t, c: {"eps": fpb.predict(x, t, c) if c else fpb.predict(x, t)},
                                   fpb.schedule, fpb.sample_shape, [], n=n, sampling=cal.sampling(fpb.schedule),
                                   seed=[config.seed, DECODER_STREAM, stream], batch_size=cal.batch_size,
                                   guidance_scale=cal.guidance_scale, cond=cycle_rows(ws.conditions, n),
                                   conditioning=fpb.conditioning, null_cond=ws.conditioning.null)

    calib, held_out = latents(0), latents(1)
    if progress:
        progress("decoder", 1, 2)
    # the decoder runs on ONNX Runtime whatever the UNet's target: lowered for ort-cpu
    qdq, layers = lower_decoder(ws.fp / ws.decoder["file"], calib, ORT_CPU, cal.observer, cal.percentile, cal.bins)
    model = optimize_for_cpu(qdq)
    want = fpb.decode(held_out)
    got = onnxio.session(model).run(["image"], {"latents": held_out})[0]
    if progress:
        progress("decoder", 2, 2)
    record = {"calibration": {"latents": n, "sampler": cal.sampling(fpb.schedule).name, "steps": cal.steps,
                              "guidance_scale": cal.guidance_scale, "observer": cal.observer},
              "layers": layers, "fusion": ort_fusion_report(model),
              "psnr_db_vs_fp32": float(np.mean(psnr(got, want))), "max_abs_err_vs_fp32": float(np.abs(got - want).max())}
    return (*lowered, ComponentEngine("decoder", {ws.decoder["file"]: model},
                                      {**ws.decoder, "precision": "w8a8", "w8a8": record}))


def storage_width(profile: TargetProfile, layer: Layer, bits: int) -> int:
    """Bits per stored weight; a weight-only width with no block layout for this shape: int8."""
    st = profile.storage_bits(bits, layer.op_type)
    return 8 if profile.weight_only_ops and st == 4 and not weight_only(profile, layer, bits) else st


def weight_only(profile: TargetProfile, layer: Layer, bits: int) -> bool:
    """Whether ``layer`` at ``bits`` runs weight-only on ``profile`` (an INT4 block layout exists)."""
    return int4_layout(profile, layer, bits) is not None


def quantize_text(ws: Workspace, config: BuildConfig, lowered: tuple = (), progress=None) -> tuple:
    """int8 text encoders (``--text-encoder int8``): ONNX Runtime's dynamic quantization, int8
    per-channel weights with activations quantized on each call (W8A8 without calibration:
    a prompt is encoded once per run, so its ranges cost nothing to measure then); the error
    of the UNet condition against fp32 measured on the calibration prompts."""
    import tempfile

    import onnx
    from dmruntime.text import TextEncoders
    from onnxruntime.quantization import QuantType, quantize_dynamic

    entry = ws.components.get("text")
    exported = json.loads((ws.fp / "manifest.json").read_text())
    prompts = stages.calibration_prompts(ws.fp, exported, config.calibration)
    want = TextEncoders(ws.fp, entry, ()).encode(prompts)[entry["condition"]]
    models, encoders = {}, []
    with tempfile.TemporaryDirectory(prefix="dmcompile-text-") as d, _quiet_root_logger():
        for i, e in enumerate(entry["encoders"]):
            quantize_dynamic(ws.fp / e["file"], Path(d) / e["file"], per_channel=True, weight_type=QuantType.QInt8)
            shutil.copyfile(ws.fp / e["tokenizer"], Path(d) / e["tokenizer"])
            models[e["file"]] = onnx.load(str(Path(d) / e["file"]))
            ops = [n.op_type for n in models[e["file"]].graph.node]
            encoders.append({**e, "precision": "int8", "int8": {
                "method": "onnxruntime dynamic quantization (int8 per-channel weights, per-call activation ranges)",
                "integer_matmuls": ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul"),
                "float_matmuls": ops.count("MatMul") + ops.count("Gemm")}})
            if progress:
                progress("text encoders", i + 1, len(entry["encoders"]))
        got = TextEncoders(Path(d), entry, ()).encode(prompts)[entry["condition"]]
    err = {"prompts": len(prompts), "max_abs_err_vs_fp32": float(np.abs(got - want).max()),
           "rel_l2_err_vs_fp32": float(np.linalg.norm(got - want) / np.linalg.norm(want))}
    return (*lowered, ComponentEngine("text", models, {**entry, "encoders": encoders, "precision": "int8",
                                                       "int8": err}))


@contextlib.contextmanager
def _quiet_root_logger():
    """ONNX Runtime's quantizer logs a pre-processing hint on the root logger for every graph."""
    import logging

    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
