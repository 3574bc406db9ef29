"""Cross-machine comparison for scripts/check_arm64.sh (needs dmruntime and numpy only).

    python scripts/arm64_compare.py run BUNDLE OUT.npz [-n 32] [--steps 50]
    python scripts/arm64_compare.py compare --fp FP.npz --x86 A.npz [A2.npz ...] --arm B.npz [B2.npz ...]

``run`` samples ``n`` images (DDIM, seed 0) and evaluates the model at CALLS timesteps spread over
[0, T) on a fixed batch (the same inputs on every machine). ``compare`` prints, per bundle: how many of those
single calls are bit-identical between the machines and the largest relative difference, next
to the quantization error of one call (x86-64 against the fp32 export); and the paired PSNR of
the 50-step samples, aarch64 against x86-64 and each against fp32. Exit 1 unless the two machines
are equally close to fp32 (median paired PSNR within MAX_MEDIAN_GAP_DB) and one call differs less
between the machines than from fp32.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

MAX_MEDIAN_GAP_DB = 1.5
CALLS = 10


def run(bundle_path: str, out: str, n: int, steps: int) -> None:
    from dmruntime import Bundle, DDIMSampler

    b = Bundle.open(bundle_path)
    x = np.random.default_rng(1234).standard_normal((8,) + b.sample_shape).astype(np.float32)
    T = b.num_train_timesteps
    ts = ((np.arange(CALLS) + 0.5) * T / CALLS).astype(np.int64)  # the same on every bundle
    eps = np.stack([b.predict(x, int(t)) for t in ts])
    np.savez(out, samples=DDIMSampler(b, steps=steps).sample(n, seed=0), eps=eps, t=ts)


def per_sample_psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mse = ((a.astype(np.float64) - b) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(4.0 / np.maximum(mse, 1e-30))  # samples in [-1, 1]


def mean_mse(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR over the mean MSE of all samples (the few that part dominate it)."""
    return 10 * np.log10(4.0 / max(float(np.mean((a.astype(np.float64) - b) ** 2)), 1e-30))


def rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Relative L2 difference per call (first axis)."""
    d = (a - b).reshape(len(a), -1)
    return np.linalg.norm(d, axis=1) / np.linalg.norm(a.reshape(len(a), -1), axis=1)


def compare(fp_path: str, x86_paths: list[str], arm_paths: list[str]) -> int:
    fp = np.load(fp_path)
    ok = True
    print("\n| bundle | one call: bit-identical of 10 timesteps | max rel. diff aarch64 vs x86-64 | its quantization error "
          "(x86-64 vs fp32, median) | 50-step paired PSNR aarch64 vs x86-64: median (mean-MSE) dB | x86-64 vs fp32 "
          "| aarch64 vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for xp, ap in zip(x86_paths, arm_paths):
        x, a = np.load(xp), np.load(ap)
        diff, quant = rel(x["eps"], a["eps"]), rel(fp["eps"], x["eps"])
        same = int((diff == 0).sum())
        p_xa, p_xf, p_af = (per_sample_psnr(u, v) for u, v in
                            ((x["samples"], a["samples"]), (x["samples"], fp["samples"]), (a["samples"], fp["samples"])))

        name = xp.rsplit("/", 1)[-1].rsplit(".", 2)[0]
        print(f"| {name} | {same} / {len(diff)} | {diff.max():.2e} | {np.median(quant):.2e} | "
              f"{np.median(p_xa):.2f} ({mean_mse(x['samples'], a['samples']):.2f}) | "
              f"{np.median(p_xf):.2f} ({mean_mse(x['samples'], fp['samples']):.2f}) | "
              f"{np.median(p_af):.2f} ({mean_mse(a['samples'], fp['samples']):.2f}) |")
        gap = np.median(p_xf) - np.median(p_af)
        if gap > MAX_MEDIAN_GAP_DB:
            print(f"FAIL {name}: aarch64 samples are {gap:.2f} dB further from fp32 than x86-64's (median)")
            ok = False
        if diff.max() >= np.median(quant):
            print(f"FAIL {name}: one call differs between the machines ({diff.max():.2e}) as much as from fp32")
            ok = False
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("bundle")
    r.add_argument("out")
    r.add_argument("-n", type=int, default=32)
    r.add_argument("--steps", type=int, default=50)
    c = sub.add_parser("compare")
    c.add_argument("--fp", required=True)
    c.add_argument("--x86", nargs="+", required=True)
    c.add_argument("--arm", nargs="+", required=True)
    args = p.parse_args(argv)
    if args.cmd == "run":
        run(args.bundle, args.out, args.n, args.steps)
        return 0
    if len(args.x86) != len(args.arm):
        p.error("--x86 and --arm need the same number of files")
    return compare(args.fp, args.x86, args.arm)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
