"""Stable Diffusion 1.5 at full size from a prompt (preset ``sd15``: SD-1.5's exact text encoder,
UNet and VAE configurations with seeded random weights, written once as a pipeline folder):
build time and peak memory, then one 512 x 512 image from a prompt (25 steps, guidance 7.5) on
the fp32 export and on each CPU target's bundle, with where the time goes (text encoder, UNet
loop, decoder).

    python benchmarks/bench_sd15_t2i.py                       # every phase, each in its own process
    python benchmarks/bench_sd15_t2i.py --phase generate-ort

Phases (each a fresh subprocess: its peak resident memory is its own):
  preset       write the sd15 pipeline folder (once, under $DMCOMPILE_CACHE/presets)
  export       load the folder (tokenizer converted from vocab.json + merges.txt), trace the UNet,
               text encoder and decoder to ONNX, parity checks
  build        ort-cpu W8A8, K = 10, calibrated on --calib-size guided trajectories (guidance 7.5)
               of dmcompile's default prompts; round-to-nearest weights (GPTQ's second moments
               would be 28 GB), no PTQD statistics, no fidelity run (hours of fp32 sampling here)
  build-ov     the same for openvino-cpu (--max-engines engines)
  generate-fp32, generate-ort, generate-ov
               one 512 x 512 image from PROMPT, 25 PNDM steps, guidance 7.5, seed 0, through
               dmruntime's Text2Image; seconds in the text encoder, the UNet loop and the decoder
Outputs go to --work (default /tmp/dmcompile-sd15-t2i); images as PNG there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_sd15 import peak_gb, run_phases
from benchmarks.machine import cpu_line

MODEL = "sd15"
PROMPT = "a photograph of an astronaut riding a horse on mars"
GUIDANCE, STEPS = 7.5, 25


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def phase_preset(args) -> dict:
    from dmcompile.frontend.load import build_pipeline_preset

    t0 = time.perf_counter()
    folder = build_pipeline_preset(MODEL)
    return {"folder": str(folder), "bytes": folder_bytes(folder), "seconds": time.perf_counter() - t0,
            "peak_gb": peak_gb()}


def phase_export(args) -> dict:
    from dmcompile import api

    t0 = time.perf_counter()
    model = api.load_model(MODEL)
    load_s = time.perf_counter() - t0
    params = {"unet": sum(p.numel() for p in model.unet.parameters()),
              "text_encoder": sum(p.numel() for p in model.text[0].encoder.parameters()),
              "vae": sum(p.numel() for p in model.vae.parameters())}
    fp = api.fp_bundle(model)
    m = json.loads((fp / "manifest.json").read_text())
    return {"params": params, "load_seconds": load_s, "unet_export_seconds": m["export"]["seconds"],
            "parity": {"unet": m["export"]["parity_max_abs_err"], "decoder": m["decoder"]["parity_max_abs_err"],
                       "text_encoder": m["text"]["encoders"][0]["parity_max_abs_err"]},
            "export_bytes": folder_bytes(fp), "fp": str(fp), "peak_gb": peak_gb(),
            "wall_seconds": time.perf_counter() - t0}


def _build(args, folder: str, **options) -> dict:
    from dmcompile import api
    from dmcompile.cli import _progress_bar

    cal = api.CalibrationConfig(size=args.calib_size, steps=args.calib_steps, groups=10, batch_size=1,
                                guidance_scale=GUIDANCE)
    t0 = time.perf_counter()
    res = api.build(MODEL, Path(args.work) / folder, api.BuildConfig(
        calibration=cal, eval_samples=0, correction=False, analysis=api.AnalysisConfig(rounding="rtn"), **options),
        progress=_progress_bar("build"))
    m = res.manifest
    return {"build_seconds": m["build"]["seconds"], "wall_seconds": time.perf_counter() - t0,
            "bundle_bytes": folder_bytes(res.path), "fusion_ratio": m["build"]["fusion"]["ratio"],
            "sampler": m["sampler"], "peak_gb": peak_gb()}


def phase_build(args) -> dict:
    return _build(args, "bundle-ort")


def phase_build_ov(args) -> dict:
    return _build(args, "bundle-ov", profile="openvino-cpu", max_engines=args.max_engines)


def _generate(args, path: Path, name: str) -> dict:
    """One image from PROMPT; seconds per part (text encoder, UNet loop with the sampler, decoder)."""
    import numpy as np
    from dmruntime import Bundle, Text2Image
    from dmruntime.cli import write_samples

    t0 = time.perf_counter()
    bundle = Bundle.open(path, cache_dir=Path(args.work) / "ov-cache")
    open_s = time.perf_counter() - t0
    pipe = Text2Image(bundle, "pndm", steps=STEPS, guidance_scale=GUIDANCE, batch_size=2)
    parts = {"text_encoder": 0.0, "decoder": 0.0}
    text, decode = pipe.text.encode, bundle.decode

    def timed(key, fn):
        def run(*a, **k):
            s = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                parts[key] += time.perf_counter() - s
        return run

    pipe.text.encode, bundle.decode = timed("text_encoder", text), timed("decoder", decode)
    t0 = time.perf_counter()
    image = pipe.generate(PROMPT, n=1, seed=0)
    total = time.perf_counter() - t0
    write_samples(Path(args.work) / f"{name}.png", image, cols=1, native=True)
    parts["unet_loop"] = total - parts["text_encoder"] - parts["decoder"]
    return {"image_shape": list(image.shape), "finite": bool(np.isfinite(image).all()), "open_seconds": open_s,
            "total_seconds": total, "parts_seconds": parts,
            "parts_share": {k: v / total for k, v in parts.items()}, "peak_gb": peak_gb()}


def phase_generate_fp32(args) -> dict:
    from dmcompile import api

    return _generate(args, api.fp_bundle(MODEL), "fp32")


def phase_generate_ort(args) -> dict:
    return _generate(args, Path(args.work) / "bundle-ort", "ort")


def phase_generate_ov(args) -> dict:
    return _generate(args, Path(args.work) / "bundle-ov", "ov")


PHASES = {"preset": phase_preset, "export": phase_export, "build": phase_build, "build-ov": phase_build_ov,
          "generate-fp32": phase_generate_fp32, "generate-ort": phase_generate_ort, "generate-ov": phase_generate_ov}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=["all", *PHASES], default="all")
    p.add_argument("--work", default="/tmp/dmcompile-sd15-t2i")
    p.add_argument("--calib-size", type=int, default=2, help="guided trajectories (2 rows per call)")
    p.add_argument("--calib-steps", type=int, default=10, help="PNDM steps per trajectory")
    p.add_argument("--max-engines", type=int, default=2, help="build-ov: engines of the openvino-cpu bundle")
    args = p.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.phase != "all":
        out = PHASES[args.phase](args)
        print("RESULT " + json.dumps(out, default=str), flush=True)
        return 0
    print(cpu_line(), flush=True)
    return run_phases(__file__, PHASES, ["--work", args.work, "--calib-size", str(args.calib_size),
                                         "--calib-steps", str(args.calib_steps), "--max-engines", str(args.max_engines)])


if __name__ == "__main__":
    raise SystemExit(main())
