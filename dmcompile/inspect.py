"""What is inside a bundle: groups, per-layer precision, fusion per op type, MACs, bytes."""

from __future__ import annotations

from dmruntime import Bundle

from .backends.onnxruntime import fusion_report


def bundle_report(bundle: Bundle, fusion: bool = True) -> dict:
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
        "layers": layers,
        "fidelity": m.get("fidelity"),
    }
    if fusion:
        report["fusion"] = {e: fusion_report(bundle.root / e) for e in sorted({g.engine for g in bundle.groups})}
    return report


def format_report(r: dict) -> str:
    lines = [f"{r['path']}: {r['model']} ({r['parameters'] / 1e6:.2f} M parameters), format {r['format']}, "
             f"profile {r['profile']}"]
    lines.append(f"groups: {len(r['groups'])}  " + "  ".join(f"[{g['t_start']},{g['t_end']})" for g in r["groups"]))
    total, fp = r["total_bytes"], r["fp32_weight_bytes"]
    ratio = f" = {total / fp:.3f}x the fp32 weights ({fp / 1e6:.2f} MB)" if fp else ""
    lines.append(f"size on disk: {total / 1e6:.2f} MB{ratio}")
    if r["layers"]:
        by_op: dict[str, list[int]] = {}
        for l in r["layers"]:
            q = l["activation"] != "float"
            by_op.setdefault(l["op_type"], [0, 0])[0 if q else 1] += 1
        lines.append("precision (quantized / float): " + ", ".join(f"{op} {a}/{b}" for op, (a, b) in sorted(by_op.items())))
        floats = [l["node"] for l in r["layers"] if l["activation"] == "float"]
        if floats:
            lines.append("  kept in float: " + ", ".join(floats))
        macs = sum(l["macs"] for l in r["layers"])
        lines.append(f"MACs per sample: {macs / 1e6:.1f} M")
    if "fusion" in r:
        lines.append("integer kernels after ONNX Runtime optimisation (per engine file; groups feed it their "
                     "own scales):")
        for engine, f in r["fusion"].items():
            ints = ", ".join(f"{k} {v}" for k, v in sorted(f["integer"].items()))
            flt = ", ".join(f"{k} {v}" for k, v in sorted(f["float"].items())) or "none"
            lines.append(f"  {engine}: {f['ratio']:.1%} integer ({ints}; float: {flt})")
    if r.get("fidelity"):
        f = r["fidelity"]
        lines.append(f"fidelity at build vs {f['reference']}: PSNR {f['psnr_db_mean']:.2f} dB, SSIM {f['ssim_mean']:.4f} "
                     f"({f['samples']} samples, DDIM {f['steps']})")
    return "\n".join(lines)
