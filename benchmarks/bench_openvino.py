"""First measurements for an OpenVINO target (issue 11): does OpenVINO run dmcompile's per-group
QDQ graph (as `lowering/qdq.py` writes it, before ONNX Runtime's fusion) in int8, and how fast,
against ONNX Runtime fp32, OpenVINO fp32 (default precision hint and forced f32) and the
dmcompile ort-cpu bundle, in one process, interleaved.

    pip install openvino==2026.4.0        # not a dependency of dmcompile (yet)
    python benchmarks/bench_openvino.py [--models digits16 ddpm-cifar10-32] [--repeats 15]

Prints the CPU line, per model: OpenVINO's runtime precision per Conv / FullyConnected / MatMul
after compiling the QDQ graph of group 0 (from the compiled model's runtime graph), medians and
ratios to ORT fp32 at batch 1 and 8, and each int8 variant's relative output error against fp32.
"""

from __future__ import annotations

import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ort_session, timing_parser
from benchmarks.machine import cpu_line

MAC_OPS = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul")


def runtime_precisions(compiled) -> dict:
    """(layer type, runtime precision) -> count over the compiled model's runtime graph."""
    c = collections.Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if kind in MAC_OPS:
            c[f"{kind}:{info['runtimePrecision'].astype(str) if 'runtimePrecision' in info else '?'}"] += 1
    return dict(sorted(c.items()))


def main(argv=None) -> int:
    args = timing_parser(__doc__, repeats=15).parse_args(argv)

    import onnx
    import openvino as ov
    from dmruntime import Bundle

    from dmcompile import api, compiler
    from dmcompile.config import BuildConfig, CalibrationConfig

    print(cpu_line(), f"; openvino {ov.__version__}", flush=True)
    core = ov.Core()
    core.set_property("CPU", {"INFERENCE_NUM_THREADS": args.threads})
    rows = []
    for name in args.models:
        cal = CalibrationConfig(size=64 if name == "digits16" else 16, groups=10)
        cfg = BuildConfig(calibration=cal, eval_samples=0)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            bundle = Bundle.open(api.build(name, tmp / "b", cfg).path, threads=args.threads)
            ws = compiler.prepare(name, cfg)
            calib = compiler.calibrate(ws, cfg)
            _, _, qdq = next(compiler.lower(ws, calib, compiler.allocate(ws, calib, cfg)))
            onnx.save(qdq, str(tmp / "g0.onnx"))
            t0 = time.perf_counter()
            ov_q = core.compile_model(core.read_model(str(tmp / "g0.onnx")), "CPU")
            compile_s = time.perf_counter() - t0
            fp_path = str(ws.fp / "model.onnx")
            ov_default = core.compile_model(core.read_model(fp_path), "CPU")
            ov_f32 = core.compile_model(core.read_model(fp_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            ort_fp = ort_session(fp_path, args.threads)
            print(f"{name}: OpenVINO compile of the group-0 QDQ graph {compile_s:.2f} s; runtime precisions: "
                  f"QDQ {runtime_precisions(ov_q)}; fp32 default {runtime_precisions(ov_default)}", flush=True)
            t_group = bundle.groups[0].t_start  # group 0's timesteps: its scales are the QDQ graph's
            for b in args.batches:
                x = np.random.default_rng(b).standard_normal((b, *bundle.sample_shape)).astype(np.float32)
                ts = np.full(b, t_group, np.int64)
                feeds = {"sample": x, "timestep": ts}
                variants = {
                    "ORT fp32": lambda: ort_fp.run(None, feeds)[0],
                    "OpenVINO fp32 (default hint)": lambda: ov_default(feeds)[0],
                    "OpenVINO fp32 (f32 forced)": lambda: ov_f32(feeds)[0],
                    "dmcompile ort-cpu K=10 (fused int8)": lambda: bundle.predict(x, t_group),
                    "OpenVINO, dmcompile's QDQ graph": lambda: ov_q(feeds)[0],
                }
                times = {k: [] for k in variants}
                outs = {}
                for r in range(args.repeats + 1):  # round 0 warms up
                    for k, fn in variants.items():
                        t1 = time.perf_counter()
                        outs[k] = fn()
                        if r:
                            times[k].append(time.perf_counter() - t1)
                ref = outs["ORT fp32"].astype(np.float64)
                base = statistics.median(times["ORT fp32"])
                for k, v in times.items():
                    err = float(np.linalg.norm(outs[k] - ref) / np.linalg.norm(ref))
                    rows.append((name, b, k, statistics.median(v) * 1e3, statistics.median(v) / base, err))
    print("\n| model | batch | variant | median ms | vs ORT fp32 | rel. error vs ORT fp32 |")
    print("|---|---|---|---|---|---|")
    for name, b, k, ms, ratio, err in rows:
        print(f"| {name} | {b} | {k} | {ms:.2f} | {ratio:.2f}x | {err:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
