"""Fidelity of W8A8 bundles against the full-precision model, per build variant.

    python benchmarks/bench_fidelity.py [--model digits16] [-n 256] [--variants k10-mse k1-mse ...]

Variant names: k<K>-<observer>[-ptq4dm], e.g. k10-mse, k1-minmax, k10-percentile-ptq4dm.
Each variant is built (calibration cached), then evaluated like ``dmcompile eval``: DDIM 50
steps, eta 0, the same seeds for bundle and full precision; paired PSNR / SSIM, FD to the
real digits, FD to a second FP set of other seeds, the FP noise floor, confident-class rate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_VARIANTS = ["k1-minmax", "k1-mse", "k10-minmax", "k10-percentile", "k10-mse", "k10-mse-ptq4dm"]


def parse_variant(v: str):
    parts = v.split("-")
    k = int(parts[0].lstrip("k"))
    return k, parts[1], "ptq4dm" if "ptq4dm" in parts[2:] else "trajectory"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits16")
    p.add_argument("-n", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--calib-size", type=int, default=64)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    args = p.parse_args(argv)

    from dmcompile import api

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.variants:
            k, observer, timesteps = parse_variant(v)
            cal = api.CalibrationConfig(size=args.calib_size, groups=k, observer=observer, timesteps=timesteps)
            out = api.build(args.model, Path(tmp) / v, api.BuildConfig(calibration=cal, eval_samples=0)).path
            ev = api.evaluate(out, api.EvalConfig(sample=api.SampleConfig(n=args.n, steps=args.steps, eta=args.eta)))
            r = ev.report
            d = r.get("digits", {})
            rows.append((v, r["paired_vs_fp"]["psnr_db_mean"], r["paired_vs_fp"]["ssim_mean"], d.get("fd_to_real"),
                         d.get("fd_to_fp"), d.get("noise_floor_fd"), d.get("fp_fd_to_real"), d.get("confident_rate")))
            print(f"{v}: {rows[-1][1:]}", file=sys.stderr)
    print(f"{args.model}, {args.n} samples, DDIM {args.steps} steps, eta {args.eta}, calibration {args.calib_size} "
          "trajectories x 50 steps")
    print()
    print("| variant | PSNR vs FP (dB) | SSIM vs FP | FD to real | FD to FP (other seeds) | FP noise floor "
          "| FP FD to real | confident rate |")
    print("|---|---|---|---|---|---|---|---|")
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    for v, ps, ss, fd, fdfp, floor, fpfd, conf in rows:
        print(f"| {v} | {ps:.2f} | {ss:.4f} | {fmt(fd, '.3f')} | {fmt(fdfp, '.3f')} | {fmt(floor, '.3f')} "
              f"| {fmt(fpfd, '.3f')} | {fmt(conf, '.1%')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
