"""The openvino-cpu target against ONNX Runtime and OpenVINO's own quantizer, in one process.

    pip install nncf          # only for the NNCF baseline (bench-only, not a dependency)
    python benchmarks/bench_openvino.py placement [--models ddpm-cifar10-32]
    python benchmarks/bench_openvino.py int4
    python benchmarks/bench_openvino.py latency  [--models digits16 ddpm-cifar10-32] [--batches 1 8] [--work DIR]
    python benchmarks/bench_openvino.py switch   [--models digits16 ddpm-cifar10-32]
    python benchmarks/bench_openvino.py memory   [--models ddpm-cifar10-32]
    python benchmarks/bench_openvino.py fidelity [--models digits16] [--samples 256]

placement: group 0's QDQ graph under placement variants (ort-cpu's; uint8 without quantized Conv
  outputs, attention int8; int8 symmetric; openvino-cpu's): int8 layers after OpenVINO compiles
  it, latency, error vs fp32 and vs ONNX Runtime running the same graph.
int4: whether 4-bit weights (ONNX INT4) compile to int8 kernels: a small Conv + MatMul QDQ graph.
latency: per UNet call (interleaved rounds, medians; the timed call follows an untimed one at the
  same timestep, so it excludes engine switching) and per 50-step DDIM run (interleaved; includes it),
  ORT fp32, OpenVINO fp32 (default hint: bf16 where the CPU has it; f32 forced), ONNX Runtime's
  quantize_static, NNCF's nncf.quantize of the same fp32 ONNX run by OpenVINO, dmcompile K=1 /
  K=10 on ort-cpu and openvino-cpu, and K=10 as dmcompile built it before issue 26 (ort-cpu with
  every group's own Conv zero points and int32 biases fed) and openvino-cpu K=10 --shared-engine;
  ratios to ORT fp32. quantize_static and NNCF calibrate on the same 64 (x_t, t) rows of fp32 DDIM
  trajectories. ``--work DIR`` keeps the bundles for the next run.
switch: openvino-cpu K = 10, the first call after moving to another group's compiled model (the
  previous one freed its activation buffers) against a steady call; 9 switches per 50-step run.
memory: each variant in a fresh process: first start (compile) and second start (OpenVINO's
  compile cache) of every engine, then one 50-step run at batch 8; proportional set size (PSS)
  after it. openvino-cpu K=1, K=10 and K=10 with --max-engines 4/3/2 (their fidelity vs fp32:
  the build's check, 32 samples, no PTQD correction), ort-cpu K=10.
fidelity: the `dmcompile eval` protocol (DDIM 50, eta 0, seed 0, PyTorch fp32 reference):
  paired PSNR of ort-cpu K=10, openvino-cpu K=10 and NNCF int8 against FP, openvino-cpu against
  ort-cpu, and (digits) FD to the real digits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ort_quantize_static, ort_session
from benchmarks.machine import cpu_line


class Runner:
    """A bare ONNX Runtime session or OpenVINO compiled model behind the runtime's model interface
    (predict, schedule, sample_shape), so that DDIMSampler samples with it."""

    def __init__(self, fn, fp_bundle):
        self.fn, self.schedule, self.sample_shape = fn, fp_bundle.schedule, fp_bundle.sample_shape
        self.conditioning = None

    def predict(self, x, t, cond=None):
        return self.fn({"sample": x, "timestep": np.full(len(x), t, np.int64)})


def trajectory_rows(fp_bundle, n: int, seed: int = 0) -> list[dict]:
    """n (x_t, t) rows, batch 1, from fp32 DDIM-50 trajectories: what quantize_static and NNCF
    calibrate on (the inputs the UNet really sees)."""
    from dmruntime import DDIMSampler

    rows = []

    class Recorder:
        schedule, sample_shape, conditioning = fp_bundle.schedule, fp_bundle.sample_shape, None

        def predict(self, x, t, cond=None):
            rows.extend({"sample": x[i:i + 1].copy(), "timestep": np.array([t], np.int64)} for i in range(len(x)))
            return fp_bundle.predict(x, t)

    DDIMSampler(Recorder(), steps=50).sample(max(1, n // 16), seed=seed)
    pick = np.random.default_rng(seed).choice(len(rows), size=min(n, len(rows)), replace=False)
    return [rows[i] for i in sorted(pick)]


def nncf_int8(fp_path: Path, rows: list[dict], core):
    """NNCF's post-training quantization (defaults: performance preset) of the fp32 ONNX, read by OpenVINO."""
    import nncf

    model = core.read_model(str(fp_path))
    return nncf.quantize(model, nncf.Dataset(rows), subset_size=len(rows))


def build(model: str, out: Path, profile: str, k: int, **kw) -> Path:
    """A bundle (kept when ``out`` holds one already: ``--work`` reuses builds between runs)."""
    from dmcompile import api
    from dmcompile.config import BuildConfig, CalibrationConfig

    if (out / "manifest.json").is_file():
        return out
    cal = CalibrationConfig(size=64 if model == "digits16" else 16, groups=k)
    return api.build(model, out, BuildConfig(profile=profile, calibration=cal, eval_samples=kw.pop("eval_samples", 0),
                                             speed_check=False, **kw)).path


# dmcompile's variants: (label, profile, K, build options); "before" = what dmcompile built before issue 26
DMCOMPILE_VARIANTS = (
    ("ort-cpu K=1", "ort-cpu", 1, {}),
    ("ort-cpu K=10", "ort-cpu", 10, {"constant_conv_params": True}),
    ("ort-cpu K=10 before (--conv-params per-group)", "ort-cpu", 10, {"constant_conv_params": False}),
    ("openvino-cpu K=1", "openvino-cpu", 1, {}),
    ("openvino-cpu K=10", "openvino-cpu", 10, {}),
    ("openvino-cpu K=10 --shared-engine", "openvino-cpu", 10, {"shared_engine": True}),
)


def variants(model: str, tmp: Path, threads: int) -> dict:
    import openvino as ov

    from dmcompile import api
    from dmruntime import Bundle

    fpb = Bundle.open(api.fp_bundle(model))
    fp_path = fpb.root / "model.onnx"
    core = ov.Core()
    core.set_property("CPU", {"INFERENCE_NUM_THREADS": threads})
    rows = trajectory_rows(fpb, 64)
    qs = ort_session(ort_quantize_static(fp_path, tmp / "ort_qs.onnx", rows), threads)
    ort_fp = ort_session(fp_path, threads)
    ov_default = core.compile_model(core.read_model(str(fp_path)), "CPU")
    ov_f32 = core.compile_model(core.read_model(str(fp_path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    out = {
        "ORT fp32": Runner(lambda f: ort_fp.run(["eps"], f)[0], fpb),
        "OpenVINO fp32 (default hint)": Runner(lambda f: ov_default(f)[0], fpb),
        "OpenVINO fp32 (f32 forced)": Runner(lambda f: ov_f32(f)[0], fpb),
        "ORT quantize_static": Runner(lambda f: qs.run(["eps"], f)[0], fpb),
    }
    try:
        nn = core.compile_model(nncf_int8(fp_path, rows, core), "CPU")
        out["NNCF int8 (OpenVINO)"] = Runner(lambda f: nn(f)[0], fpb)
    except ImportError:
        print("nncf not installed: pip install nncf for its baseline", file=sys.stderr)
    for label, profile, k, kw in DMCOMPILE_VARIANTS:
        folder = tmp / model / label.split(" (")[0].replace(" ", "-").replace("=", "")
        path = build(model, folder, profile, k, **kw)
        out[f"dmcompile {label}"] = Bundle.open(path, threads=threads, cache_dir=tmp / "ovcache")
    return out


def cmd_latency(args) -> None:
    from dmruntime import DDIMSampler, ddim_timesteps

    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            vs = variants(name, Path(args.work) if args.work else Path(tmp), args.threads)
            shape = next(iter(vs.values())).sample_shape
            ts = [int(t) for t in ddim_timesteps(next(iter(vs.values())).schedule, 50)]
            for b in args.batches:
                x = np.random.default_rng(b).standard_normal((b, *shape)).astype(np.float32)
                calls = {v: [] for v in vs}
                for r in range(args.repeats + 1):  # round 0 warms up: every engine of every bundle
                    for v, m in vs.items():
                        if r == 0:
                            for t in ts:
                                m.predict(x, t)
                            continue
                        t = ts[(r * 7) % len(ts)]
                        m.predict(x, t)  # steady state within the group: switching is in the 50-step runs
                        t0 = time.perf_counter()
                        m.predict(x, t)
                        calls[v].append(time.perf_counter() - t0)
                runs = {v: [] for v in vs}
                for r in range(args.run_repeats):
                    for v, m in vs.items():
                        t0 = time.perf_counter()
                        DDIMSampler(m, steps=50, batch_size=b).sample(b, seed=r)
                        runs[v].append(time.perf_counter() - t0)
                c0, r0 = statistics.median(calls["ORT fp32"]), statistics.median(runs["ORT fp32"])
                for v in vs:
                    c, rr = statistics.median(calls[v]), statistics.median(runs[v])
                    rows.append((name, b, v, c * 1e3, c / c0, rr, rr / r0))
            print(f"{name} done", file=sys.stderr, flush=True)
    print(f"{cpu_line()}; openvino {_ov()}; {args.threads} threads, {args.repeats} interleaved rounds per call, "
          f"{args.run_repeats} interleaved 50-step runs, medians\n")
    print("| model | batch | variant | ms per call | vs ORT fp32 | 50-step run s | vs ORT fp32 |")
    print("|---|---|---|---|---|---|---|")
    for name, b, v, ms, cr, s, rr in rows:
        print(f"| {name} | {b} | {v} | {ms:.2f} | {cr:.2f}x | {s:.2f} | {rr:.2f}x |")


MEMORY_CHILD = r"""
import json, sys, time, numpy as np
from dmruntime import Bundle, DDIMSampler
path, cache, threads, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
b = Bundle.open(path, threads=threads, cache_dir=cache)
x = np.zeros((1, *b.sample_shape), np.float32)
for g in b.groups:
    b.predict(x, g.t_start)
start = time.perf_counter() - t0
DDIMSampler(b, steps=50, batch_size=batch).sample(batch, seed=0)
mem = {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/smaps_rollup").read().splitlines()[1:]}
print(json.dumps({"start_s": start, "pss_mb": mem["Pss"] / 1024, "rss_mb": mem["Rss"] / 1024}))
"""


def cmd_memory(args) -> None:
    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            specs = {"openvino-cpu K=1": ("openvino-cpu", 1, None), "openvino-cpu K=10": ("openvino-cpu", 10, None),
                     **{f"openvino-cpu K=10, --max-engines {n}": ("openvino-cpu", 10, n) for n in args.max_engines},
                     "ort-cpu K=10": ("ort-cpu", 10, None)}
            for label, (profile, k, n) in specs.items():
                path = build(name, tmp / label.replace(" ", "_").replace(",", ""), profile, k, max_engines=n,
                             eval_samples=args.eval_samples, correction=False)
                fid = json.loads((path / "manifest.json").read_text())["fidelity"]["psnr_db_mean"]
                got = []
                for _ in range(2):  # first start compiles, the second imports from the cache
                    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(path), str(tmp / f"cache-{label}"),
                                          str(args.threads), "8"], capture_output=True, text=True, check=True)
                    got.append(json.loads(out.stdout.strip().splitlines()[-1]))
                engines = len({g["engine"] for g in json.loads((path / "manifest.json").read_text())["groups"]})
                rows.append((name, label, engines, got[0]["start_s"], got[1]["start_s"], got[1]["pss_mb"], fid))
            print(f"{name} done", file=sys.stderr, flush=True)
    print(f"{cpu_line()}; openvino {_ov()}; {args.threads} threads; each row a fresh process: start = open + first "
          "call of every engine; PSS after a 50-step run at batch 8; fidelity = the build's check "
          f"({args.eval_samples} samples, DDIM 50, PSNR vs the fp32 export)\n")
    print("| model | bundle | engines | first start s | second start s | PSS MB | vs openvino-cpu K=1 | PSNR dB vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    base = {name: pss for name, label, _, _, _, pss, _ in rows if label == "openvino-cpu K=1"}
    for name, label, e, s1, s2, pss, fid in rows:
        print(f"| {name} | {label} | {e} | {s1:.2f} | {s2:.2f} | {pss:.0f} | {pss / base[name]:.2f}x | {fid:.2f} |")


def cmd_fidelity(args) -> None:
    import openvino as ov

    from dmcompile import api
    from dmcompile.api import digit_scores, is_digits_shape, reference_model
    from dmcompile.config import SampleConfig
    from dmcompile.eval.metrics import psnr
    from dmcompile.frontend.torch_model import TorchEpsModel
    from dmcompile.stages import sample_model
    from dmruntime import Bundle

    print(f"{cpu_line()}; openvino {_ov()}; DDIM 50, eta 0, seed 0, {args.samples} samples, "
          "paired PSNR per sample (mean)\n")
    print("| model | variant | PSNR dB vs FP | PSNR dB vs ort-cpu K=10 | FD to real (digits) |")
    print("|---|---|---|---|---|")
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            sc = SampleConfig(n=args.samples, steps=50, seed=0)
            fpb = Bundle.open(api.fp_bundle(name))
            core = ov.Core()
            rows = trajectory_rows(fpb, 64)
            models = {f"dmcompile {p} K=10": Bundle.open(build(name, tmp / p, p, 10), cache_dir=tmp / "c")
                      for p in ("ort-cpu", "openvino-cpu")}
            nn = core.compile_model(nncf_int8(fpb.root / "model.onnx", rows, core), "CPU")
            models["NNCF int8 (OpenVINO)"] = Runner(lambda f: nn(f)[0], fpb)
            ref = TorchEpsModel(reference_model(fpb))
            want = sample_model(ref, sc)
            got = {k: sample_model(m, sc) for k, m in models.items()}
            digits = is_digits_shape(want.shape[1:])
            for k, x in [("FP (PyTorch)", want), *got.items()]:
                fd = digit_scores(x)["fd_to_real"] if digits else None
                p_fp = float(np.mean(np.minimum(psnr(x, want), 200.0)))
                p_ort = float(np.mean(np.minimum(psnr(x, got["dmcompile ort-cpu K=10"]), 200.0)))
                print(f"| {name} | {k} | {p_fp:.2f} | {p_ort:.2f} | {'-' if fd is None else f'{fd:.2f}'} |",
                      flush=True)


def cmd_placement(args) -> None:
    """Which QDQ placement OpenVINO turns into int8 kernels, and how fast: group 0's graph (W8A8,
    K = 10) under placement variants, compiled by OpenVINO; int8 layers of the runtime graph,
    latency vs ORT fp32, relative error vs fp32, and OpenVINO vs ONNX Runtime on the same graph."""
    import dataclasses

    import onnx
    import onnxruntime as ort
    import openvino as ov

    from benchmarks.common import ort_session
    from dmcompile import compiler
    from dmcompile.compiler.engines import engine_job
    from dmcompile.backends.openvino import runtime_precisions
    from dmcompile.config import BuildConfig, CalibrationConfig
    from dmcompile.targets import OPENVINO_CPU, ORT_CPU, PROFILES

    placements = {
        "ort-cpu's (uint8, Conv outputs, attention int8)": ORT_CPU,
        "uint8, no Conv outputs, attention int8": dataclasses.replace(OPENVINO_CPU, name="x-attn",
                                                                      quantize_activation_matmuls=True),
        "int8 symmetric, no Conv outputs, attention float": dataclasses.replace(OPENVINO_CPU, name="x-int8",
                                                                                activation_dtype="int8"),
        "openvino-cpu (uint8, no Conv outputs, attention float)": OPENVINO_CPU,
    }
    core = ov.Core()
    core.set_property("CPU", {"INFERENCE_NUM_THREADS": args.threads})
    print(f"{cpu_line()}; openvino {_ov()}; {args.threads} threads, {args.repeats} interleaved rounds, medians; "
          "t = 500; group 0's scales\n")
    print("| model | placement | int8 layers after compile | batch | ms | vs ORT fp32 | rel. err vs fp32 | "
          "OpenVINO vs ORT, same graph |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            compiled, paths, counts = {}, {}, {}
            for label, prof in placements.items():
                PROFILES.setdefault(prof.name, prof)
                cfg = BuildConfig(profile=prof.name, eval_samples=0,
                                  calibration=CalibrationConfig(size=64 if name == "digits16" else 16, groups=10))
                ws = compiler.prepare(name, cfg)
                calib = compiler.calibrate_workspace(ws, cfg)
                job = engine_job(ws, calib, compiler.allocate_widths(ws, calib, cfg), cfg)
                _, _, qdq = next(job.lower([[0]], job.ranges))  # group 0's QDQ graph
                paths[label] = Path(tmp) / f"{prof.name}.onnx"
                onnx.save(qdq, str(paths[label]))
                compiled[label] = core.compile_model(str(paths[label]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
                counts[label] = ", ".join(f"{k} {p} {n}" for (k, p), n in sorted(runtime_precisions(compiled[label]).items()))
            fp = ort_session(ws.fp / "model.onnx", args.threads)
            no_fusion = ort.SessionOptions()
            for b in args.batches:
                x = np.random.default_rng(b).standard_normal((b, *ws.model["sample_shape"])).astype(np.float32)
                feeds = {"sample": x, "timestep": np.full(b, 500, np.int64)}
                fns = {"ORT fp32": lambda: fp.run(["eps"], feeds)[0],
                       **{k: (lambda c=c: c(feeds)[0]) for k, c in compiled.items()}}
                times, outs = {k: [] for k in fns}, {}
                for r in range(args.repeats + 1):
                    for k, fn in fns.items():
                        t0 = time.perf_counter()
                        outs[k] = fn()
                        if r:
                            times[k].append(time.perf_counter() - t0)
                ref, base = outs["ORT fp32"], statistics.median(times["ORT fp32"])
                for k in compiled:
                    same = ort.InferenceSession(str(paths[k]), no_fusion, providers=["CPUExecutionProvider"])
                    want = same.run(["eps"], feeds)[0]
                    m = statistics.median(times[k])
                    print(f"| {name} | {k} | {counts[k]} | {b} | {m * 1e3:.2f} | {m / base:.2f}x | "
                          f"{_rel(outs[k], ref):.4f} | {_rel(outs[k], want):.4f} |", flush=True)


def cmd_switch(args) -> None:
    """What moving to another group's compiled model costs (openvino-cpu K = 10): the first call
    after a switch against a steady call, interleaved; times the 9 switches of a 50-step run."""
    from dmruntime import Bundle

    print(f"{cpu_line()}; openvino {_ov()}; {args.threads} threads, {args.repeats} rounds, medians\n")
    print("| model | batch | steady call ms | call after a switch ms | switch cost ms | 9 switches / 50-step run |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            b = Bundle.open(build(name, Path(tmp) / "b", "openvino-cpu", 10, correction=False), threads=args.threads)
            t_a, t_b = b.groups[2].t_start, b.groups[7].t_start
            for batch in args.batches:
                x = np.random.default_rng(batch).standard_normal((batch, *b.sample_shape)).astype(np.float32)
                for t in (t_a, t_b, t_a):  # compile both engines, allocate once
                    b.predict(x, t)
                steady, switched = [], []
                for r in range(args.repeats):
                    t_from, t_to = (t_a, t_b) if r % 2 else (t_b, t_a)
                    b.predict(x, t_from)
                    t0 = time.perf_counter()
                    b.predict(x, t_to)  # a new engine: the previous one freed its buffers
                    switched.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    b.predict(x, t_to)
                    steady.append(time.perf_counter() - t0)
                s_, w_ = statistics.median(steady), statistics.median(switched)
                print(f"| {name} | {batch} | {s_ * 1e3:.2f} | {w_ * 1e3:.2f} | {(w_ - s_) * 1e3:.2f} | "
                      f"{9 * (w_ - s_) / (50 * s_):.1%} |", flush=True)


def cmd_int4(args) -> None:
    """Does OpenVINO run 4-bit weights in int8 kernels? A small QDQ graph (uint8 activations into a
    3x3 Conv and a MatMul) with its weights as INT4 DequantizeLinear (opset 21), as INT4 + Cast to
    int8, and as int8; the runtime precision of the Convolution / FullyConnected it compiles to."""
    import onnx
    import openvino as ov
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from dmcompile.backends.openvino import runtime_precisions

    rng = np.random.default_rng(0)
    W = rng.integers(-8, 8, (64, 64, 3, 3)).astype(np.int8)
    M = rng.integers(-8, 8, (64, 64)).astype(np.int8)

    def graph(kind: str) -> onnx.ModelProto:
        inits = [nh.from_array(np.float32(0.02), "xs"), nh.from_array(np.uint8(128), "xz"),
                 nh.from_array(np.full(64, 0.01, np.float32), "s"), nh.from_array(np.zeros(64, np.int8), "z")]
        nodes = []
        for name, arr, axis in (("W", W, 0), ("M", M, 1)):
            if kind == "int8":
                inits.append(nh.from_array(arr, name))
                nodes.append(h.make_node("DequantizeLinear", [name, "s", "z"], [f"{name}d"], axis=axis))
            else:
                inits.append(h.make_tensor(name, TP.INT4, arr.shape, arr.ravel().tolist()))
                if kind == "int4":
                    inits.append(h.make_tensor(f"{name}z4", TP.INT4, [64], [0] * 64))
                    nodes.append(h.make_node("DequantizeLinear", [name, "s", f"{name}z4"], [f"{name}d"], axis=axis))
                else:
                    nodes += [h.make_node("Cast", [name], [f"{name}8"], to=TP.INT8),
                              h.make_node("DequantizeLinear", [f"{name}8", "s", "z"], [f"{name}d"], axis=axis)]
        nodes += [h.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                  h.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                  h.make_node("Conv", ["xd", "Wd"], ["c"], pads=[1, 1, 1, 1]),
                  h.make_node("Transpose", ["c"], ["ct"], perm=[0, 2, 3, 1]),
                  h.make_node("QuantizeLinear", ["ct", "xs", "xz"], ["cq"]),
                  h.make_node("DequantizeLinear", ["cq", "xs", "xz"], ["cd"]),
                  h.make_node("MatMul", ["cd", "Md"], ["y"])]
        g = h.make_graph(nodes, "int4", [h.make_tensor_value_info("x", TP.FLOAT, [1, 64, 16, 16])],
                         [h.make_tensor_value_info("y", TP.FLOAT, [1, 16, 16, 64])], inits)
        m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
        m.ir_version = 10
        onnx.checker.check_model(m)
        return m

    core = ov.Core()
    print(f"{cpu_line()}; openvino {_ov()}\n")
    print("| weights | Convolution / FullyConnected runtime precision |")
    print("|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind, label in (("int8", "int8 DequantizeLinear"), ("int4", "INT4 DequantizeLinear (opset 21)"),
                            ("cast", "INT4 + Cast to int8 + DequantizeLinear (opset 21)")):
            path = Path(tmp) / f"{kind}.onnx"
            onnx.save(graph(kind), str(path))
            got = runtime_precisions(core.compile_model(str(path), "CPU"))
            print(f"| {label} | {', '.join(f'{k} {p}' for (k, p), n in sorted(got.items()))} |")


def _rel(a, ref) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def _ov() -> str:
    import openvino

    return openvino.__version__.split("-")[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=["placement", "int4", "latency", "switch", "memory", "fidelity"])
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--run-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=None,
                   help="latency: keep the built bundles here and reuse them on the next run")
    p.add_argument("--max-engines", nargs="+", type=int, default=[4, 3, 2])
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--samples", type=int, default=256)
    args = p.parse_args(argv)
    defaults = {"placement": ["ddpm-cifar10-32"], "int4": [], "latency": ["digits16", "ddpm-cifar10-32"],
                "switch": ["digits16", "ddpm-cifar10-32"],
                "memory": ["ddpm-cifar10-32"], "fidelity": ["digits16"]}
    args.models = args.models or defaults[args.phase]
    {"placement": cmd_placement, "int4": cmd_int4, "latency": cmd_latency, "switch": cmd_switch, "memory": cmd_memory,
     "fidelity": cmd_fidelity}[args.phase](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
