"""Compiling a model into a bundle: calibration, allocation, lowering, engines, corrections.

``dmcompile.api.build`` is :func:`build`; the stage functions it uses (fp32 export, calibration,
RD curves) live in :mod:`dmcompile.api`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from dmruntime import Bundle

from .api import _analyze, _calibrate, fp_bundle, probe_inputs, sample_model
from .config import BuildConfig, SampleConfig
from .frontend.load import LoadedModel, load_model


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
    engine_of, params, engines, first_group = {}, [None] * K, {}, {}
    for i, gids in enumerate(sets.values()):
        merged, ps = merge_groups([fused[g] for g in gids])
        name = ENGINE_FILE if len(sets) == 1 else f"unet_{i}.onnx"
        engines[name], first_group[name] = merged, gids[0]
        for g, p in zip(gids, ps):
            engine_of[g], params[g] = name, p
    group_files = [f"group_{g.index:02d}.npz" for g in groups]
    with atomic_dir(Path(out)) as tmp:
        fusion, engines_meta, weights_meta, stored = {}, {}, None, {}
        for name, merged in engines.items():
            fusion[name] = fusion_report(merged)
            if config.format == "mixed":
                gbits = dict(zip((l.weight for l in wlayers), bits[first_group[name]]))
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
    from .analysis.stepaware import select_activation_bits
    from .calibration.trajectory import quantized_tensors

    # every tensor the bundle quantizes, Conv outputs included: this judges the whole engine
    probe, X, T, fpb = probe_inputs(fp, quantized_tensors, calib, config.analysis)
    col = {l.node: i for i, l in enumerate(wlayers)}
    wb = np.array([[bits[g, col[l.node]] if l.node in col else None for l in probe.layers]
                   for g in range(len(calib.groups))], dtype=object)
    cands = tuple(config.analysis.act_bits)
    ranges = {b: calib.ranges(bits=b) for b in cands}
    return select_activation_bits(probe, X, T, ranges, wb, fpb.schedule, calib.groups, cands, profile.activation_bits)


def _mixed_bits(fp, layer_map, wlayers, qnodes, calib, config: BuildConfig, profile, progress):
    """Weight widths [G, L] of a mixed build and the plan record for the manifest."""
    from .analysis.allocate import parse_budget
    from .analysis.plan import bops, check_bits, check_feasible, plan_bits
    from .lowering.precision import explicit_bits

    K = len(calib.groups)
    if config.weight_bits:
        bits = np.tile(explicit_bits(layer_map, wlayers, config.weight_bits), (K, 1))
        plan = {"weight_bits": dict(config.weight_bits), "share_weights": True}
    else:
        allowed = config.analysis.weight_bits if config.allow_simulated_bits else profile.weight_bits
        budget = parse_budget(config.budget)
        fixed = sum(bops(l, None, 8 if l.node in qnodes else None) for l in layer_map.layers
                    if l not in wlayers)
        check_feasible(wlayers, tuple(allowed), budget, fixed)  # before minutes of curve measuring
        curves = _analyze(fp, calib, config.analysis, progress)
        idx = [curves.layers.index(l.node) for l in wlayers]
        bits, plan = plan_bits(curves.weight[:, idx], wlayers, curves.weight_bits, tuple(allowed),
                               budget, config.allocator, config.share_weights, fixed)
        plan["curves"] = {"config": curves.config, "seconds": curves.seconds}
    check_bits({int(b) for b in bits.ravel()}, profile.weight_bits, config.allow_simulated_bits)
    n = sum(l.params for l in wlayers)
    plan["average_weight_bits"] = [float((bits[g] * [l.params for l in wlayers]).sum() / n) for g in range(K)]
    return bits, plan


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
