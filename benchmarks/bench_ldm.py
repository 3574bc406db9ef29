"""digits-ldm (conditional latent model): W8A8 bundles K = 1 and K = 10 and a mixed-precision
K = 10 plan (RD allocation under a bit budget) against full precision, with and without
classifier-free guidance.

    python benchmarks/bench_ldm.py -n 500 --guidance 2.0 --grid docs/digits_ldm_classes.png
    python benchmarks/bench_ldm.py -n 500 --variants mixed --budget 5bits
    python benchmarks/bench_ldm.py -n 500 --variants k10 k10-dec8     # the W8A8 decoder: fidelity and time
    python benchmarks/bench_ldm.py -n 500 --variants --floor-sets 5    # spread of the FP noise floor

Each bundle is calibrated on the guided sampler (both branches recorded) and evaluated with
`dmcompile eval`'s metrics on decoded images: paired PSNR / SSIM against the PyTorch pipeline
(same seeds, same classes), FD to real digits, FD to a second FP set against the FP noise floor,
and class accuracy (the digit classifier agrees with the requested class). Classes cycle 0-9.
Prints a markdown table; --grid writes one row per class (8 samples each) from the K = 10 bundle.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def time_decoders(fp_bundle: Path, q_bundle: Path, batch: int = 64, repeats: int = 20) -> None:
    """Decoder latency fp32 vs W8A8 (batch of latents), interleaved, medians; and the manifest's
    PSNR of the W8A8 decoder against fp32."""
    import json
    import statistics
    import time

    from dmruntime import Bundle

    from benchmarks.machine import cpu_line

    decs = {"fp32": Bundle.open(fp_bundle, threads=2), "w8a8": Bundle.open(q_bundle, threads=2)}
    z = np.random.default_rng(0).standard_normal((batch, *decs["fp32"].sample_shape)).astype(np.float32)
    times = {k: [] for k in decs}
    for r in range(repeats + 1):
        for k, b in decs.items():
            t0 = time.perf_counter()
            b.decode(z)
            if r:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rec = json.loads((q_bundle / "manifest.json").read_text())["decoder"]["w8a8"]
    print(cpu_line(), file=sys.stderr)
    print(f"decoder, batch {batch}, {repeats} interleaved rounds: fp32 {med['fp32'] * 1e3:.2f} ms, w8a8 "
          f"{med['w8a8'] * 1e3:.2f} ms, w8a8 / fp32 = {med['w8a8'] / med['fp32']:.2f}; manifest: PSNR vs fp32 "
          f"{rec['psnr_db_vs_fp32']:.2f} dB on held-out latents, integer share {rec['fusion']['ratio']:.0%}",
          file=sys.stderr)


def floor_spread(n: int, sets: int, steps: int, guidance: float | None) -> list[float]:
    """FD to the FP reference set (the seeds `eval` uses for its floor) of ``sets`` FP sets of
    seeds 0, 1, ... (the fp32 export sampled; seed 0 is `eval`'s own floor): how much the
    FP-vs-FP floor itself moves at this sample count."""
    from dmruntime import Bundle

    from dmcompile import api
    from dmcompile.config import EvalConfig, SampleConfig
    from dmcompile.api import digit_scores
    from dmcompile.eval.metrics import frechet_distance

    fp = Bundle.open(api.fp_bundle("digits-ldm"))
    labels = {"class_labels": np.arange(n) % 10}
    ref_seed = EvalConfig().floor_seed_offset

    def features(seed: int):
        z = api.sample_model(fp, SampleConfig(n=n, steps=steps, guidance_scale=guidance, seed=seed), cond=labels)
        return digit_scores(fp.decode(z), 0.9)["features"]

    ref = features(ref_seed)
    return [frechet_distance(features(k), ref) for k in range(sets)]  # seed 0: eval's own floor


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=500, help="samples per evaluation")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--calib-size", type=int, default=64)
    p.add_argument("--grid", type=Path, default=None, help="PNG: one row per class from the K = 10 bundle")
    p.add_argument("--variants", nargs="*", default=["k1", "k10", "mixed"], choices=["k1", "k10", "mixed", "k10-dec8"])
    p.add_argument("--floor-sets", type=int, default=0,
                   help="FD of this many independent FP sets to the FP reference set (the floor's spread)")
    p.add_argument("--budget", default="5bits", help="budget of the mixed plan (RD curves on guided trajectories)")
    args = p.parse_args(argv)

    from dmcompile import api
    from dmcompile.config import (
        BuildConfig,
        CalibrationConfig,
        EvalConfig,
        MixedRecipe,
        SampleConfig,
    )
    from dmcompile.eval.grid import save_grid

    labels = {"class_labels": np.arange(args.n) % 10}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bundles = {}
        for v in args.variants:
            k = 1 if v == "k1" else 10
            cal = CalibrationConfig(size=args.calib_size, groups=k, guidance_scale=args.guidance)
            cfg = BuildConfig(calibration=cal, decoder="w8a8" if v == "k10-dec8" else "fp32")
            name = f"W8A8 K={k}" + (" + W8A8 decoder" if v == "k10-dec8" else "")
            if v == "mixed":
                cfg = BuildConfig(calibration=cal, recipe=MixedRecipe(budget=args.budget))
            res = api.build("digits-ldm", Path(tmp) / v, cfg, progress=None)
            if v == "mixed":
                avg = res.manifest["plan"]["average_weight_bits"]
                name = f"mixed {args.budget} K={k} (avg {min(avg):.2f}-{max(avg):.2f} bits)"
            bundles[name] = res.path
            print(f"built {name} in {res.manifest['build']['seconds']} s", file=sys.stderr, flush=True)
        for name, path in bundles.items():
            for guidance in (args.guidance, None):
                cfg = EvalConfig(sample=SampleConfig(n=args.n, steps=args.steps, guidance_scale=guidance))
                r = api.evaluate(path, cfg, cond=labels).report
                d, pv = r["digits"], r["paired_vs_fp"]
                rows.append((name, "none" if guidance is None else f"{guidance:g}", pv["psnr_db_mean"],
                             pv["ssim_mean"], d["fd_to_real"], d["fp_fd_to_real"], d["fd_to_fp"], d["noise_floor_fd"],
                             d["class_accuracy"], d["fp_class_accuracy"], d["confident_rate"]))
                print(rows[-1], file=sys.stderr, flush=True)
        for guidance in (args.guidance, None) if args.floor_sets else ():
            fds = floor_spread(args.n, args.floor_sets, args.steps, guidance)
            print(f"FP noise floor spread, guidance {guidance}: FD of {args.floor_sets} FP sets (seeds 0..) to the FP "
                  f"reference set: {', '.join(f'{v:.3f}' for v in fds)}; min {min(fds):.3f}, max {max(fds):.3f}",
                  file=sys.stderr, flush=True)
        if "W8A8 K=10 + W8A8 decoder" in bundles and "W8A8 K=10" in bundles:
            time_decoders(bundles["W8A8 K=10"], bundles["W8A8 K=10 + W8A8 decoder"])
        if args.grid and "W8A8 K=10" in bundles:
            order = {"class_labels": np.repeat(np.arange(10), 8)}
            images = api.sample(bundles["W8A8 K=10"], SampleConfig(n=80, steps=args.steps, guidance_scale=args.guidance),
                                cond=order)
            save_grid(images, args.grid, cols=8)
            print(f"wrote {args.grid}", file=sys.stderr)
    print(f"digits-ldm, {args.n} samples per row (classes 0-9 in turn), DDIM {args.steps}, eta 0, seed 0; "
          f"calibration {args.calib_size} guided trajectories (scale {args.guidance:g})\n")
    print("| bundle | guidance | PSNR vs FP (dB) | SSIM vs FP | FD to real | FP FD to real | FD to FP (other seeds) "
          "| FP noise floor | class accuracy | FP class accuracy | confident rate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.4f} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.3f} | {r[7]:.3f} | "
              f"{r[8]:.1%} | {r[9]:.1%} | {r[10]:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
