"""The manifest's body: what the bundle holds, as the runtime and `inspect` read it."""

from __future__ import annotations

import onnxruntime
from dmruntime import NoiseSchedule
from dmruntime.conditioning import NULL_FILE, TABLE_FILE

from ..analysis.plan import bops
from ..backends import get_backend
from ..backends.base import EngineSet, group_files
from ..backends.onnxruntime import WEIGHTS_FILE
from ..calibration.trajectory import CalibrationResult
from ..config import BuildConfig
from ..memory import memory_entry
from ..quant import FLOAT_BITS, encode
from .steps import storage_width, weight_only
from .workspace import ComponentEngine, WeightPlan, Workspace


def describe_bundle(ws: Workspace, calib: CalibrationResult, plan: WeightPlan, engines: EngineSet,
                    config: BuildConfig, lowered: tuple[ComponentEngine, ...] = ()) -> dict:
    """The manifest body (everything but measurements and file hashes)."""
    fusion = engines.fusion
    backend = get_backend(ws.profile.backend)
    stored = engines.stored
    names = group_files(len(calib.groups))
    body = {
        "format": config.format, "profile": ws.profile.name,
        "model": ws.model, "scheduler": ws.scheduler,
        "groups": [{"index": g.index, "t_start": g.t_start, "t_end": g.t_end, "engine": engines.engine_of[g.index],
                    "inputs": f if engines.params[g.index] else None} for g, f in zip(calib.groups, names)],
        "engine": {"file": sorted(engines.engines)[0], "runtime": ws.profile.backend,
                   "onnxruntime_version": _ort_version(), "group_inputs": sorted(engines.params[0]),
                   **backend.engine_entry(engines, ws.conditioning.null is not None, config)},
        "precision": {"activation_dtype": ws.profile.activation_dtype, "weight_grid_bits": ws.profile.weight_grid_bits,
                      "layers": _precision_layers(ws, plan)},
        "calibration": calib.config.to_dict(),
        # what the trajectories took: sampling runs of the bundle default to it
        "sampler": calib.config.sampling(NoiseSchedule.from_config(ws.scheduler)).to_dict(),
        "build": {"config": config.to_dict(), "calibration_run": calib.run, "fusion": next(iter(fusion.values())) if len(fusion) == 1 else
                  {"ratio": min(f["ratio"] for f in fusion.values()), "engines": fusion}},
    }
    if stored is not None:
        body["engines"] = {name: {"external_weights": ext} for name, ext in stored.external.items()}
        body["weights"] = _weights_entry(WEIGHTS_FILE, stored.tensors)
    if plan.record:
        body["plan"] = plan.record
    entries = {c.key: c.entry for c in lowered}
    for key, entry in ws.components.items():  # as exported, or as a step lowered it
        body[key] = entries.get(key, entry)
    # Activation liveness of the fp32 graphs: `dmcompile inspect`'s resident-memory estimate.
    body["memory"] = memory_entry(ws.fp, ws.decoder["file"] if ws.decoder else None,
                                  ws.conditioning.sequence_length if ws.conditioning else None)
    if ws.conditioning:
        body["conditioning"] = ws.conditioning.to_manifest(
            NULL_FILE if ws.conditioning.null else None, TABLE_FILE if ws.conditioning.class_table is not None else None)
        body["conditioning"]["calibration_guidance_scale"] = calib.config.guidance_scale
    return body


def _weights_entry(name: str, tensors: dict) -> dict:
    return {"file": name, "tensors": {key: encode(q, b)[1] for key, (q, b) in sorted(tensors.items())}}


def _precision_layers(ws: Workspace, plan: WeightPlan) -> list[dict]:
    """Per layer: widths per group (32: kept float in that group, ``float_groups`` lists them)."""
    col = {l.node: i for i, l in enumerate(ws.weight_layers)}
    bits = plan.bits
    out = []
    for l in ws.layer_map.layers:
        q = l.node in ws.precision.quantized
        wb = [int(b) for b in bits[:, col[l.node]]] if l.node in col else None
        entry = {"node": l.node, "module": l.module, "op_type": l.op_type, "weight": l.weight, "weight_bits": wb,
                 "storage_bits": [b if b == FLOAT_BITS else storage_width(ws.profile, l, b) for b in wb] if wb else None,
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


def _ort_version() -> str:
    return onnxruntime.__version__

