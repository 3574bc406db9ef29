"""Resident memory of a 10-group bundle against one int8 session and ten independent sessions.

    python benchmarks/bench_memory.py [--model ddpm-cifar10-32] [--groups 10]

Each variant runs in a fresh subprocess that imports onnxruntime, creates its session(s),
runs one UNet call per timestep group (batch 1; prepacking and arenas happen then) and
reports the growth of VmRSS over the process's baseline:

- fp32: one session of the fp32 ONNX export;
- int8 1 session: one group's own QDQ model (what one group needs on its own);
- int8 K sessions: every group's own QDQ model in its own session (the naive bundle);
- dmcompile bundle: dmruntime's Bundle, one fused engine that each group feeds its scales.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROBE = r"""
import json, sys
import numpy as np
def rss():
    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) / 1024
import onnxruntime as ort
from dmruntime import Bundle
base = rss()
kind, paths, shape, ts = json.loads(sys.argv[1])
x = np.zeros((1, *shape), np.float32)
keep = []
if kind == "bundle":
    b = Bundle.open(paths[0], threads=1)
    for t in ts:
        b.predict(x, t)
    keep.append(b)
else:
    for p in paths:
        so = ort.SessionOptions(); so.intra_op_num_threads = 1
        s = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
        s.run(None, {"sample": x, "timestep": np.array([ts[0]], np.int64)})
        keep.append(s)
print(json.dumps(rss() - base))
"""


def probe(kind: str, paths: list[str], shape, ts) -> float:
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps([kind, paths, list(shape), ts])],
                       capture_output=True, text=True, check=True)
    return float(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ddpm-cifar10-32")
    p.add_argument("--groups", type=int, default=10)
    p.add_argument("--calib-size", type=int, default=16)
    args = p.parse_args(argv)

    import onnx

    from dmcompile import api
    from dmcompile.frontend.layermap import LayerMap
    from dmcompile.lowering.qdq import lower_group, quantize_weights
    from dmcompile.targets import ORT_CPU

    model = api.load_model(args.model)
    fp = api.fp_bundle(model)
    cal = api.CalibrationConfig(size=args.calib_size, groups=args.groups)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = api.build(model, tmp / "bundle", api.BuildConfig(calibration=cal, eval_samples=0)).path
        lm = LayerMap.load(fp / "layer_map.json")
        proto = onnx.load(str(fp / "model.onnx"))
        nodes = {l.node for l in lm.layers}
        weights = quantize_weights(proto, list(lm.layers))
        ranges = api.calibrate(model, cal).ranges()
        per_group = []
        for g in range(args.groups):
            path = tmp / f"qdq_{g:02d}.onnx"
            onnx.save(lower_group(proto, lm, nodes, weights, ranges[g], ORT_CPU), str(path))
            per_group.append(str(path))
        ts = [int((g + 0.5) * 1000 / args.groups) for g in range(args.groups)]
        shape = model.sample_shape
        rows = [("fp32, 1 session", probe("sessions", [str(fp / "model.onnx")], shape, ts)),
                ("int8, 1 session (one group's QDQ model)", probe("sessions", per_group[:1], shape, ts)),
                (f"int8, {args.groups} independent sessions", probe("sessions", per_group, shape, ts)),
                (f"dmcompile bundle, {args.groups} groups", probe("bundle", [str(bundle)], shape, ts))]
    one = rows[1][1]
    print(f"{args.model}: resident memory growth after one call per group (batch 1), MB")
    print()
    print("| variant | RSS MB | vs one int8 session |")
    print("|---|---|---|")
    for name, mb in rows:
        print(f"| {name} | {mb:.1f} | {mb / one:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
