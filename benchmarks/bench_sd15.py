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
  build-ov-shared  the openvino-cpu bundle with one engine for all groups (--shared-engine)
  build-before     the ort-cpu bundle as built before issue 26 (--conv-params per-group)
  rows     the guided calls the peers calibrate on (the build's calibration, through the fp32 export)
  nncf     NNCF's int8 of the fp32 export (OpenVINO notebooks' SD settings) on those rows
  hybrid   optimum-intel's hybrid int8 recipe (NNCF directly) on those rows
  peers    per guided call and per 10-step DDIM run, interleaved: ORT fp32, OpenVINO's default,
           quantize_static, NNCF, hybrid, dmcompile bundles (--bundles, --bf16-bundles; --skip some
           for memory: all of them in one process need more than 24 GB)
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
    """The ort-cpu bundle as a user gets it (--conv-params auto: the build CPU picks the Conv path)."""
    return _build(args, "bundle")


def phase_build_ov(args) -> dict:
    """The openvino-cpu bundle: K = 10 groups merged into --max-engines engines."""
    return _build(args, "bundle-openvino", profile="openvino-cpu", max_engines=args.max_engines)


def phase_build_ov_shared(args) -> dict:
    """The openvino-cpu bundle with all K = 10 groups in one engine (--shared-engine)."""
    return _build(args, "bundle-openvino-shared", profile="openvino-cpu", shared_engine=True)


def phase_build_before(args) -> dict:
    """The ort-cpu bundle as built before issue 26: every group's own Conv zero points and biases fed."""
    return _build(args, "bundle-before", constant_conv_params=False)


def _interleaved(variants: dict, repeats: int, warm: bool = True) -> dict:
    """One guided step per variant (fn(t)), interleaved over a few timesteps, round 0 warming up
    (unless ``warm`` is False); medians and ratios to "ORT fp32"."""
    ts = [999, 800, 600, 400, 200, 1]
    times = {v: [] for v in variants}
    for r in range(repeats + int(warm)):
        for v, fn in variants.items():
            t0 = time.perf_counter()
            fn(ts[r % len(ts)])
            if r or not warm:
                times[v].append(time.perf_counter() - t0)
    anchor = "ORT fp32" if "ORT fp32" in times else next(iter(times))
    base = statistics.median(times[anchor])
    return {v: {"median_s": statistics.median(x), f"vs {anchor}": statistics.median(x) / base, "runs": x}
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


def _rows_path(work: Path) -> Path:
    return work / "guided_rows.npz"


def phase_rows(args) -> dict:
    """The guided calls the peers calibrate on: what dmcompile's build calibrates on (--calib-size
    trajectories x --calib-steps DDIM steps, CFG 7.5, the same random embeddings), recorded from
    the fp32 export; one row per call (batch 2: [null; cond])."""
    from dmruntime import Bundle, SamplingLoop

    from dmcompile import api

    work = Path(args.work)
    fp = Bundle.open(api.fp_bundle(MODEL), threads=args.threads)
    conds = np.load(conditions_file(work, args.calib_size))
    rows = []

    class Recorder:
        schedule, sample_shape, conditioning = fp.schedule, fp.sample_shape, None

        def predict(self, x, t, cond=None):
            rows.append({"sample": x.copy(), "timestep": np.full(len(x), t, np.int64),
                         "encoder_hidden_states": cond["encoder_hidden_states"].copy()})
            return fp.predict(x, t, cond)

    t0 = time.perf_counter()
    null = {"encoder_hidden_states": conds["null_encoder_hidden_states"]}  # one row, no batch axis
    loop = SamplingLoop(Recorder(), "ddim", batch_size=1, guidance_scale=GUIDANCE, null_cond=null, steps=args.calib_steps)
    loop.sample(args.calib_size, seed=0, cond={"encoder_hidden_states": conds["encoder_hidden_states"]})
    np.savez(_rows_path(work), **{k: np.stack([r[k] for r in rows]) for k in rows[0]})
    return {"rows": len(rows), "batch": len(rows[0]["sample"]), "seconds": time.perf_counter() - t0, "peak_gb": peak_gb()}


def _rows(work: Path) -> list[dict]:
    d = np.load(_rows_path(work))
    return [{k: d[k][i] for k in d.files} for i in range(len(d["sample"]))]


def _ops_with_weights(model) -> list[str]:
    """MatMuls with a constant operand (through Convert): what optimum-intel's hybrid recipe
    compresses weight-only and leaves out of activation quantization."""
    def const(node):
        while node.get_type_name() == "Convert":
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"

    return [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul"
            and any(const(op.input_value(i).get_node()) for i in (0, 1))]


def _save_ov(model, out: Path) -> int:
    import openvino as ov

    out.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(out / "model.xml"))
    return folder_bytes(out)


def phase_nncf(args) -> dict:
    """NNCF's full int8 of the fp32 export, with the settings OpenVINO's notebooks give SD UNets
    (MIXED preset, TRANSFORMER model type, bias correction off), calibrated on the guided rows."""
    import nncf
    import openvino as ov

    from dmcompile import api

    work = Path(args.work)
    t0 = time.perf_counter()
    model = ov.Core().read_model(str(api.fp_bundle(MODEL) / "model.onnx"))
    rows = _rows(work)
    q = nncf.quantize(model, nncf.Dataset(rows), subset_size=len(rows), preset=nncf.QuantizationPreset.MIXED,
                      model_type=nncf.ModelType.TRANSFORMER,
                      advanced_parameters=nncf.AdvancedQuantizationParameters(disable_bias_correction=True))
    size = _save_ov(q, work / "nncf")
    return {"seconds": time.perf_counter() - t0, "bytes": size, "rows": len(rows), "peak_gb": peak_gb()}


def phase_hybrid(args) -> dict:
    """optimum-intel's hybrid int8 recipe for diffusion models (``_hybrid_quantization``), done with
    NNCF directly: int8 weight-only compression of every layer but Convolutions, then full int8
    quantization of the rest (Convolutions and the activation MatMuls) with those weighted MatMuls
    ignored and SmoothQuant off; calibrated on the guided rows."""
    import openvino as ov

    from dmcompile import api

    work = Path(args.work)
    t0 = time.perf_counter()
    rows = _rows(work)
    q = hybrid_int8(ov.Core().read_model(str(api.fp_bundle(MODEL) / "model.onnx")), rows)
    size = _save_ov(q, work / "hybrid")
    return {"seconds": time.perf_counter() - t0, "bytes": size, "rows": len(rows), "peak_gb": peak_gb()}


def hybrid_int8(model, rows: list[dict]):
    """optimum-intel's ``_hybrid_quantization`` for diffusion models, with NNCF directly."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters

    weighted = _ops_with_weights(model)
    model = nncf.compress_weights(model, ignored_scope=nncf.IgnoredScope(types=["Convolution"]))
    return nncf.quantize(model, nncf.Dataset(rows), subset_size=len(rows), model_type=nncf.ModelType.TRANSFORMER,
                         ignored_scope=nncf.IgnoredScope(names=weighted),
                         advanced_parameters=nncf.AdvancedQuantizationParameters(
                             smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)))


def ddim_timesteps(fp_bundle: Path, steps: int) -> list[int]:
    """The timesteps of a ``steps``-step DDIM run on the export's own schedule."""
    from dmruntime import ddim_timesteps as ts
    from dmruntime.schedule import NoiseSchedule

    schedule = NoiseSchedule.from_config(json.loads((fp_bundle / "manifest.json").read_text())["scheduler"])
    return [int(t) for t in ts(schedule, steps)]


def phase_peers(args) -> dict:
    """Per guided call and per --run-steps DDIM run (model calls only; dmcompile's bundles pick
    their group per step), interleaved in one process: ORT fp32, OpenVINO fp32 default hint
    (bf16 here), ORT quantize_static, NNCF int8, optimum-intel's hybrid int8, dmcompile ort-cpu
    and openvino-cpu; whichever of them --work holds."""
    import openvino as ov
    from dmruntime import Bundle

    from dmcompile import api

    work = Path(args.work)
    fp = api.fp_bundle(MODEL) / "model.onnx"
    core = ov.Core()
    core.set_property("CPU", {"INFERENCE_NUM_THREADS": args.threads})
    feeds = _guided_feeds()
    cond = {"encoder_hidden_states": feeds["encoder_hidden_states"]}

    def raw(call):
        return lambda t: call({**feeds, "timestep": np.full(2, t, np.int64)})

    def ort_model(path):
        s = ort_session(path, args.threads)
        return raw(lambda f: s.run(None, f))

    def ov_model(path):
        c = core.compile_model(str(path), "CPU")
        return raw(lambda f: c(f))

    def bundle(path, config=None):
        b = Bundle.open(path, threads=args.threads, openvino_config=config)
        return lambda t: b.predict(feeds["sample"], t, cond)

    def bundle_bf16(path):  # what --float-precision bf16 writes into the manifest
        return bundle(path, {"INFERENCE_PRECISION_HINT": "bf16"})

    candidates = {"ORT fp32": (ort_model, fp), "OpenVINO fp32 (default hint)": (ov_model, fp),
                  "ORT quantize_static": (ort_model, work / "ort_qs" / "model.onnx"),
                  "NNCF int8": (ov_model, work / "nncf" / "model.xml"),
                  "optimum-intel hybrid int8 (NNCF)": (ov_model, work / "hybrid" / "model.xml")}
    candidates |= {f"dmcompile {name}": (bundle, work / name) for name in args.bundles}
    candidates |= {f"dmcompile {name} --float-precision bf16": (bundle_bf16, work / name) for name in args.bf16_bundles}
    variants, load = {}, {}
    for name, (make, path) in candidates.items():
        if name in args.skip or not Path(path).exists():
            continue
        t0 = time.perf_counter()
        variants[name] = make(path)
        variants[name](500)  # compiles, allocates
        load[name] = time.perf_counter() - t0
        print(f"{name}: loaded and first call {load[name]:.1f} s, peak {peak_gb():.1f} GB", file=sys.stderr, flush=True)
    out = {"per_call": _interleaved(variants, args.repeats), "first_call_s": load}
    ts = ddim_timesteps(fp.parent, args.run_steps)
    runs = {v: (lambda fn=fn: [fn(t) for t in ts]) for v, fn in variants.items()}
    if args.run_repeats:
        out["per_run"] = _interleaved({v: (lambda _t, r=r: r()) for v, r in runs.items()}, args.run_repeats,
                                      warm=False)
    return out | {"run_steps": args.run_steps, "peak_gb": peak_gb()}


PHASES = {"export": phase_export, "build": phase_build, "qs": phase_qs, "latency": phase_latency,
          "build-ov": phase_build_ov, "latency-ov": phase_latency_ov, "build-trt": phase_build_trt,
          "check-trt": phase_check_trt, "rows": phase_rows, "nncf": phase_nncf, "hybrid": phase_hybrid,
          "peers": phase_peers, "build-ov-shared": phase_build_ov_shared,
          "build-before": phase_build_before}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=["all", *PHASES], default="all")
    p.add_argument("--work", default="/tmp/dmcompile-sd15")
    p.add_argument("--calib-size", type=int, default=2, help="guided trajectories (2 rows per call)")
    p.add_argument("--calib-steps", type=int, default=10, help="DDIM steps per trajectory (one per group at K=10)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-engines", type=int, default=2, help="build-ov: engines of the openvino-cpu bundle")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bundles", nargs="*", default=["bundle", "bundle-openvino"],
                   help="peers: dmcompile bundles under --work to time")
    p.add_argument("--bf16-bundles", nargs="*", default=[],
                   help="peers: openvino-cpu bundles under --work to time with bf16 float layers too")
    p.add_argument("--skip", nargs="*", default=[], help="peers: variants to leave out (memory; ratios are to "
                   "ORT fp32, else to the first variant left)")
    p.add_argument("--run-steps", type=int, default=10, help="peers: DDIM steps of the timed sampling run")
    p.add_argument("--run-repeats", type=int, default=1, help="peers: interleaved sampling runs (0: none)")
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
