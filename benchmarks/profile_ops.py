"""Where a bundle's time goes, per op type: ONNX Runtime's profiler or OpenVINO's performance counters.

    python benchmarks/profile_ops.py BUNDLE [BUNDLE ...] [--batch 8] [--repeats 10] [--threads 2] [--group 3]
                                     [--top 14]

For each bundle (or fp32 export): one engine at one timestep of group ``--group`` (its per-group
inputs fed), ``--repeats`` profiled calls after three unprofiled ones. ONNX Runtime bundles: the
session's profile (kernel time per node, summed by op type; fused QLinearConv, MatMulIntegerToFloat,
QuantizeLinear / DequantizeLinear, float ops, layout Transposes). OpenVINO bundles: the compiled
model's performance counters (``PERF_COUNT``; real time per executed layer, summed by layer type
and its execution type, e.g. ``Convolution jit_avx512_amx_I8`` or ``Eltwise jit_avx512_FP32``).
Prints one markdown table: ms per call by op type, columns = bundles, the CPU line first.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def ort_profile(bundle, t: int, x, cond, repeats: int, threads: int) -> tuple[dict, float]:
    """(op type -> ms per call, median wall ms per call) of the ONNX Runtime engine of t's group."""
    import onnxruntime as ort

    g = bundle.group_of(t)
    engine = bundle.engine(g.engine)
    feeds = {"sample": x, "timestep": np.full(len(x), t, np.int64), **(cond or {}),
             **(bundle.group_inputs(t) or {})}
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "prof")
        if engine.external:
            values = [ort.OrtValue.ortvalue_from_numpy(v) for v in engine.external.values()]
            so.add_external_initializers(list(engine.external), values)
        s = ort.InferenceSession(str(engine.path), so, providers=["CPUExecutionProvider"])
        for _ in range(3):
            s.run(None, feeds)
        walls = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            s.run(None, feeds)
            walls.append(time.perf_counter() - t0)
        events = json.loads(Path(s.end_profiling()).read_text())
    by_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"] / 1e3 / (repeats + 3)
    return dict(by_op), statistics.median(walls) * 1e3


def ov_profile(bundle, t: int, x, cond, repeats: int, threads: int) -> tuple[dict, float]:
    """(layer type and execution type -> ms per call, median wall ms) of t's OpenVINO engine."""
    import openvino as ov

    g = bundle.group_of(t)
    core = ov.Core()
    core.set_property("CPU", {"INFERENCE_NUM_THREADS": threads})
    precision = bundle.manifest["engine"].get("inference_precision")
    cfg = {"PERF_COUNT": True, **({"INFERENCE_PRECISION_HINT": precision} if precision else {})}
    compiled = core.compile_model(str(bundle.root / g.engine), "CPU", cfg)
    request = compiled.create_infer_request()
    feeds = {"sample": x, "timestep": np.full(len(x), t, np.int64), **(cond or {})}
    for _ in range(3):
        request.infer(feeds)
    by_op, walls = collections.Counter(), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        request.infer(feeds)
        walls.append(time.perf_counter() - t0)
        for p in request.profiling_info:
            if p.status == p.Status.EXECUTED:
                by_op[f"{p.node_type} {p.exec_type}"] += p.real_time.total_seconds() * 1e3 / repeats
    return dict(by_op), statistics.median(walls) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", type=Path, nargs="+")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--group", type=int, default=3, help="profile this timestep group's engine (and inputs)")
    p.add_argument("--top", type=int, default=14, help="rows per bundle: its most expensive op types")
    args = p.parse_args(argv)

    from dmruntime import Bundle
    from dmruntime.bench import cpu_line, dummy_cond

    columns, walls = {}, {}
    for path in args.bundles:
        b = Bundle.open(path, threads=args.threads)
        g = b.groups[min(args.group, len(b.groups) - 1)]
        t = (g.t_start + g.t_end) // 2
        x = np.random.default_rng(0).standard_normal((args.batch, *b.sample_shape)).astype(np.float32)
        fn = ov_profile if b.manifest["engine"]["runtime"] == "openvino" else ort_profile
        columns[path.name], walls[path.name] = fn(b, t, x, dummy_cond(b, args.batch), args.repeats, args.threads)
    print(f"{cpu_line()}; {args.threads} threads; batch {args.batch}; {args.repeats} profiled calls (after 3 "
          f"unprofiled), timestep group {args.group}\n")
    rows = []
    for col in columns.values():
        rows += [k for k, _ in sorted(col.items(), key=lambda kv: -kv[1])[:args.top] if k not in rows]
    names = list(columns)
    print("| op type | " + " | ".join(f"{n} ms/call" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for r in rows:
        print(f"| {r} | " + " | ".join(f"{columns[n].get(r, 0.0):.2f}" for n in names) + " |")
    print("| other | " + " | ".join(f"{sum(v for k, v in columns[n].items() if k not in rows):.2f}"
                                   for n in names) + " |")
    print("| sum of kernels | " + " | ".join(f"{sum(columns[n].values()):.2f}" for n in names) + " |")
    print("| wall (median) | " + " | ".join(f"{walls[n]:.2f}" for n in names) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
