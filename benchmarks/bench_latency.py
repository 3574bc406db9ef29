"""Per-call and per-sampling-run latency of fp32 and int8 variants, in one process, interleaved.

    python benchmarks/bench_latency.py [--models digits16 ddpm-cifar10-32] [--repeats 10]

Variants: PyTorch eager fp32, ONNX Runtime fp32, ONNX Runtime's own quantize_static (QDQ,
uint8 activations, per-channel int8 weights, MinMax: the baseline a user would pick), and
dmcompile bundles with K = 1 and K = 10 timestep groups (one fused engine; each group
feeds its own activation scales).
Each round runs every variant once, in turn; the tables print medians and ratios to ORT fp32.
A second table times whole 50-step DDIM runs (K = 1 vs K = 10: the cost of switching engines).
Bundles are built into a temporary folder (calibration is cached under $DMCOMPILE_CACHE).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ort_quantize_static, ort_session, timing_parser


def main(argv=None) -> int:
    p = timing_parser(__doc__, repeats=10)
    p.add_argument("--sampling-repeats", type=int, default=3)
    p.add_argument("--calib-size", type=int, default=None, help="default: 64 for digits16, 16 for presets")
    args = p.parse_args(argv)

    import torch

    from dmcompile import api
    from dmruntime import Bundle, DDIMSampler

    torch.set_num_threads(args.threads)
    call_rows, run_rows = [], []
    for name in args.models:
        model = api.load_model(name)
        fp = api.fp_bundle(model)
        calib_size = args.calib_size or (64 if name == "digits16" else 16)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            bundles = {}
            for k in (1, 10):
                cfg = api.BuildConfig(eval_samples=0, calibration=api.CalibrationConfig(size=calib_size, groups=k))
                bundles[k] = api.build(model, tmp / f"k{k}", cfg).path
            rng = np.random.default_rng(0)
            calib_inputs = [{"sample": rng.standard_normal((1, *model.sample_shape), dtype=np.float32),
                             "timestep": np.array([t], np.int64)} for t in np.linspace(0, 999, 16).astype(int)]
            qs = ort_quantize_static(fp / "model.onnx", tmp / "ort_qs.onnx", calib_inputs)
            variants = {
                "torch fp32": None,
                "ORT fp32": ort_session(fp / "model.onnx", args.threads),
                "ORT quantize_static": ort_session(qs, args.threads),
                "dmcompile K=1": Bundle.open(bundles[1], threads=args.threads),
                "dmcompile K=10": Bundle.open(bundles[10], threads=args.threads),
            }
            for b in args.batches:
                x = rng.standard_normal((b, *model.sample_shape), dtype=np.float32)
                ts = [int(t) for t in np.linspace(999, 0, 50).astype(int)]
                times = {v: [] for v in variants}
                for r in range(args.repeats + 1):  # round 0 warms up (and creates every session)
                    for v, obj in variants.items():
                        if v.startswith("dmcompile") and r == 0:
                            for t in ts:
                                obj.predict(x, t)
                        t = ts[r % len(ts)]
                        t0 = time.perf_counter()
                        if obj is None:
                            with torch.no_grad():
                                model.unet(torch.from_numpy(x), torch.full((b,), t))
                        elif v.startswith("dmcompile"):
                            obj.predict(x, t)
                        else:
                            obj.run(None, {"sample": x, "timestep": np.full(b, t, np.int64)})
                        if r:
                            times[v].append(time.perf_counter() - t0)
                base = statistics.median(times["ORT fp32"])
                for v, ts_ in times.items():
                    m = statistics.median(ts_)
                    call_rows.append((name, b, v, m * 1e3, m / base))
            # Whole sampling runs: K=1 vs K=10 (switching engines every 5 steps), interleaved.
            runs = {1: [], 10: []}
            for r in range(args.sampling_repeats + 1):
                for k in (1, 10):
                    s = DDIMSampler(variants[f"dmcompile K={k}"], steps=50, batch_size=8)
                    t0 = time.perf_counter()
                    s.sample(8, seed=r)
                    if r:
                        runs[k].append(time.perf_counter() - t0)
            m1, m10 = statistics.median(runs[1]), statistics.median(runs[10])
            run_rows.append((name, m1, m10, m10 / m1))
    print("| model | batch | variant | median ms per UNet call | vs ORT fp32 |")
    print("|---|---|---|---|---|")
    for name, b, v, ms, ratio in call_rows:
        print(f"| {name} | {b} | {v} | {ms:.2f} | {ratio:.2f}x |")
    print()
    print("| model | 50-step DDIM, batch 8, K=1 (s) | K=10 (s) | K=10 / K=1 |")
    print("|---|---|---|---|")
    for name, a, b, r in run_rows:
        print(f"| {name} | {a:.3f} | {b:.3f} | {r:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
