"""digits-t2i (text to image): prompt accuracy and fidelity of W8A8 K = 1 and K = 10, a mixed
~5-bit plan and the int8 text encoder, against full precision, on dmcompile's digit evaluation
prompts (120 prompts, 80 in phrasings not used in training, cycled over the samples).

    python benchmarks/bench_t2i.py -n 480 --guidance 3 --grid docs/digits_t2i_prompts.png
    python benchmarks/bench_t2i.py --scan 1 2 3 5 -n 240     # FP prompt accuracy per guidance scale
    python benchmarks/bench_t2i.py --floor-sets 5 -n 480 --guidance 2   # how far the FP noise floor moves

Each bundle is calibrated on the guided sampler over the pipeline's calibration prompts (its
training phrasings) and evaluated with `dmcompile eval`'s metrics on decoded images: paired PSNR /
SSIM against the PyTorch pipeline (same seeds and prompts; the bundle's prompts through its own text
encoders, the reference's through the fp32 ones), FD to real digits, FD to a second FP set against
the FP noise floor, and prompt accuracy (the digit classifier agrees with the prompt's digit).
Prints a markdown table; --grid writes one row per prompt (8 samples each) from the K = 10 bundle.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "digits-t2i"
GRID_PROMPTS = ("the number 0", "a handwritten one", "two, written thin", "3", "a sketch of the digit four",
                "please draw a five", "the figure 6 in pencil", "digit: seven", "an ink eight", "write the number nine")


def scan(n: int, steps: int, scales: list[float]) -> None:
    """FP prompt accuracy of the fp32 export per guidance scale."""
    from dmcompile import api
    from dmcompile.api import eval_prompts
    from dmruntime import Bundle, Text2Image

    pipe_bundle = Bundle.open(api.fp_bundle(MODEL))
    prompts, labels = eval_prompts(None, n, digits=True)
    held = np.array([p in api.HELD_OUT for p in prompts])
    for s in scales:
        images = Text2Image(pipe_bundle, steps=steps, guidance_scale=s).generate(prompts, seed=0)
        acc = api.class_accuracy(images, labels)
        print(f"guidance {s:g}: FP prompt accuracy {acc:.1%} (held-out phrasings "
              f"{api.class_accuracy(images[held], labels[held]):.1%}), FD to real "
              f"{api.digit_scores(images)['fd_to_real']:.3f}", flush=True)


def floor_spread(n: int, steps: int, guidance: float, sets: int) -> None:
    """FD of ``sets`` FP sets (seeds 0..sets-1) to the FP set eval compares bundles with (seed
    floor_seed_offset): how far the noise floor itself moves (seed 0's is eval's floor)."""
    from dmcompile import api
    from dmcompile.api import eval_prompts
    from dmcompile.config import EvalConfig
    from dmcompile.eval.metrics import frechet_distance
    from dmruntime import Bundle, Text2Image

    pipe = Text2Image(Bundle.open(api.fp_bundle(MODEL)), steps=steps, guidance_scale=guidance)
    prompts, _ = eval_prompts(None, n, digits=True)
    ref = api.digit_scores(pipe.generate(prompts, seed=EvalConfig().floor_seed_offset))["features"]
    fds = [frechet_distance(api.digit_scores(pipe.generate(prompts, seed=s))["features"], ref) for s in range(sets)]
    print(f"FP noise floor spread, guidance {guidance:g}: FD of {sets} FP sets (seeds 0..) to the FP reference set: "
          f"{', '.join(f'{v:.3f}' for v in fds)}; min {min(fds):.3f}, max {max(fds):.3f}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=480, help="samples per evaluation (the 120 prompts cycled)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--calib-size", type=int, default=64)
    p.add_argument("--budget", default="5bits")
    p.add_argument("--grid", type=Path, default=None)
    p.add_argument("--scan", type=float, nargs="*", default=None, help="only: FP prompt accuracy per guidance scale")
    p.add_argument("--floor-sets", type=int, default=0, help="only: FD of this many FP sets to the FP reference set")
    p.add_argument("--variants", nargs="*", default=["k1", "k10", "mixed", "k10-text8"],
                   choices=["k1", "k10", "mixed", "k10-text8"])
    args = p.parse_args(argv)

    from benchmarks.machine import cpu_line
    from dmcompile import api
    from dmcompile.config import BuildConfig, CalibrationConfig, EvalConfig, MixedRecipe, SampleConfig
    from dmcompile.eval.grid import save_grid
    from dmruntime import Bundle, Text2Image

    print(cpu_line(), file=sys.stderr, flush=True)
    if args.scan is not None:
        scan(args.n, args.steps, args.scan)
        return 0
    if args.floor_sets:
        floor_spread(args.n, args.steps, args.guidance, args.floor_sets)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bundles = {}
        for v in args.variants:
            k = 1 if v == "k1" else 10
            cal = CalibrationConfig(size=args.calib_size, groups=k, guidance_scale=args.guidance)
            cfg = BuildConfig(calibration=cal, text_encoder="int8" if v == "k10-text8" else "fp32")
            name = f"W8A8 K={k}" + (" + int8 text encoder" if v == "k10-text8" else "")
            if v == "mixed":
                cfg = BuildConfig(calibration=cal, recipe=MixedRecipe(budget=args.budget))
            res = api.build(MODEL, Path(tmp) / v, cfg, progress=None)
            if v == "mixed":
                avg = res.manifest["plan"]["average_weight_bits"]
                name = f"mixed {args.budget} K={k} (avg {min(avg):.2f}-{max(avg):.2f} bits)"
            if v == "k10-text8":
                q = res.manifest["text"]["int8"]
                print(f"int8 text encoder: condition error vs fp32 {q['rel_l2_err_vs_fp32']:.2%} relative L2 "
                      f"(max {q['max_abs_err_vs_fp32']:.3g}) over {q['prompts']} calibration prompts", file=sys.stderr)
            bundles[name] = res.path
            print(f"built {name} in {res.manifest['build']['seconds']} s", file=sys.stderr, flush=True)
        for name, path in bundles.items():
            r = api.evaluate(path, EvalConfig(sample=SampleConfig(n=args.n, steps=args.steps,
                                                                  guidance_scale=args.guidance)), progress=None).report
            d, pv, pa = r["digits"], r["paired_vs_fp"], r["prompt_accuracy"]
            rows.append((name, pv["psnr_db_mean"], pv["ssim_mean"], d["fd_to_real"], d["fp_fd_to_real"], d["fd_to_fp"],
                         d["noise_floor_fd"], pa["accuracy"], pa["fp_accuracy"], pa["held_out_phrasings"],
                         pa["fp_held_out_phrasings"]))
            print(rows[-1], file=sys.stderr, flush=True)
        if args.grid and "W8A8 K=10" in bundles:
            images = Text2Image(Bundle.open(bundles["W8A8 K=10"]), steps=args.steps,
                                guidance_scale=args.guidance).generate(list(GRID_PROMPTS), n=8, seed=0)
            save_grid(images, args.grid, cols=8)
            print(f"wrote {args.grid}", file=sys.stderr)
    print(f"digits-t2i, {args.n} samples per row (the 120 evaluation prompts cycled), PNDM {args.steps} steps, "
          f"guidance {args.guidance:g}, seed 0; calibration {args.calib_size} guided trajectories\n")
    print("| bundle | PSNR vs FP (dB) | SSIM vs FP | FD to real | FP FD to real | FD to FP (other seeds) | FP noise floor "
          "| prompt accuracy | FP prompt accuracy | held-out phrasings | FP held-out phrasings |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.4f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.3f} | {r[7]:.1%} "
              f"| {r[8]:.1%} | {r[9]:.1%} | {r[10]:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
