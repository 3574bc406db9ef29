"""Samplers: each one's full precision against DDIM-50, and its W8A8 bundles (calibrated on that
sampler) against its own full precision; bundles calibrated on one sampler and sampled with
another; a whole sampling run per image, DPM-Solver++-20 against DDIM-50, on the same bundle.

    python benchmarks/bench_samplers.py --model digits16 -n 256
    python benchmarks/bench_samplers.py --model digits-ldm -n 256 --guidance 2 --variants k10
    python benchmarks/bench_samplers.py --model digits16 --samplers dpmpp-2m:20 --variants mixed

Every evaluation is `dmcompile eval`'s protocol (api.evaluate): paired PSNR against the PyTorch
model with the same sampler and seeds, FD to real digits, FD to a second FP set of other seeds
against the FP noise floor, class accuracy (digits-ldm: classes 0-9 in turn). Prints markdown
tables, the CPU line (benchmarks/machine.py) beside the timing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SAMPLERS = ["ddim:50", "dpmpp-2m:20", "euler:30", "pndm:50", "unipc:20"]


def split(spec: str) -> tuple[str, int]:
    name, steps = spec.split(":")
    return name, int(steps)


def fp_row(model: str, name: str, steps: int, n: int, guidance, labels):
    """FD to real digits and class accuracy (confident rate) of the fp32 export with one sampler."""
    from dmruntime import Bundle

    from dmcompile import api
    from dmcompile.config import SampleConfig

    fp = Bundle.open(api.fp_bundle(model))
    x = api.sample_model(fp, SampleConfig(n=n, sampler=name, steps=steps, guidance_scale=guidance), cond=labels)
    images = fp.decode(x) if fp.decoder is not None else x
    s = api.digit_scores(images)
    acc = api.class_accuracy(images, labels["class_labels"]) if labels else None
    return s["fd_to_real"], acc, s["confident_rate"]


def time_runs(bundle: Path, specs: list[str], batch: int, rounds: int, guidance) -> dict:
    """Median seconds of a whole run of each sampler over ``batch`` images, interleaved."""
    from dmruntime import Bundle, SamplingLoop

    b = Bundle.open(bundle)
    cond = {"class_labels": np.arange(batch) % 10} if b.conditioning else None
    loops = {s: SamplingLoop(b, split(s)[0], steps=split(s)[1], batch_size=batch, guidance_scale=guidance)
             for s in specs}
    times = {s: [] for s in specs}
    for r in range(rounds + 1):
        for s, loop in loops.items():
            t0 = time.perf_counter()
            x = loop.sample(batch, seed=r, cond=cond)
            if b.decoder is not None:
                b.decode(x)
            if r:  # the first round warms up
                times[s].append(time.perf_counter() - t0)
    return {s: statistics.median(v) for s, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits16", choices=["digits16", "digits-ldm"])
    p.add_argument("-n", type=int, default=256, help="samples per evaluation")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--samplers", nargs="+", default=SAMPLERS, metavar="NAME:STEPS")
    p.add_argument("--variants", nargs="*", default=["k10", "k1"], choices=["k10", "k1", "mixed"])
    p.add_argument("--budget", default="5bits")
    p.add_argument("--cross", nargs="*", default=["ddim:50", "dpmpp-2m:20"], metavar="NAME:STEPS",
                   help="two samplers: each one's K = 10 bundle sampled with the other")
    p.add_argument("--time-batch", type=int, default=16)
    p.add_argument("--time-rounds", type=int, default=5)
    args = p.parse_args(argv)

    from benchmarks.machine import cpu_line
    from dmcompile import api
    from dmcompile.config import BuildConfig, CalibrationConfig, EvalConfig, MixedRecipe, SampleConfig

    labels = {"class_labels": np.arange(args.n) % 10} if args.model == "digits-ldm" else None
    fp_rows, rows, cross = [], [], []
    for spec in args.samplers:
        name, steps = split(spec)
        fp_rows.append((spec, *fp_row(args.model, name, steps, args.n, args.guidance, labels)))
        print(fp_rows[-1], file=sys.stderr, flush=True)
    bundles = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.samplers:
            name, steps = split(spec)
            for v in args.variants:
                cal = CalibrationConfig(groups=1 if v == "k1" else 10, sampler=name, steps=steps,
                                        guidance_scale=args.guidance)
                recipe = MixedRecipe(budget=args.budget) if v == "mixed" else None
                cfg = BuildConfig(calibration=cal, **({"recipe": recipe} if recipe else {}), eval_samples=0)
                t0 = time.perf_counter()
                res = api.build(args.model, Path(tmp) / f"{name}-{v}", cfg, progress=None)
                bundles[spec, v] = res.path
                print(f"built {spec} {v} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
                r = api.evaluate(res.path, EvalConfig(sample=SampleConfig(n=args.n, guidance_scale=args.guidance)),
                                 cond=labels, progress=None).report
                d, pv = r["digits"], r["paired_vs_fp"]
                label = {"k10": "W8A8 K=10", "k1": "W8A8 K=1", "mixed": f"mixed {args.budget} K=10"}[v]
                rows.append((spec, label, pv["psnr_db_mean"], d["fd_to_fp"], d["noise_floor_fd"], d["fd_to_real"],
                             d.get("class_accuracy"), d.get("fp_class_accuracy"), d["confident_rate"]))
                print(rows[-1], file=sys.stderr, flush=True)
        if len(args.cross) == 2 and all((s, "k10") in bundles for s in args.cross):
            for cal_spec, run_spec in (args.cross, args.cross[::-1]):
                name, steps = split(run_spec)
                sc = SampleConfig(n=args.n, sampler=name, steps=steps, guidance_scale=args.guidance)
                r = api.evaluate(bundles[cal_spec, "k10"], EvalConfig(sample=sc), cond=labels, progress=None).report
                d = r["digits"]
                own = next(x for x in rows if x[0] == run_spec and x[1] == "W8A8 K=10")
                cross.append((cal_spec, run_spec, r["paired_vs_fp"]["psnr_db_mean"], own[2], d["fd_to_fp"],
                              d["noise_floor_fd"], d.get("class_accuracy")))
                print(cross[-1], file=sys.stderr, flush=True)
        key = ("ddim:50", "k10") if ("ddim:50", "k10") in bundles else next(iter(bundles), None)
        times = time_runs(bundles[key], ["ddim:50", "dpmpp-2m:20"], args.time_batch, args.time_rounds,
                          args.guidance) if key else {}

    g = f", guidance {args.guidance:g}" if args.guidance else ""
    print(f"{args.model}, {args.n} samples per evaluation, seed 0{g}; each bundle calibrated on its sampler "
          "(64 trajectories)\n")
    print("Full precision (the PyTorch model's fp32 export), each sampler:\n")
    print("| sampler:steps | FD to real | class accuracy | confident rate |\n|---|---|---|---|")
    for s, fd, acc, conf in fp_rows:
        print(f"| {s} | {fd:.3f} | {'-' if acc is None else f'{acc:.1%}'} | {conf:.1%} |")
    print("\nBundles against full precision of the same sampler (same seeds):\n")
    print("| sampler:steps | bundle | PSNR vs FP (dB) | FD to FP | FP noise floor | FD to real | class accuracy "
          "| FP class accuracy | confident rate |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = "-" if r[6] is None else f"{r[6]:.1%}"
        facc = "-" if r[7] is None else f"{r[7]:.1%}"
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.3f} | {acc} | {facc} | {r[8]:.1%} |")
    if cross:
        print("\nCalibrated on one sampler, sampled with another (W8A8 K=10):\n")
        print("| calibrated on | sampled with | PSNR vs FP (dB) | PSNR of the bundle calibrated on it | FD to FP "
              "| FP noise floor | class accuracy |\n|---|---|---|---|---|---|---|")
        for c in cross:
            acc = "-" if c[6] is None else f"{c[6]:.1%}"
            print(f"| {c[0]} | {c[1]} | {c[2]:.2f} | {c[3]:.2f} | {c[4]:.3f} | {c[5]:.3f} | {acc} |")
    if times:
        print(f"\nA whole run of {args.time_batch} images ({key[1]} bundle calibrated on {key[0]}), "
              f"{args.time_rounds} interleaved rounds, medians; {cpu_line()}:\n")
        print("| sampler:steps | seconds | vs ddim:50 |\n|---|---|---|")
        for s, t in times.items():
            print(f"| {s} | {t:.3f} | {times['ddim:50'] / t:.2f}x faster |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
