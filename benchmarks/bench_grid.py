"""Integer-kernel overflow on x86 without VNNI: one group's QDQ graph with its 8-bit weights on the
8-bit grid [-127, 127] and on the 7-bit grid [-63, 63] (``TargetProfile.weight_grid_bits``), each
run three ways on this CPU in one process: the simulated model (ONNX Runtime with every
optimisation off: DequantizeLinear then float Conv / MatMul), ONNX Runtime's fused int8 kernels, and
OpenVINO's compiled int8 model. Prints the relative L2 distance of eps from the fp32 export's.

    .venv/bin/python benchmarks/bench_grid.py [--model digits16] [--groups 0 5 9] [--n 8]

Where u8 x s8 products are summed in pairs into int16 (VPMADDUBSW: AVX2, AVX-512 without VNNI),
2 x 255 x 127 overflows and saturates; with weights in [-63, 63] no pair can. With VNNI (or on
ARM's dot products) the fused kernels match the simulated model on both grids.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits16")
    p.add_argument("--groups", type=int, nargs="+", default=[0, 5, 9])
    p.add_argument("--n", type=int, default=8, help="samples per call")
    args = p.parse_args(argv)

    import onnxruntime as ort

    from benchmarks.machine import cpu_line
    from dmcompile import compiler, onnxio
    from dmcompile.backends.onnxruntime import optimize_for_cpu
    from dmcompile.compiler.engines import engine_job
    from dmcompile.config import BuildConfig
    from dmcompile.targets import ORT_CPU

    cfg = BuildConfig(eval_samples=0, correction=False)
    ws = compiler.prepare(args.model, cfg)
    calib = compiler.calibrate_workspace(ws, cfg)
    plan = compiler.allocate_widths(ws, calib, cfg)
    fp = onnxio.session(onnxio.load(ws.fp / "model.onnx"))
    rng = np.random.default_rng(0)
    try:
        import openvino as ov
        core = ov.Core()
    except ImportError:
        core = None
    print(cpu_line() + (f"; openvino {ov.__version__.split('-')[0]}" if core else ""))
    print("| weight grid | group (t) | simulated vs fp32 | ORT fused vs fp32 | OpenVINO vs fp32 | ORT fused / simulated |")
    print("|---|---|---|---|---|---|")
    T = int(ws.scheduler.get("num_train_timesteps", 1000))
    for grid in (8, 7):
        profile = dataclasses.replace(ORT_CPU, weight_grid_bits=grid)
        job = engine_job(dataclasses.replace(ws, profile=profile), calib, plan, cfg)
        for g in args.groups:
            _, _, qdq = next(job.lower([[g]], job.ranges))
            t = int((calib.groups[g].t_start + calib.groups[g].t_end) // 2) if g < len(calib.groups) else T - 1
            x = rng.standard_normal((args.n, *ws.model["sample_shape"]), dtype=np.float32)
            feeds = {"sample": x, "timestep": np.full(args.n, t, np.int64)}
            want = fp.run(["eps"], feeds)[0]
            off = ort.SessionOptions()
            off.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sim = onnxio.session(qdq, off).run(["eps"], feeds)[0]
            fused = onnxio.session(optimize_for_cpu(qdq)).run(["eps"], feeds)[0]
            ovr = None
            if core is not None:
                import tempfile

                with tempfile.TemporaryDirectory() as tmp:
                    onnxio.save(qdq, Path(tmp) / "m.onnx")
                    req = core.compile_model(str(Path(tmp) / "m.onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
                    ovr = req(feeds)[0]

            def rel(a, b=want):
                return float(np.linalg.norm(a - b) / np.linalg.norm(b))

            ov_cell = f"{rel(ovr):.4f}" if ovr is not None else "n/a"
            print(f"| {grid}-bit | {g} ({t}) | {rel(sim):.4f} | {rel(fused):.4f} | {ov_cell} | "
                  f"{rel(fused) / rel(sim):.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
