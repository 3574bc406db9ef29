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
  generate-fp32, generate-ort, generate-ov, generate-ov-shared
               one 512 x 512 image from PROMPT, 25 PNDM steps, guidance 7.5, seed 0, through
               dmruntime's Text2Image, after a 2-step warm-up image (one engine on ort-cpu and with
               --shared-engine: compiled by it); seconds
               in the text encoder, the UNet loop and the decoder
  build-ov-shared  the openvino-cpu bundle with one engine for all groups (--shared-engine)
  genai-folder the folder OpenVINO GenAI reads (optimum-intel's export layout) of the same graphs
  genai-hybrid its UNet in optimum-intel's hybrid int8 (NNCF), calibrated on guided UNet calls
  generate-genai, generate-genai-int8
               the same image with OpenVINO GenAI's Text2ImagePipeline (its defaults: bf16 here),
               after the same warm-up
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


def _generate(args, path: Path, name: str, openvino_config: dict | None = None) -> dict:
    """One image from PROMPT; seconds per part (text encoder, UNet loop with the sampler, decoder)."""
    import numpy as np
    from dmruntime import Bundle, Text2Image
    from dmruntime.cli import write_samples

    t0 = time.perf_counter()
    cache = Path(args.work) / f"ov-cache-{name}"  # one compile cache per variant
    bundle = Bundle.open(path, cache_dir=cache, openvino_config=openvino_config)
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

    t0 = time.perf_counter()
    Text2Image(bundle, "pndm", steps=2, guidance_scale=GUIDANCE, batch_size=2).generate(PROMPT, n=1, seed=1)
    warm_s = time.perf_counter() - t0  # the engines of the groups it visits compiled, as GenAI's warm-up
    pipe.text.encode, bundle.decode = timed("text_encoder", text), timed("decoder", decode)
    t0 = time.perf_counter()
    image = pipe.generate(PROMPT, n=1, seed=0)
    total = time.perf_counter() - t0
    write_samples(Path(args.work) / f"{name}.png", image, cols=1, native=True)
    parts["unet_loop"] = total - parts["text_encoder"] - parts["decoder"]
    return {"image_shape": list(image.shape), "finite": bool(np.isfinite(image).all()), "open_seconds": open_s,
            "warm_up_seconds": warm_s,
            "total_seconds": total, "parts_seconds": parts,
            "parts_share": {k: v / total for k, v in parts.items()}, "peak_gb": peak_gb()}


def phase_generate_fp32(args) -> dict:
    from dmcompile import api

    return _generate(args, api.fp_bundle(MODEL), "fp32")


def phase_generate_ort(args) -> dict:
    return _generate(args, Path(args.work) / "bundle-ort", "ort")


def phase_generate_ov(args) -> dict:
    return _generate(args, Path(args.work) / "bundle-ov", "ov")


def phase_build_ov_shared(args) -> dict:
    """The openvino-cpu bundle with all K = 10 groups in one engine (--shared-engine)."""
    return _build(args, "bundle-ov-shared", profile="openvino-cpu", shared_engine=True)


def phase_generate_ov_shared(args) -> dict:
    return _generate(args, Path(args.work) / "bundle-ov-shared", "ov-shared")


def phase_generate_ov_shared_bf16(args) -> dict:
    """The same bundle with its float layers in bf16 (what --float-precision bf16 records)."""
    return _generate(args, Path(args.work) / "bundle-ov-shared", "ov-shared-bf16",
                     {"INFERENCE_PRECISION_HINT": "bf16"})


GENAI_NAMES = {"text_encoder": "text_encoder", "unet": "unet", "vae": "vae_decoder"}


def phase_genai_folder(args) -> dict:
    """What ``optimum-cli export openvino`` writes for this folder, made without optimum-intel
    (not installable here without CUDA torch): OpenVINO IR of the same fp32 ONNX graphs the other
    phases run, under OpenVINO GenAI's names (vae_decoder: the latents GenAI has already divided
    by the scaling factor, so the graph's own division is undone in front of it), the diffusers
    configs, and the tokenizer converted by openvino-tokenizers."""
    import shutil

    import openvino as ov
    import openvino_tokenizers
    from transformers import CLIPTokenizer

    from dmcompile import api
    from dmcompile.frontend.load import build_pipeline_preset

    t0 = time.perf_counter()
    src, fp = build_pipeline_preset(MODEL), api.fp_bundle(MODEL)
    m = json.loads((fp / "manifest.json").read_text())
    out = Path(args.work) / "genai"
    tmp = out.with_name("genai.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copy2(src / "model_index.json", tmp.mkdir(parents=True) or tmp / "model_index.json")
    (tmp / "scheduler").mkdir()
    shutil.copy2(src / "scheduler" / "scheduler_config.json", tmp / "scheduler" / "scheduler_config.json")
    for part, name in GENAI_NAMES.items():
        (tmp / name).mkdir()
        shutil.copy2(src / part / "config.json", tmp / name / "config.json")
    ov.save_model(ov.convert_model(str(fp / "model.onnx")), str(tmp / "unet" / "openvino_model.xml"),
                  compress_to_fp16=False)  # GenAI feeds sample, timestep (int64) and encoder_hidden_states by name
    enc = m["text"]["encoders"][0]
    ov.save_model(ov.convert_model(str(fp / enc["file"])), str(tmp / "text_encoder" / "openvino_model.xml"),
                  compress_to_fp16=False)
    ppp = ov.preprocess.PrePostProcessor(ov.convert_model(str(fp / m["decoder"]["file"])))
    ppp.input().preprocess().scale(1.0 / m["decoder"]["scaling_factor"])  # GenAI divides by it, so does the graph
    dec = ppp.build()
    dec.inputs[0].get_tensor().set_names({"latent_sample"})
    ov.save_model(dec, str(tmp / "vae_decoder" / "openvino_model.xml"), compress_to_fp16=False)
    tok, detok = openvino_tokenizers.convert_tokenizer(CLIPTokenizer.from_pretrained(src / "tokenizer"),
                                                       with_detokenizer=True)
    (tmp / "tokenizer").mkdir()
    ov.save_model(tok, str(tmp / "tokenizer" / "openvino_tokenizer.xml"))
    ov.save_model(detok, str(tmp / "tokenizer" / "openvino_detokenizer.xml"))
    for f in (src / "tokenizer").iterdir():
        shutil.copy2(f, tmp / "tokenizer" / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"folder": str(out), "bytes": folder_bytes(out), "seconds": time.perf_counter() - t0, "peak_gb": peak_gb()}


def phase_genai_hybrid(args) -> dict:
    """optimum-intel's hybrid int8 of the GenAI folder's UNet (``bench_sd15.hybrid_int8``: int8
    weight-only MatMuls, int8 Convolutions and activation MatMuls), calibrated on the guided UNet
    calls of --calib-size of dmcompile's calibration prompts (--calib-steps PNDM steps, guidance
    7.5) through the fp32 export; written as a second GenAI folder sharing everything else."""
    import shutil

    import numpy as np
    import openvino as ov
    from dmruntime import Bundle, Text2Image
    from dmruntime.text import read_prompts

    from benchmarks.bench_sd15 import hybrid_int8
    from dmcompile import api, zoo

    t0 = time.perf_counter()
    work = Path(args.work)
    bundle = Bundle.open(api.fp_bundle(MODEL))
    rows, predict = [], bundle.predict

    def record(x, t, cond=None):
        rows.append({"sample": x.copy(), "timestep": np.array([t], np.int64),  # one timestep, as GenAI feeds it
                     "encoder_hidden_states": cond["encoder_hidden_states"].copy()})
        return predict(x, t, cond)

    bundle.predict = record
    prompts = read_prompts(zoo.DEFAULT_PROMPTS)[:args.calib_size]
    Text2Image(bundle, "pndm", steps=args.calib_steps, guidance_scale=GUIDANCE, batch_size=2).generate(
        prompts, seed=0, output="latents")
    del bundle
    src, out = work / "genai", work / "genai-int8"
    tmp = out.with_name("genai-int8.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("openvino_model.*"))
    for name in GENAI_NAMES.values():
        if name != "unet":
            for f in (src / name).glob("openvino_model.*"):
                shutil.copy2(f, tmp / name / f.name)
    model = hybrid_int8(ov.Core().read_model(str(src / "unet" / "openvino_model.xml")), rows)
    ov.save_model(model, str(tmp / "unet" / "openvino_model.xml"))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"rows": len(rows), "folder": str(out), "unet_bytes": folder_bytes(out / "unet"),
            "seconds": time.perf_counter() - t0, "peak_gb": peak_gb()}


def _generate_genai(args, folder: str) -> dict:
    """One image from PROMPT with OpenVINO GenAI's Text2ImagePipeline (its own tokenizer, PNDM,
    text encoder, UNet loop and decoder), 512 x 512, 25 steps, guidance 7.5; its default CPU
    settings (bf16 inference where the CPU has it)."""
    import numpy as np
    import openvino_genai

    from dmruntime.cli import write_samples

    t0 = time.perf_counter()
    pipe = openvino_genai.Text2ImagePipeline(str(Path(args.work) / folder), "CPU")
    open_s = time.perf_counter() - t0
    gen = dict(width=512, height=512, num_inference_steps=STEPS, guidance_scale=GUIDANCE, rng_seed=0)
    t0 = time.perf_counter()
    pipe.generate(PROMPT, **{**gen, "num_inference_steps": 2, "rng_seed": 1})  # compiles for this shape
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    image = np.asarray(pipe.generate(PROMPT, **gen).data)  # [1, H, W, 3] uint8
    total = time.perf_counter() - t0
    write_samples(Path(args.work) / f"{folder}.png", image.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1,
                  cols=1, native=True)
    return {"image_shape": list(image.shape), "open_seconds": open_s, "warm_up_seconds": first,
            "total_seconds": total, "peak_gb": peak_gb()}


def phase_generate_genai(args) -> dict:
    return _generate_genai(args, "genai")


def phase_generate_genai_int8(args) -> dict:
    return _generate_genai(args, "genai-int8")


PHASES = {"preset": phase_preset, "export": phase_export, "build": phase_build, "build-ov": phase_build_ov,
          "generate-fp32": phase_generate_fp32, "generate-ort": phase_generate_ort, "generate-ov": phase_generate_ov,
          "build-ov-shared": phase_build_ov_shared, "generate-ov-shared": phase_generate_ov_shared,
          "generate-ov-shared-bf16": phase_generate_ov_shared_bf16,
          "genai-folder": phase_genai_folder, "genai-hybrid": phase_genai_hybrid,
          "generate-genai": phase_generate_genai, "generate-genai-int8": phase_generate_genai_int8}


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
