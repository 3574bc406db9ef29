"""The Stable Diffusion 1.5 UNet at full size (preset ``sd15-unet``: the exact SD-1.5 config,
859.5 M parameters, seeded random weights): export, a W8A8 K = 10 build, size, integer-kernel
share and per-call latency against ONNX Runtime fp32 and ONNX Runtime's quantize_static.

    python benchmarks/bench_sd15.py                       # every phase, each in its own process
    python benchmarks/bench_sd15.py --phase latency --repeats 7

Phases (each a fresh subprocess, so its peak resident memory is its own):
  export   trace to ONNX (3.4 GB of fp32 weights: external data), parity vs PyTorch
  build    W8A8, K = 10 groups, calibrated on a few guided trajectories with random text
           embeddings (CFG scale 7.5; the null condition is a fixed random stand-in for the
           empty-prompt embedding); no PTQD statistics and no fidelity run (those sample
           50 steps with the fp32 model: hours on 2 cores)
  qs       ONNX Runtime's quantize_static on the fp32 export (QDQ, per-channel int8 weights,
           uint8 activations, MinMax on one input row: on the guided batch of two its
           calibrator is killed for memory at 24 GB)
  latency  one guided DDIM step (batch 2: [null; cond]) at latent 64x64, the three engines
           interleaved in one process, medians
  build-ov the openvino-cpu bundle (same calibration settings, K = 10 merged into --max-engines 2)
  latency-ov ORT fp32, OpenVINO fp32 (default hint) and the openvino-cpu bundle, one guided step
  build-trt the tensorrt bundle (same calibration settings, K = 10 engines: FP16-typed ONNX with
           int8 Q/DQ, each checked against TensorRT's rules; no engines: no TensorRT here)
  check-trt one guided call of the tensorrt bundle's engine graph on ONNX Runtime (CPU) against
           the fp32 export: relative error, time, peak memory
Outputs go to --work (default /tmp/dmcompile-sd15); the fp32 export is cached as usual.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ort_quantize_static, ort_session
from benchmarks.machine import cpu_line

MODEL = "sd15-unet"
GUIDANCE = 7.5
L, D = 77, 768


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def conditions_file(work: Path, n: int) -> Path:
    """Random text embeddings (n rows) and a fixed null row: stand-ins for CLIP outputs."""
    path = work / "conditions.npz"
    rng = np.random.default_rng(0)
    np.savez(path, encoder_hidden_states=rng.standard_normal((n, L, D), dtype=np.float32),
             null_encoder_hidden_states=rng.standard_normal((L, D), dtype=np.float32) * 0.5)
    return path


def phase_export(args) -> dict:
    from dmcompile import api

    t0 = time.perf_counter()
    model = api.load_model(MODEL)
    load_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.unet.parameters())
    fp = api.fp_bundle(model)
    m = json.loads((fp / "manifest.json").read_text())
    return {"params": params, "load_seconds": load_s, "export_seconds": m["export"]["seconds"],
            "parity_max_abs_err": m["export"]["parity_max_abs_err"], "export_bytes": folder_bytes(fp),
            "files": sorted(f.name for f in fp.iterdir()), "total_macs_per_sample": m["export"]["total_macs_per_sample"],
            "fp": str(fp), "peak_gb": peak_gb(), "wall_seconds": time.perf_counter() - t0}


def _build(args, folder: str, **options) -> dict:
    """W8A8, K = 10, calibrated on --calib-size guided trajectories; no PTQD and no fidelity run."""
    from dmcompile import api
    from dmcompile.cli import _progress_bar

    work = Path(args.work)
    cal = api.CalibrationConfig(size=args.calib_size, steps=args.calib_steps, groups=10, batch_size=1,
                                guidance_scale=GUIDANCE, conditions=str(conditions_file(work, args.calib_size)))
    t0 = time.perf_counter()
    options.setdefault("analysis", api.AnalysisConfig(rounding="rtn"))  # GPTQ's moments: 28 GB for this UNet
    res = api.build(MODEL, work / folder, api.BuildConfig(calibration=cal, eval_samples=0, correction=False,
                                                          **options), progress=_progress_bar("build"))
    return {"build_seconds": res.manifest["build"]["seconds"], "wall_seconds": time.perf_counter() - t0,
            "bundle_bytes": folder_bytes(res.path), "files": sorted(f.name for f in res.path.iterdir()),
            "fusion": res.manifest["build"]["fusion"], "peak_gb": peak_gb()}


def phase_build(args) -> dict:
    return _build(args, "bundle")


def phase_build_ov(args) -> dict:
    """The openvino-cpu bundle: K = 10 groups merged into --max-engines engines."""
    return _build(args, "bundle-openvino", profile="openvino-cpu", max_engines=args.max_engines)


def _interleaved(variants: dict, repeats: int) -> dict:
    """One guided step per variant (fn(t)), interleaved over a few timesteps, round 0 warming up;
    medians and ratios to "ORT fp32"."""
    ts = [999, 800, 600, 400, 200, 1]
    times = {v: [] for v in variants}
    for r in range(repeats + 1):
        for v, fn in variants.items():
            t0 = time.perf_counter()
            fn(ts[r % len(ts)])
            if r:
                times[v].append(time.perf_counter() - t0)
    base = statistics.median(times["ORT fp32"])
    return {v: {"median_s": statistics.median(x), "vs_fp32": statistics.median(x) / base, "runs": x}
            for v, x in times.items()}


def phase_latency_ov(args) -> dict:
    """ORT fp32, OpenVINO fp32 (default hint: bf16 where the CPU has it) and the openvino-cpu
    bundle, one guided step interleaved; compile time and resident memory of the bundle's engines."""
    import openvino as ov
    from dmruntime import Bundle

    from dmcompile import api

    work = Path(args.work)
    fp = api.fp_bundle(MODEL) / "model.onnx"
    core = ov.Core()
    core.set_property("CPU", {"INFERENCE_NUM_THREADS": args.threads})
    ov_fp = core.compile_model(str(fp), "CPU")
    bundle = Bundle.open(work / "bundle-openvino", threads=args.threads)
    feeds = _guided_feeds()
    cond = {"encoder_hidden_states": feeds["encoder_hidden_states"]}
    t0 = time.perf_counter()
    for g in {g.engine: g for g in bundle.groups}.values():  # compile every engine once
        bundle.predict(feeds["sample"], g.t_start, cond)
    compile_s = time.perf_counter() - t0
    ort_fp = ort_session(fp, args.threads)
    variants = {"ORT fp32": lambda t: ort_fp.run(None, {**feeds, "timestep": np.full(2, t, np.int64)}),
                "OpenVINO fp32 (default hint)": lambda t: ov_fp({**feeds, "timestep": np.full(2, t, np.int64)}),
                "dmcompile openvino-cpu": lambda t: bundle.predict(feeds["sample"], t, cond)}
    return _interleaved(variants, args.repeats) | {"engines_first_call_s": compile_s, "peak_gb": peak_gb()}


def _guided_feeds(b: int = 2, hw: int = 64, t: int = 500) -> dict:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((b // 2, 4, hw, hw), dtype=np.float32)
    emb = rng.standard_normal((b, L, D), dtype=np.float32)
    return {"sample": np.concatenate([x, x]), "timestep": np.full(b, t, np.int64), "encoder_hidden_states": emb}


def phase_qs(args) -> dict:
    from dmcompile import api

    # One row, not the guided pair: with every tensor an output, ORT's calibrator was killed at
    # 24 GB resident on the batch-2 input (this machine's memory). Its scales do not change speed.
    feeds = [{k: v[:1] for k, v in _guided_feeds().items()}]
    out = Path(args.work) / "ort_qs"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ort_quantize_static(api.fp_bundle(MODEL) / "model.onnx", out / "model.onnx", feeds, external_data=True)
    return {"seconds": time.perf_counter() - t0, "bytes": folder_bytes(out), "peak_gb": peak_gb()}


def phase_latency(args) -> dict:
    from dmruntime import Bundle

    from dmcompile import api

    work = Path(args.work)
    ort_fp = ort_session(api.fp_bundle(MODEL) / "model.onnx", args.threads)
    ort_qs = ort_session(work / "ort_qs" / "model.onnx", args.threads)
    bundle = Bundle.open(work / "bundle", threads=args.threads)
    feeds = _guided_feeds()
    cond = {"encoder_hidden_states": feeds["encoder_hidden_states"]}

    def run(sess):
        return lambda t: sess.run(None, {**feeds, "timestep": np.full(2, t, np.int64)})

    variants = {"ORT fp32": run(ort_fp), "ORT quantize_static": run(ort_qs),
                "dmcompile W8A8 K=10": lambda t: bundle.predict(feeds["sample"], t, cond)}
    return _interleaved(variants, args.repeats) | {"peak_gb": peak_gb()}


def phase_build_trt(args) -> dict:
    """The tensorrt bundle: one engine graph per group, GPU memory on paper (inspect's estimate)."""
    from dmcompile.backends import get_backend
    from dmcompile.memory import resident_estimate

    out = _build(args, "bundle-tensorrt", profile="tensorrt")
    m = json.loads((Path(args.work) / "bundle-tensorrt" / "manifest.json").read_text())
    out["tensorrt"] = m["engine"]["tensorrt"]
    trt, ort = get_backend("tensorrt").memory, get_backend("onnxruntime").memory
    out["gpu_memory_on_paper_mb"] = {b: resident_estimate(m, b, trt, ort)["total_mb"] for b in (1, 8)}
    return out


def phase_check_trt(args) -> dict:
    """One guided call (batch 2, t = 500) of group 5's FP16 engine graph on ONNX Runtime against
    the fp32 export: does the SD-sized strongly typed graph run, and how far is it."""
    from dmruntime import Bundle

    from dmcompile import api

    work = Path(args.work)
    feeds = _guided_feeds()
    cond = {"encoder_hidden_states": feeds["encoder_hidden_states"]}
    fp = Bundle.open(api.fp_bundle(MODEL), threads=args.threads)
    trt = Bundle.open(work / "bundle-tensorrt", device="cpu", threads=args.threads)
    t0 = time.perf_counter()
    want = fp.predict(feeds["sample"], 500, cond)
    fp_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = trt.predict(feeds["sample"], 500, cond)
    trt_s = time.perf_counter() - t0
    rel = float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2)))
    return {"relative_rms_error": rel, "fp32_seconds": fp_s, "engine_graph_seconds_on_cpu": trt_s,
            "peak_gb": peak_gb()}


PHASES = {"export": phase_export, "build": phase_build, "qs": phase_qs, "latency": phase_latency,
          "build-ov": phase_build_ov, "latency-ov": phase_latency_ov, "build-trt": phase_build_trt,
          "check-trt": phase_check_trt}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=["all", *PHASES], default="all")
    p.add_argument("--work", default="/tmp/dmcompile-sd15")
    p.add_argument("--calib-size", type=int, default=2, help="guided trajectories (2 rows per call)")
    p.add_argument("--calib-steps", type=int, default=10, help="DDIM steps per trajectory (one per group at K=10)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-engines", type=int, default=2, help="build-ov: engines of the openvino-cpu bundle")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.phase != "all":
        out = PHASES[args.phase](args)
        print("RESULT " + json.dumps(out, default=str), flush=True)
        return 0
    print(cpu_line(), flush=True)
    return run_phases(__file__, PHASES, ["--work", args.work, "--calib-size", str(args.calib_size),
                                         "--calib-steps", str(args.calib_steps), "--repeats", str(args.repeats),
                                         "--threads", str(args.threads), "--max-engines", str(args.max_engines)])


def run_phases(script: str, phases, options: list[str]) -> int:
    """Each phase of ``script`` in a fresh process (its peak memory its own), printing its RESULT line."""
    for phase in phases:
        proc = subprocess.run([sys.executable, script, "--phase", phase, *options], stdout=subprocess.PIPE,
                              text=True, check=False)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"phase {phase} failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        print(f"{phase}: {line[-1][7:]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
