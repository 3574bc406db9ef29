"""The build's measurements of the written engines: PTQD statistics, the step-aware activation
report, paired fidelity and speed against the fp32 export. Each returns its manifest entry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from dmruntime import Bundle
from dmruntime.bench import speed_check
from dmruntime.engines import engine_runtime
from dmruntime.conditioning import cycle_rows

from .. import stages
from ..backends import get_backend
from ..analysis.stepaware import select_activation_bits
from ..calibration.correction import estimate_correction
from ..calibration.trajectory import CalibrationResult
from ..config import SPEED_CHECK_MACS, BuildConfig, SampleConfig
from ..eval.metrics import psnr, ssim
from ..quant import FLOAT_BITS
from ..targets import PROFILES, TargetProfile
from .workspace import WeightPlan, Workspace


def estimate_corrections(folder: Path, body: dict, ws: Workspace, calib: CalibrationResult, config: BuildConfig,
                         progress=None, cache_dir=None) -> dict:
    """PTQD statistics of the written engines (read through the runtime, correction off)."""
    bundle = Bundle(Path(folder), body, correction=False, cache_dir=cache_dir, device="cpu")
    return estimate_correction(bundle, Bundle.open(ws.fp),
                               calib.config.sampling(bundle.schedule), config.correction_size, config.seed,
                               progress=progress and (lambda i, n: progress("correction", i, n)),
                               cond=cycle_rows(ws.conditions, config.correction_size),
                               guidance_scale=calib.config.guidance_scale)


def step_aware(ws: Workspace, calib: CalibrationResult, plan: WeightPlan, config: BuildConfig) -> dict:
    """PTQD's step-aware activation widths per group (a report on ort-cpu)."""
    # every tensor the bundle quantizes, Conv outputs included: this judges the whole engine
    probe, X, T, C, fpb = stages.probe_inputs(ws.fp, ws.profile.quantized_tensors, calib, config.analysis,
                                              ws.calibration_conditions, ws.profile.weight_grid_bits)
    col = {l.node: i for i, l in enumerate(ws.weight_layers)}
    wb = np.array([[plan.bits[g, col[l.node]] if l.node in col and plan.bits[g, col[l.node]] != FLOAT_BITS else None
                    for l in probe.layers] for g in range(len(calib.groups))], dtype=object)
    cands = tuple(config.analysis.act_bits)
    ranges = {b: calib.ranges(bits=b) for b in cands}
    return select_activation_bits(probe, X, T, ranges, wb, fpb.schedule, calib.groups, cands,
                                  ws.profile.activation_bits, C=C)


def check_fidelity(folder: Path, body: dict, ws: Workspace, config: BuildConfig, cache_dir=None) -> dict:
    """Paired PSNR/SSIM of the bundle (as the runtime runs it) against the fp32 export: the
    calibration's sampler and steps (what the bundle samples with by default), same seeds."""
    n, seed = config.eval_samples, config.seed
    guidance = config.calibration.guidance_scale
    bundle = Bundle(Path(folder), body, cache_dir=cache_dir, device="cpu")
    cfg = SampleConfig(n=n, seed=seed, guidance_scale=guidance).resolved(bundle)
    cond, null = cycle_rows(ws.conditions, n), ws.conditioning.null
    got = stages.sample_model(bundle, cfg, cond=cond)
    want = stages.sample_model(Bundle.open(ws.fp), cfg, cond=cond, null_cond=null)
    return {"samples": n, "sampler": cfg.sampler, "steps": cfg.steps, "eta": 0.0, "seed": seed,
            "guidance_scale": guidance,
            "reference": "fp32 ONNX export",
            "psnr_db_mean": float(np.mean(np.minimum(psnr(got, want), 200.0))),
            "ssim_mean": float(np.mean(ssim(got, want)))}


def wants_speed_check(config: BuildConfig, ws: Workspace) -> bool:
    """``speed_check`` True/False as given; "auto": CPU targets, UNets under SPEED_CHECK_MACS."""
    if config.speed_check != "auto":
        return bool(config.speed_check)
    return _on_cpu(ws.profile) and sum(l.macs for l in ws.layer_map.layers) < SPEED_CHECK_MACS


def _on_cpu(profile: TargetProfile) -> bool:
    """Whether a profile's engines run on the CPU (their runtime's first device)."""
    return engine_runtime(get_backend(profile.backend).name).devices[0] == "cpu"


def check_speed(folder: Path, body: dict, ws: Workspace, config: BuildConfig, cache_dir=None) -> dict | None:
    """The written engines against the fp32 export on this machine (``dmruntime.bench.speed_check``:
    per-call medians at batch 1 and 8, every group's engine in turn, interleaved), with advice
    when the bundle is slower; None when ``speed_check="auto"`` leaves this model out."""
    if not wants_speed_check(config, ws):
        return None
    if engine_runtime(body["engine"]["runtime"]).devices[0] != "cpu":
        return {"skipped": f"the engines run on a GPU ({body['engine']['runtime']}); time them there with "
                           "dmcompile bench"}
    bundle = Bundle(Path(folder), body, cache_dir=cache_dir, device="cpu")
    record = speed_check(bundle, Bundle.open(ws.fp))
    if record["slower"]:
        record["advice"] = slower_advice(ws, config)
    return record


def slower_advice(ws: Workspace, config: BuildConfig) -> str:
    """What to try when the bundle is slower than fp32 on the build machine."""
    channels = [l.weight_shape[0] for l in ws.weight_layers if l.weight_shape]
    tips = []
    if config.calibration.groups > 1 and not ws.profile.scales_in_engines:
        tips.append("--groups 1 (one set of scales, constants in the engine: no per-group inputs or corrections)")
    others = [p.name for p in PROFILES.values() if p.name != ws.profile.name and _on_cpu(p)]
    if others:
        tips.append("another CPU target (" + " or ".join(f"--target {n}" for n in others) + ")")
    tips.append("float layers for the smallest ones (--weight-bits 'PATTERN=float')")
    tips.append("or ship the fp32 export (dmcompile export): it is 4x larger but not slower")
    small = f" (median {int(np.median(channels))} output channels)" if channels else ""
    return (f"integer kernels do not pay for layers this small{small} on this machine: their quantize, dequantize "
            "and layout steps cost more than the multiplications they save. Try " + ", ".join(tips))
