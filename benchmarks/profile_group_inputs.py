"""Where the cost of per-group parameters as engine inputs goes: ONNX Runtime's profiler, per op type.

    python benchmarks/profile_group_inputs.py [--model ddpm-cifar10-32] [--batch 8] [--repeats 12]

Builds a K = 10 bundle, then times in one process, interleaved, the bundle's engine (scales,
zero points and int32 biases fed as inputs) against the same engine with one group's values
baked in as constants. Prints the median ms per call and the summed kernel time per op type.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def constant_engine(engine: Path, params: dict, out: Path) -> Path:
    """The engine with ``params`` turned from graph inputs into initializers."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(engine))
    kept = [i for i in m.graph.input if i.name not in params]
    del m.graph.input[:]
    m.graph.input.extend(kept)
    m.graph.initializer.extend(numpy_helper.from_array(v, n) for n, v in params.items())
    onnx.save(m, str(out))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ddpm-cifar10-32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--group", type=int, default=3)
    args = p.parse_args(argv)

    import onnxruntime as ort

    from dmcompile import api

    model = api.load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = 64 if args.model == "digits16" else 16
        cfg = api.BuildConfig(eval_samples=0, calibration=api.CalibrationConfig(size=size, groups=10))
        bundle = api.build(model, tmp / "k10", cfg).path
        params = dict(np.load(bundle / f"group_{args.group:02d}.npz"))
        const = constant_engine(bundle / "unet.onnx", params, tmp / "const.onnx")
        x = np.random.default_rng(0).standard_normal((args.batch, *model.sample_shape), dtype=np.float32)
        ts = np.full(args.batch, 100 * args.group + 50, np.int64)
        variants = {}
        for name, path, feeds in (("inputs", bundle / "unet.onnx", {"sample": x, "timestep": ts, **params}),
                                  ("constants", const, {"sample": x, "timestep": ts})):
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            so.enable_profiling = True
            so.profile_file_prefix = str(tmp / name)
            variants[name] = (ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), feeds)
        times = {n: [] for n in variants}
        for r in range(args.repeats + 2):  # two warm-up rounds
            for n, (s, feeds) in variants.items():
                t0 = time.perf_counter()
                s.run(None, feeds)
                if r >= 2:
                    times[n].append(time.perf_counter() - t0)
        per_op = {}
        for n, (s, _) in variants.items():
            agg = collections.Counter()
            for e in json.load(open(s.end_profiling())):
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    agg[e["args"]["op_name"]] += e["dur"]
            per_op[n] = {op: us / 1e3 / (args.repeats + 2) for op, us in agg.items()}
    a, b = statistics.median(times["inputs"]) * 1e3, statistics.median(times["constants"]) * 1e3
    print(f"{args.model}, batch {args.batch}: median ms per call, inputs {a:.1f}, constants {b:.1f}, ratio {a / b:.3f}")
    print("| op type | inputs (ms/call) | constants (ms/call) | difference |")
    print("|---|---|---|---|")
    ops = sorted(per_op["inputs"], key=lambda o: -per_op["inputs"][o])[:10]
    for op in ops:
        i, c = per_op["inputs"][op], per_op["constants"].get(op, 0.0)
        print(f"| {op} | {i:.1f} | {c:.1f} | {i - c:+.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
