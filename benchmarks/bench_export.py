"""Export time, ONNX size, parity, and fp32 latency: PyTorch eager vs ONNX Runtime.

    python benchmarks/bench_export.py [--models digits16 ddpm-cifar10-32] [--repeats 15]

Both variants run in this one process, interleaved call by call, and the table shows
medians and the ratio ORT / PyTorch (shared, noisy machines: compare ratios, not ms).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ort_session, timing_parser


def main(argv=None) -> int:
    args = timing_parser(__doc__, repeats=15).parse_args(argv)

    import torch

    from dmcompile import api

    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        model = api.load_model(name)
        with tempfile.TemporaryDirectory() as tmp:
            res = api.export(model, Path(tmp) / name)
            sess = ort_session(res.path / "model.onnx", args.threads)
            for b in args.batches:
                x = np.random.default_rng(0).standard_normal((b, *model.sample_shape), dtype=np.float32)
                t = np.full((b,), 500, np.int64)
                xt, tt = torch.from_numpy(x), torch.from_numpy(t)
                times = {"torch": [], "ort": []}
                for i in range(args.repeats + 2):  # 2 warm-up rounds
                    for variant in ("torch", "ort"):
                        t0 = time.perf_counter()
                        if variant == "torch":
                            with torch.no_grad():
                                model.unet(xt, tt)
                        else:
                            sess.run(None, {"sample": x, "timestep": t})
                        if i >= 2:
                            times[variant].append(time.perf_counter() - t0)
                med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                rows.append((name, model.num_parameters(), res.export_seconds, res.onnx_bytes,
                             res.parity_max_abs_err, b, med["torch"], med["ort"]))
    print("| model | params | export s | ONNX MB | parity max abs err | batch | torch fp32 ms | ORT fp32 ms "
          "| ORT / torch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n, s, nb, err, b, mt, mo in rows:
        print(f"| {name} | {n / 1e6:.2f} M | {s:.1f} | {nb / 1e6:.1f} | {err:.1e} | {b} | {mt:.2f} | {mo:.2f} "
              f"| {mo / mt:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
