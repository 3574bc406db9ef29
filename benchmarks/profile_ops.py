"""Where a bundle's time goes, per op type: ONNX Runtime's profiler or OpenVINO's performance counters.

    python benchmarks/profile_ops.py BUNDLE|MODEL [...] [--like BUNDLE] [--batch 8] [--repeats 10] [--threads 2] [--group 3]
                                     [--top 14]

For each bundle (or fp32 export): one engine at one timestep of group ``--group`` (its per-group
inputs fed), ``--repeats`` profiled calls after three unprofiled ones. A bare model file (a peer:
ONNX Runtime's quantize_static ``.onnx``, NNCF's ``.xml``) is fed the same inputs (its column is
named by its folder). ONNX Runtime bundles: the
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


def ort_profile(path: Path, feeds: dict, repeats: int, threads: int, external: dict | None = None) -> tuple[dict, float]:
    """(op type -> ms per call, median wall ms per call) of an ONNX model on ONNX Runtime."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "prof")
        if external:
            values = [ort.OrtValue.ortvalue_from_numpy(v) for v in external.values()]
            so.add_external_initializers(list(external), values)
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
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


def ov_profile(path: Path, feeds: dict, repeats: int, threads: int, config: dict | None = None) -> tuple[dict, float]:
    """(layer type and execution type -> ms per call, median wall ms) of a model compiled by OpenVINO."""
    import openvino as ov

    core = ov.Core()
    core.set_property("CPU", {"INFERENCE_NUM_THREADS": threads})
    compiled = core.compile_model(str(path), "CPU", {"PERF_COUNT": True, **(config or {})})
    request = compiled.create_infer_request()
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


def profile(path: Path, like, t: int, x, cond, repeats: int, threads: int,
            ov_precision: str | None = None) -> tuple[dict, float]:
    """Profile a bundle (its engine of t's group, with that group's inputs) or a bare model file
    (``.onnx`` on ONNX Runtime, ``.xml`` on OpenVINO with its default hints) fed like ``like``.
    ``ov_precision``: OpenVINO bundles' float layers in this precision instead of the manifest's."""
    feeds = {"sample": x, "timestep": np.full(len(x), t, np.int64), **(cond or {})}
    if path.is_file():
        fn = ov_profile if path.suffix == ".xml" else ort_profile
        return fn(path, feeds, repeats, threads)
    from dmruntime import Bundle

    b = like if path == like.root else Bundle.open(path, threads=threads)
    g = b.group_of(t)
    feeds |= b.group_inputs(t) or {}
    if (b.manifest.get("engine") or {}).get("runtime") == "openvino":
        precision = ov_precision or b.manifest["engine"].get("inference_precision")
        return ov_profile(b.root / g.engine, feeds, repeats, threads,
                          {"INFERENCE_PRECISION_HINT": precision} if precision else None)
    return ort_profile(b.engine(g.engine).path, feeds, repeats, threads, b.engine(g.engine).external)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", type=Path, nargs="+", help="bundles, or bare models of the same UNet (.onnx, .xml)")
    p.add_argument("--like", type=Path, default=None,
                   help="a bundle of the same model, for the inputs, when only bare models are given")
    p.add_argument("--ov-precision", choices=("f32", "bf16"), default=None,
                   help="OpenVINO bundles: float layers in this precision (what --float-precision writes)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--group", type=int, default=3, help="profile this timestep group's engine (and inputs)")
    p.add_argument("--top", type=int, default=14, help="rows per bundle: its most expensive op types")
    args = p.parse_args(argv)

    from dmruntime import Bundle
    from dmruntime.bench import cpu_line, dummy_cond

    columns, walls = {}, {}
    bundle_args = [p for p in args.bundles if not p.is_file()]
    like = Bundle.open(bundle_args[0] if bundle_args else args.like, threads=args.threads)
    g = like.groups[min(args.group, len(like.groups) - 1)]
    t = (g.t_start + g.t_end) // 2
    x = np.random.default_rng(0).standard_normal((args.batch, *like.sample_shape)).astype(np.float32)
    for path in args.bundles:
        name = path.parent.name if path.is_file() else path.name
        columns[name], walls[name] = profile(path, like, t, x, dummy_cond(like, args.batch), args.repeats,
                                             args.threads, args.ov_precision)
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
