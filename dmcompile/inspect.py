"""What is inside a bundle: groups, per-layer precision, fusion per op type, MACs, bytes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from dmruntime import Bundle
from dmruntime.bench import describe_speed
from dmruntime.samplers import residual_variance_samplers
from dmruntime.engines import engine_runtime

from . import stages
from .analysis.plots import save_bits_heatmap, save_rd_curves
from .analysis.rd import RDCurves
from .artifacts import PLOTS, atomic_dir, write_marker
from .backends import get_backend
from .budget import span
from .memory import resident_estimate
from .quant import FLOAT_BITS
from .targets import PROFILES

MEMORY_BATCHES = (1, 8)


def bundle_report(bundle: Bundle, *, fusion: bool = True) -> dict:
    """A JSON-able summary of a bundle (fusion per group engine when ``fusion``)."""
    m = bundle.manifest
    files = m["files"]
    precision = m.get("precision", {})
    layers = precision.get("layers", [])
    report = {
        "path": str(bundle.root), "format": m.get("format"), "profile": m.get("profile"),
        "model": m["model"]["id"], "parameters": m["model"].get("parameters"),
        "groups": [{"index": g.index, "t_start": g.t_start, "t_end": g.t_end, "engine": g.engine} for g in bundle.groups],
        "bytes": {name: f["bytes"] for name, f in files.items()},
        "total_bytes": sum(f["bytes"] for f in files.values()),
        "fp32_weight_bytes": 4 * (m["model"].get("parameters") or 0),
        "size_parts": size_parts(m),
        "layers": layers,
        "weight_grid_bits": precision.get("weight_grid_bits"),
        "fidelity": m.get("fidelity"),
        "speed": m.get("speed"),
        "sampler": bundle.sampling.to_dict() if bundle.sampling else None,
        "text": m.get("text"),
        "conditioning": bundle.conditioning.describe() if bundle.conditioning else None,
    }
    if layers:
        report["accounting"] = accounting(m)
    if m.get("correction"):
        report["correction"] = [{k: g[k] for k in ("index", "t_start", "t_end", "k", "rms_error", "rms_error_corrected")}
                                | {"applied": g.get("applied", True)}
                                | {"mean_abs_bias": sum(abs(b) for b in g["bias"]) / len(g["bias"]),
                                   "mean_var": sum(g["var"]) / len(g["var"])} for g in m["correction"]["groups"]]
    if m.get("step_aware_activation"):
        report["step_aware_activation"] = m["step_aware_activation"]
    if m.get("plan"):
        report["plan"] = {k: v for k, v in m["plan"].items() if k != "curves"}
    backend = get_backend(bundle.runtime)
    # the decoder (a component) runs on ONNX Runtime whatever the engines' runtime
    report["memory"] = [resident_estimate(m, b, backend.memory, get_backend("onnxruntime").memory)
                        for b in MEMORY_BATCHES]
    if fusion:
        report["runtime"] = bundle.runtime
        report["fusion_note"] = backend.fusion_note
        report["fusion"] = {e: backend.fusion(bundle, e) for e in sorted({g.engine for g in bundle.groups})}
    if (m.get("engine") or {}).get("inference_precision"):
        report["float_precision"] = m["engine"]["inference_precision"]
    if (m.get("engine") or {}).get("conv_params"):
        report["conv_params"] = m["engine"]["conv_params"]
    return report


def accounting(manifest: dict) -> dict:
    """Per layer: MACs, weight / storage / activation bits per group, BOPs per group, weight
    bytes on disk; totals against fp32 (BOPs at 32 x 32 bits, weights at 4 bytes)."""
    layers = manifest["precision"]["layers"]
    stored = (manifest.get("weights") or {}).get("tensors", {})
    rows, bops_total, bops_fp = [], None, 0
    float_bytes = get_backend((manifest.get("engine") or {}).get("runtime", "onnxruntime")).float_weight_bytes
    for l in layers:
        wb = l.get("weight_bits")
        if stored and wb:
            keys = {k for k in stored if k.rsplit("@", 1)[0] == f"{l['weight']}.q"}
            disk = sum(-(-math.prod(stored[k]["shape"]) * stored[k]["storage_bits"] // 8) for k in keys)
        elif wb and l.get("storage_bits"):  # weights inside the engines, at the width stored
            disk = -(-l["params"] * max(b for b in l["storage_bits"] if b != FLOAT_BITS) // 8) \
                if any(b != FLOAT_BITS for b in l["storage_bits"]) else 0
        else:
            disk = l["params"] if wb else float_bytes * l["params"]
        if l.get("float_groups"):  # float32 weights in each engine that keeps the layer float
            disk += float_bytes * l["params"] * len({manifest["groups"][g]["engine"] for g in l["float_groups"]})
        G = len(wb) if wb else len(l.get("bops") or [0])
        b = l.get("bops") or [l["macs"] * 32 * 32] * G
        bops_total = b if bops_total is None else [x + y for x, y in zip(bops_total, b)]
        bops_fp += l["macs"] * 32 * 32
        rows.append({"node": l["node"], "op_type": l["op_type"], "macs": l["macs"], "weight_bits": wb,
                     "storage_bits": l.get("storage_bits"), "activation_bits": l.get("activation_bits"),
                     "bops": b, "weight_bytes_on_disk": disk})
    disk = sum(r["weight_bytes_on_disk"] for r in rows)
    params = sum(l["params"] for l in layers)
    return {"layers": rows, "bops_per_group": bops_total, "bops_fp32": bops_fp,
            "bops_reduction": [bops_fp / x for x in bops_total], "weight_bytes_on_disk": disk,
            "weight_bytes_fp32": 4 * params, "weight_size_ratio": disk / (4 * params) if params else None}


def size_parts(m: dict) -> dict[str, int]:
    """Bytes on disk by role: engines, stored weights, per-group inputs, the rest."""
    inputs = {g.get("inputs") for g in m["groups"]} - {None}
    engines = {g["engine"] for g in m["groups"]} | set((m.get("engine") or {}).get("tensorrt", {}).get("onnx", []))
    weights = {(m.get("weights") or {}).get("file")} | {f for f in m["files"] if f.endswith((".bin", ".data"))}
    decoder = {(m.get("decoder") or {}).get("file")}
    text = {f for e in (m.get("text") or {}).get("encoders", []) for f in (e.get("file"), e.get("tokenizer"))}
    out: dict[str, int] = {}
    for name, f in m["files"].items():
        what = ("engines" if name in engines else "weights" if name in weights else
                f"group inputs ({len(inputs)} files: scales, zero points, int32 biases)" if name in inputs else
                "decoder" if name in decoder else "text encoders and tokenizers" if name in text else "other")
        out[what] = out.get(what, 0) + f["bytes"]
    return out


def format_report(r: dict) -> str:
    lines = [(f"{r['path']}: {r['model']} ({r['parameters'] / 1e6:.2f} M parameters), format {r['format']}, "
             f"profile {r['profile']}")]
    lines.append(f"groups: {len(r['groups'])}  " + "  ".join(f"[{g['t_start']},{g['t_end']})" for g in r["groups"]))
    if r.get("sampler"):
        sp = r["sampler"]
        lines.append(f"calibrated on {sp['name']} {sp['steps']} steps{', Karras sigmas' if sp.get('karras') else ''} "
                     "(sample and eval default to it)")
    if r.get("conditioning"):
        lines.append("inputs: " + ", ".join(r["conditioning"]))
    for e in (r.get("text") or {}).get("encoders", []):
        lines.append(f"text: {e.get('class', 'text encoder')} {e['file']} ({e.get('precision', 'fp32')}"
                     + (f", clip_skip {e['clip_skip']}" if e.get("clip_skip") else "")
                     + (", pooled projection" if "pooled" in e.get("outputs", ()) else "")
                     + f"), {e['tokenizer']} (from {e.get('tokenizer_source', 'tokenizer.json')}), "
                     f"{e['max_length']} tokens, pad id {e['pad_id']}")
    if (r.get("text") or {}).get("int8"):
        q = r["text"]["int8"]
        lines.append(f"  int8 text encoders: condition error vs fp32 {q['rel_l2_err_vs_fp32']:.2%} relative L2 over "
                     f"{q['prompts']} calibration prompts (max {q['max_abs_err_vs_fp32']:.3g})")
    total, fp = r["total_bytes"], r["fp32_weight_bytes"]
    ratio = f" = {total / fp:.3f}x the whole model's fp32 weights ({fp / 1e6:.2f} MB)" if fp else ""
    lines.append(f"size on disk: {total / 1e6:.2f} MB{ratio}")
    parts = r.get("size_parts") or {}
    if len(parts) > 1:
        lines.append("  " + ", ".join(f"{what} {b / 1e6:.3f} MB" for what, b in parts.items()))
    if r["layers"]:
        by_op: dict[str, list[int]] = {}
        for l in r["layers"]:
            q = l["activation"] != "float"
            by_op.setdefault(l["op_type"], [0, 0])[0 if q else 1] += 1
        lines.append("precision (quantized / float): " + ", ".join(f"{op} {a}/{b}" for op, (a, b) in sorted(by_op.items())))
        floats = [l["node"] for l in r["layers"] if l["activation"] == "float"]
        if floats:
            lines.append("  kept in float: " + ", ".join(floats))
        grid = r.get("weight_grid_bits")
        if grid and grid < 8:
            lines.append(f"  8-bit weights on the {grid}-bit grid [-{2 ** (grid - 1) - 1}, {2 ** (grid - 1) - 1}]: x86 int8 "
                         "kernels without VNNI saturate u8 x s8 pairs otherwise")
        macs = sum(l["macs"] for l in r["layers"])
        lines.append(f"MACs per sample: {macs / 1e6:.1f} M")
    acc = r.get("accounting")
    if acc:
        groups = len(r["groups"])
        lines.append("per layer: MACs, weight bits per group (storage bits), activation bits, BOPs (group 0), "
                     "weight bytes on disk")
        for l in acc["layers"]:
            wb = l["weight_bits"]
            if l["activation_bits"] is None:
                wtxt = "float"
            elif not wb:
                wtxt = "-"
            else:  # f: kept float in that group (allow_float)
                names = ["f" if b == FLOAT_BITS else str(b) for b in wb]
                wtxt = names[0] if len(set(wb)) == 1 else "/".join(names)
            if wb and l["storage_bits"] and any(s != b for s, b in zip(l["storage_bits"], wb)):
                wtxt += f" (stored {'/'.join(map(str, sorted(set(l['storage_bits']))))})"
            lines.append(f"  {l['node'][-56:]:<56} {l['op_type']:<6} {l['macs'] / 1e6:8.3f} M  w{wtxt:<8} "
                         f"a{l['activation_bits'] or 32:<3} {l['bops'][0] / 1e9:8.3f} GBOPs {l['weight_bytes_on_disk']:>9} B")
        red = acc["bops_reduction"]
        lines.append(f"BOPs per sample: {acc['bops_per_group'][0] / 1e9:.3f} G (group 0) vs fp32 "
                     f"{acc['bops_fp32'] / 1e9:.3f} G = {span(red, '.1f')}x fewer"
                     + (f" over {groups} groups" if groups > 1 else ""))
        lines.append(f"weights of the {len(acc['layers'])} Conv/Gemm/MatMul layers on disk: "
                     f"{acc['weight_bytes_on_disk'] / 1e6:.3f} MB vs {acc['weight_bytes_fp32'] / 1e6:.3f} MB in fp32 = "
                     f"{acc['weight_size_ratio']:.3f}x (norms, biases and embeddings not counted)")
    for e in r.get("memory", []):
        act = f"{e['activations_mb']:.1f} MB activations" if e["activations_known"] else \
            "activations not recorded (fp32 exports, and bundles built before the manifest had a memory entry)"
        if engine_runtime(e["runtime"]).devices[0] == "cuda":
            lines.append(f"GPU memory, on paper at batch {e['batch']}: {e['total_mb']:.0f} MB = {e['weights_mb']:.1f} MB "
                         f"weights ({e['engines']} engine(s), one copy each) + {act} (FP16, one shared buffer); "
                         "CUDA context not counted, never measured")
            continue
        lines.append(f"resident memory, estimate at batch {e['batch']}: {e['total_mb']:.0f} MB = {e['base_mb']:.0f} MB "
                     f"{e['runtime']} base + {e['weights_mb']:.1f} MB weights ({e['engines']} engine(s)) + {act}")
    if r.get("plan") and r["plan"].get("budget"):
        pl = r["plan"]
        avg = pl["average_weight_bits"]
        alloc = "one weight allocation for all groups" if pl["share_weights"] else "one allocation per group"
        lines.append(f"plan: {pl['allocator']} allocation under {pl['budget']}, {alloc}; "
                     f"average weight bits {span(avg, '.3f')}")
    if r.get("correction"):
        lines.append("PTQD correction per group (eps = (eps_q - bias) / (1 + k)): k, mean |bias|, residual variance, "
                     "rms error of eps before -> after")
        lines.append("  (k and bias correct the model output under every sampler; the residual variance is taken out "
                     f"of the noise a sampler adds by {', '.join(residual_variance_samplers())}; "
                     "the others leave it: deterministic ones add no noise, dpmpp-2m-sde's multistep update is not "
                     "modelled)")
        for g in r["correction"]:
            if g["rms_error"] is None:
                lines.append(f"  [{g['t_start']},{g['t_end']}): no calibration step, no correction")
                continue
            if not g["applied"]:
                lines.append(f"  [{g['t_start']},{g['t_end']}): off (the fit would raise the rms error); residual var "
                             f"{g['mean_var']:.2e}  rms {g['rms_error']:.4f}")
                continue
            lines.append(f"  [{g['t_start']},{g['t_end']}): k {g['k']:+.4f}  |bias| {g['mean_abs_bias']:.2e}  "
                         f"var {g['mean_var']:.2e}  rms {g['rms_error']:.4f} -> {g['rms_error_corrected']:.4f}")
    if r.get("step_aware_activation"):
        sa = r["step_aware_activation"]
        lines.append(f"step-aware activation bits ({sa['note']}):")
        for g in sa["groups"]:
            q = ", ".join(f"A{b} {v:.1f} dB" for b, v in g["quantized_snr_db"].items())
            lines.append(f"  [{g['t_start']},{g['t_end']}): schedule SNR {g['schedule_snr_db']:.1f} dB; output SNR {q}"
                         f" -> {g['selected_bits']} bits{'' if g['meets_schedule'] else ' (none meets it)'}")
    if r.get("plan", {}).get("stored_int8"):
        st = r["plan"]["stored_int8"]
        lines.append(f"stored INT8 although allocated 4-bit: {len(st['layers'])} layer(s) ({st['why']})")
    if "fusion" in r:
        lines.append(r["fusion_note"] + ":")
        for engine, f in r["fusion"].items():
            ints = ", ".join(f"{k} {v}" for k, v in sorted(f["integer"].items()))
            flt = ", ".join(f"{k} {v}" for k, v in sorted(f["float"].items())) or "none"
            w4 = ", ".join(f"{k} {v}" for k, v in sorted(f.get("int4_weight_only", {}).items()))
            w4 = f"; INT4 weight-only: {w4}" if w4 else ""
            lines.append(f"  {engine}: {f['ratio']:.1%} integer ({ints}; float: {flt}{w4})")
    if r.get("float_precision"):
        lines.append(f"layers left float run in {r['float_precision']} (OpenVINO's precision hint, --float-precision)")
    if r.get("conv_params"):
        c = r["conv_params"]
        lines.append(f"Conv zero points and biases: {c['mode']} ({c['why']}; --conv-params)")
    if r.get("fidelity"):
        f = r["fidelity"]
        lines.append(f"fidelity at build vs {f['reference']}: PSNR {f['psnr_db_mean']:.2f} dB, SSIM {f['ssim_mean']:.4f} "
                     f"({f['samples']} samples, {f.get('sampler', 'ddim')} {f['steps']} steps)")
    if r.get("speed"):
        lines += describe_speed(r["speed"])
    return "\n".join(lines)


def inspect_plots(bundle: Bundle, folder: str | Path, curves_dir: str | Path | None = None) -> list[Path]:
    """Write bits_heatmap.png from the manifest and rd_curves.png from ``curves_dir`` or, for a
    mixed bundle, from the cached curves it was planned with, into ``folder`` (atomically;
    ``folder`` must be absent, empty or an earlier plots folder). Returns the files written."""
    folder = Path(folder)
    curves = None
    if curves_dir:
        curves = RDCurves.load(Path(curves_dir))
    else:
        record = ((bundle.manifest.get("plan") or {}).get("curves") or {}).get("config")
        profile = PROFILES.get(bundle.manifest.get("profile"))
        if record and profile:
            curves = stages.find_curves(record, profile)
    layers = [l for l in bundle.manifest["precision"]["layers"] if l.get("weight_bits")]
    bits = np.array([l["weight_bits"] for l in layers]).T
    groups = [(g.t_start, g.t_end) for g in bundle.groups]
    with atomic_dir(folder, PLOTS) as tmp:
        save_bits_heatmap([l["node"] for l in layers], bits, groups, tmp / "bits_heatmap.png")
        files = ["bits_heatmap.png"]
        if curves is not None:
            save_rd_curves(curves, tmp / "rd_curves.png")
            files.append("rd_curves.png")
        write_marker(tmp, PLOTS, {"schema_version": 1, "bundle": str(bundle.root)}, files)
    return [folder / f for f in files]
