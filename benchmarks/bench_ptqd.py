"""PTQD noise correction on digits16: fidelity with and without it, eta 0 and 1 (issue 5).

    python benchmarks/bench_ptqd.py [--samples 256]

Variants: W8A8 K=1, W8A8 K=10, mixed (RD, widths 4/8, 5 average bits) K=10; each sampled with
the correction on and off, DDIM 50 steps, eta 0 and eta 1, the seeds of `dmcompile eval`;
PSNR/SSIM against the fp32 PyTorch model with the same seeds (and, for eta 1, the same noise),
FD to a second FP set against the FP noise floor, FD to the real digits. Also prints the
estimated k, mean |bias| and residual variance per group. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmcompile import api
from dmcompile.config import BuildConfig, CalibrationConfig, EvalConfig, MixedRecipe, SampleConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=256)
    args = p.parse_args(argv)

    from dmruntime import Bundle

    from dmcompile.eval.metrics import frechet_distance, psnr, ssim
    from dmcompile.frontend.torch_model import TorchEpsModel

    ev = EvalConfig(sample=SampleConfig(n=args.samples))
    ref = TorchEpsModel(api.load_model("digits16"))
    fps = {}
    for eta in (0.0, 1.0):
        sc = SampleConfig(n=args.samples, eta=eta)
        want = api.sample_model(ref, sc)
        other = api.sample_model(ref, SampleConfig(n=args.samples, eta=eta, seed=sc.seed + ev.floor_seed_offset))
        f1, f2 = api.digit_scores(want), api.digit_scores(other)
        fps[eta] = (sc, want, f2["features"], frechet_distance(f1["features"], f2["features"]), f1["fd_to_real"])
        print(f"FP eta {eta}: noise floor {fps[eta][3]:.2f}, FD to real {fps[eta][4]:.2f}", file=sys.stderr, flush=True)
    variants = [("W8A8 K=1", BuildConfig(eval_samples=0, calibration=CalibrationConfig(groups=1))),
                ("W8A8 K=10", BuildConfig(eval_samples=0)),
                ("mixed 5 bits (RD, 4/8) K=10", BuildConfig(recipe=MixedRecipe(budget="5bits"), eval_samples=0))]
    rows, stats = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in variants:
            out = Path(tmp) / name.split()[0]
            m = api.build("digits16", out, cfg).manifest
            stats.append((name, m["correction"]["groups"]))
            for eta in (0.0, 1.0):
                sc, want, fp2, floor, fp_real = fps[eta]
                for corr in (False, True):
                    got = api.sample_model(Bundle.open(out, correction=corr), sc)
                    s = api.digit_scores(got)
                    rows.append((name, eta, corr, float(np.mean(np.minimum(psnr(got, want), 200))),
                                 float(np.mean(ssim(got, want))), frechet_distance(s["features"], fp2), floor,
                                 s["fd_to_real"], fp_real))
                    print(rows[-1], file=sys.stderr, flush=True)
    print(f"digits16, DDIM 50, {args.samples} samples, seeds as `dmcompile eval`")
    print("| variant | eta | correction | PSNR vs FP (dB) | SSIM vs FP | FD to FP set | FP noise floor | FD to real "
          "| FP FD to real |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:g} | {'on' if r[2] else 'off'} | {r[3]:.2f} | {r[4]:.4f} | {r[5]:.2f} | {r[6]:.2f} | "
              f"{r[7]:.2f} | {r[8]:.2f} |")
    print()
    print("| variant | group | k | mean abs bias | mean residual var | rms eps error | after correction |")
    print("|---|---|---|---|---|---|---|")
    for name, groups in stats:
        for g in groups:
            if g["rms_error"] is None:
                continue
            print(f"| {name} | [{g['t_start']},{g['t_end']}) | {g['k']:+.4f} | {np.mean(np.abs(g['bias'])):.2e} | "
                  f"{np.mean(g['var']):.2e} | {g['rms_error']:.4f} | {g['rms_error_corrected']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
