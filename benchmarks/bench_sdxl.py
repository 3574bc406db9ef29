"""SDXL's UNet on this machine: preset ``sdxl-unet`` (SDXL 1.0 base's config, seeded random weights)
or ``sdxl-unet-half`` (the same blocks at half width): does it export and build in 24 GB, and
what a guided step costs against ONNX Runtime fp32 and OpenVINO's default.

    python benchmarks/bench_sdxl.py --model sdxl-unet --phase preset
    python benchmarks/bench_sdxl.py --model sdxl-unet --phase export --max-gb 21
    python benchmarks/bench_sdxl.py --model sdxl-unet-half            # every phase, in order

Phases (each in a fresh process, watched: stopped when its resident memory passes --max-gb, and
then its peak, time and last lines reported instead of letting the machine swap):
  preset    build the preset: parameters, fp32 bytes, peak; PyTorch's guided step (batch 2)
  export    the fp32 ONNX export (weights as external data) and its parity check
  build     ort-cpu W8A8 K = 10, calibrated on --calib-size guided trajectories of random text
            embeddings and pooled vectors (time_ids: the preset's resolution), round to nearest;
            --float-attention keeps attention's activation MatMuls float
  build-ov  openvino-cpu W8A8 K = 10, one engine fed per-group scalars (--shared-engine)
  latency   one guided step (batch 2) at the preset's latent size, interleaved, medians: ORT fp32,
            OpenVINO's default (bf16 where the CPU has it), the bundles (--bf16: openvino-cpu ones
            with bf16 float layers too)
Outputs go to --work (default /tmp/dmcompile-sdxl); the fp32 export is cached as usual.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ort_session
from benchmarks.machine import cpu_line

GUIDANCE = 5.0  # SDXL's default guidance scale
L, D, P = 77, 2048, 1280  # text tokens, both encoders' width, the pooled projection


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _latent(model: str) -> int:
    from dmcompile import zoo

    return int(zoo.PRESETS[model][0]["sample_size"])


def conditions_file(work: Path, n: int) -> Path:
    """Random stand-ins for the two CLIP encoders' outputs (n rows) and the zero null condition SDXL's
    pipeline uses (force_zeros_for_empty_prompt)."""
    path = work / "conditions.npz"
    rng = np.random.default_rng(0)
    np.savez(path, encoder_hidden_states=rng.standard_normal((n, L, D), dtype=np.float32),
             text_embeds=rng.standard_normal((n, P), dtype=np.float32),
             null_encoder_hidden_states=np.zeros((L, D), np.float32), null_text_embeds=np.zeros(P, np.float32))
    return path


def _guided_feeds(hw: int, t: int = 500) -> dict:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 4, hw, hw), dtype=np.float32)
    size = float(hw * 8)
    return {"sample": np.concatenate([x, x]), "timestep": np.full(2, t, np.int64),
            "encoder_hidden_states": np.concatenate([np.zeros((1, L, D), np.float32),
                                                     rng.standard_normal((1, L, D), dtype=np.float32)]),
            "text_embeds": np.concatenate([np.zeros((1, P), np.float32), rng.standard_normal((1, P), dtype=np.float32)]),
            "time_ids": np.tile(np.array([[size, size, 0, 0, size, size]], np.float32), (2, 1))}


def phase_preset(args) -> dict:
    import torch

    from dmcompile import api

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = api.load_model(args.model)
    load_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.unet.parameters())
    out = {"params": params, "fp32_bytes": 4 * params, "load_seconds": load_s, "peak_gb_after_load": peak_gb()}
    feeds = {k: torch.from_numpy(v) for k, v in _guided_feeds(_latent(args.model)).items()}
    kw = model.family.call_kwargs({k: v for k, v in feeds.items() if k not in ("sample", "timestep")})
    with torch.no_grad():
        t0 = time.perf_counter()
        model.unet(feeds["sample"], feeds["timestep"], return_dict=False, **kw)
        out["torch_guided_step_s"] = time.perf_counter() - t0
    return out | {"peak_gb": peak_gb()}


def phase_export(args) -> dict:
    from dmcompile import api

    t0 = time.perf_counter()
    model = api.load_model(args.model)
    print(f"STAGE loaded after {time.perf_counter() - t0:.0f} s, peak {peak_gb():.1f} GB; tracing", flush=True)
    fp = api.fp_bundle(model)
    m = json.loads((fp / "manifest.json").read_text())
    return {"export_seconds": m["export"]["seconds"], "parity_max_abs_err": m["export"]["parity_max_abs_err"],
            "export_bytes": sum(f.stat().st_size for f in fp.iterdir() if f.is_file()),
            "total_macs_per_sample": m["export"]["total_macs_per_sample"], "fp": str(fp), "peak_gb": peak_gb(),
            "wall_seconds": time.perf_counter() - t0}


def _build(args, folder: str, **options) -> dict:
    from dmcompile import api
    from dmcompile.cli import _progress_bar

    work = Path(args.work)
    cal = api.CalibrationConfig(size=args.calib_size, steps=args.calib_steps, groups=10, batch_size=1,
                                guidance_scale=GUIDANCE, conditions=str(conditions_file(work, args.calib_size)))
    t0 = time.perf_counter()
    res = api.build(args.model, work / folder, api.BuildConfig(
        calibration=cal, eval_samples=0, correction=False, analysis=api.AnalysisConfig(rounding="rtn"), **options),
        progress=_progress_bar("build"))
    fusion = res.manifest["build"]["fusion"]
    return {"build_seconds": res.manifest["build"]["seconds"], "wall_seconds": time.perf_counter() - t0,
            "bundle_bytes": sum(f.stat().st_size for f in (work / folder).iterdir() if f.is_file()),
            "integer_ratio": fusion.get("ratio"), "peak_gb": peak_gb()}


def phase_build(args) -> dict:
    if not args.float_attention:
        return _build(args, "bundle")
    from dmcompile.config import W8A8Recipe, parse_overrides

    return _build(args, "bundle", recipe=W8A8Recipe(overrides=parse_overrides("attention_matmuls", "float")))


def phase_build_ov(args) -> dict:
    return _build(args, "bundle-openvino-shared", profile="openvino-cpu", shared_engine=True)


def phase_latency(args) -> dict:
    import openvino as ov
    from dmruntime import Bundle

    from dmcompile import api

    work = Path(args.work)
    fp = api.fp_bundle(args.model) / "model.onnx"
    feeds = _guided_feeds(_latent(args.model))
    cond = {k: v for k, v in feeds.items() if k not in ("sample", "timestep")}
    core = ov.Core()
    core.set_property("CPU", {"INFERENCE_NUM_THREADS": args.threads})
    variants = {"ORT fp32": (lambda s: lambda t: s.run(None, {**feeds, "timestep": np.full(2, t, np.int64)}))(
        ort_session(fp, args.threads))}
    compiled = core.compile_model(str(fp), "CPU")
    variants["OpenVINO default"] = lambda t: compiled({**feeds, "timestep": np.full(2, t, np.int64)})
    for name in args.bundles:
        if (work / name / "manifest.json").is_file():
            b = Bundle.open(work / name, threads=args.threads)
            variants[f"dmcompile {name}"] = (lambda b: lambda t: b.predict(feeds["sample"], t, cond))(b)
            if args.bf16 and b.runtime == "openvino":  # what --float-precision bf16 writes into the manifest
                b = Bundle.open(work / name, threads=args.threads, openvino_config={"INFERENCE_PRECISION_HINT": "bf16"})
                variants[f"dmcompile {name} --float-precision bf16"] = (
                    lambda b: lambda t: b.predict(feeds["sample"], t, cond))(b)
    times = {v: [] for v in variants}
    for v, f in variants.items():  # warm-up (compiles)
        f(999)
    for r in range(args.repeats):
        for v, f in variants.items():
            t0 = time.perf_counter()
            f([999, 700, 500, 300, 100][r % 5])
            times[v].append(time.perf_counter() - t0)
    base = statistics.median(times["ORT fp32"])
    return {v: {"median_s": statistics.median(x), "vs ORT fp32": statistics.median(x) / base} for v, x in times.items()} \
        | {"peak_gb": peak_gb()}


PHASES = {"preset": phase_preset, "export": phase_export, "build": phase_build, "build-ov": phase_build_ov,
          "latency": phase_latency}


def watched(cmd: list[str], max_gb: float) -> tuple[int, float, float, str, bool, list]:
    """Run ``cmd``, polling its resident memory (with its children); stop it past ``max_gb``.
    Returns (exit code, peak GB, seconds, its output, stopped, [(seconds, GB) every 10 s])."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    peak, stopped, ps, timeline = 0.0, False, psutil.Process(proc.pid), []
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]) / 2**30
        except psutil.Error:
            rss = 0.0
        peak = max(peak, rss)
        if not timeline or time.perf_counter() - t0 >= timeline[-1][0] + 10:
            timeline.append((round(time.perf_counter() - t0), round(rss, 1)))
        if rss > max_gb:
            stopped = True
            proc.kill()
            break
        time.sleep(0.5)
    proc.wait()
    reader.join(timeout=5)
    return proc.returncode, peak, time.perf_counter() - t0, "".join(lines), stopped, timeline


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("sdxl-unet", "sdxl-unet-half"), default="sdxl-unet-half")
    p.add_argument("--phase", choices=["all", *PHASES], default="all")
    p.add_argument("--work", default="/tmp/dmcompile-sdxl")
    p.add_argument("--calib-size", type=int, default=2, help="guided trajectories (2 rows per call)")
    p.add_argument("--calib-steps", type=int, default=10, help="DDIM steps per trajectory (one per group at K=10)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-gb", type=float, default=21.0, help="stop a phase past this resident memory (GB)")
    p.add_argument("--bundles", nargs="*", default=["bundle", "bundle-openvino-shared"],
                   help="latency: dmcompile bundles under --work to time")
    p.add_argument("--bf16", action="store_true",
                   help="latency: also time openvino-cpu bundles with their float layers in bf16")
    p.add_argument("--float-attention", action="store_true",
                   help="build: keep attention's activation MatMuls float (--float-layer attention_matmuls)")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)  # the watched process itself
    args = p.parse_args(argv)
    work = Path(args.work) / args.model
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)
    if args.inner:
        out = PHASES[args.phase](args)
        print("RESULT " + json.dumps(out, default=str), flush=True)
        return 0
    print(cpu_line(), flush=True)
    options = ["--model", args.model, "--work", str(Path(args.work).parent), "--calib-size", str(args.calib_size),
               "--calib-steps", str(args.calib_steps), "--repeats", str(args.repeats), "--threads", str(args.threads),
               *(["--float-attention"] if args.float_attention else []), *(["--bf16"] if args.bf16 else []),
               "--bundles", *args.bundles]
    for phase in (PHASES if args.phase == "all" else [args.phase]):
        rc, peak, seconds, output, stopped, timeline = watched(
            [sys.executable, __file__, "--inner", "--phase", phase, *options], args.max_gb)
        result = [x for x in output.splitlines() if x.startswith("RESULT ")]
        if rc or not result:
            why = f"stopped past {args.max_gb} GB resident" if stopped else f"exit {rc}"
            tail = " | ".join(x.strip()[-160:] for x in output.strip().splitlines()[-4:])
            print(f"{phase}: FAILED ({why}) after {seconds:.0f} s, peak {peak:.1f} GB; last output: {tail}", flush=True)
            print("  resident GB over time (s, GB): " + " ".join(f"{t}:{g}" for t, g in timeline), flush=True)
            return 1
        print(f"{phase}: {result[-1][7:]} (watched peak {peak:.1f} GB, {seconds:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
