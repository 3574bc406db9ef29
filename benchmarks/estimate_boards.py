"""Paper estimates for ARM boards (no board was used): resident memory and compute of bundles of
digits16, ddpm-cifar10-32 and sd15-unet, and what a Raspberry Pi 5 / Jetson-class CPU would need.

    python benchmarks/estimate_boards.py [--models digits16 ddpm-cifar10-32 sd15-unet]

From the fp32 export (cached, or made now: sd15-unet's is 3.4 GB and takes minutes): parameters,
MACs per UNet call (layer map) and the activation peak per sample (dmcompile.memory's liveness on
the fp32 graph, prompts at their reference length). Memory as `dmcompile inspect` estimates it for
a built bundle (dmcompile/memory.py: runtime base + weights as held + batch x activation peak).
Time: MACs / (board int8 peak x EFFICIENCY), EFFICIENCY being what ONNX Runtime's int8 kernels
reach of this x86-64 VM's VNNI peak on ddpm-cifar10-32 (measured, see benchmarks/README.md).
All of it is an estimate: board kernels, memory bandwidth and thermals decide the real figure.
"""

from __future__ import annotations

import argparse
import json
import sys

from dmcompile import api
from dmcompile.backends import get_backend
from dmcompile.memory import activation_peak, board_estimate

# Boards: int8 multiply-accumulates per second at peak, from cores x clock x MACs per cycle
# (NEON dot-product: two 128-bit SDOT pipes = 32 int8 MACs per cycle per core on A76 / A78).
BOARDS = {
    "Raspberry Pi 5 (4x Cortex-A76 2.4 GHz, 8 GB)": (4 * 2.4e9 * 32, 8e9),
    "Jetson Orin Nano CPU (6x Cortex-A78AE 1.5 GHz, 8 GB shared)": (6 * 1.5e9 * 32, 8e9),
}
# Share of the board's int8 peak the kernels reach, assumed: ONNX Runtime reached 291 GMAC/s here on
# ddpm-cifar10-32 W8A8 K=1 at batch 8 (171 ms per call for 8 x 6.22 GMAC, benchmarks/README.md,
# Latency), 0.87 of a nominal 2 cores x 2.6 GHz x 64 VNNI MACs per cycle; ARM int8 kernels
# are taken at 0.5 of theirs. Small layers (digits16) reach far less: read its row as a floor.
EFFICIENCY = 0.5


def model_figures(name: str) -> dict:
    fp = api.fp_bundle(name)
    m = json.loads((fp / "manifest.json").read_text())
    macs = json.loads((fp / "layer_map.json").read_text())["total_macs"]
    seq = (m.get("conditioning") or {}).get("sequence_length")
    act = activation_peak(fp / "model.onnx", free_dim=seq or 1)
    return {"params": m["model"]["parameters"], "macs": macs, "act_peak": act["peak_bytes"],
            "guided": bool(seq)}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["digits16", "ddpm-cifar10-32", "sd15-unet"])
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args(argv)
    print("Estimates, not measurements. Memory: dmcompile/memory.py; time: MACs / (int8 peak x "
          f"{EFFICIENCY}); {args.steps} DDIM steps; guided models run [null; cond] as batch 2.\n")
    print("| model | params | GMAC per call per sample | activation peak per sample (fp32 graph) | "
          "ort-cpu K=10, batch 1: resident MB | batch 8 | openvino-cpu K=10, batch 1 | --max-engines 2, batch 1 | "
          + " | ".join(f"{b.split(' (')[0]}: s per sample ({args.steps} steps, batch 1)" for b in BOARDS) + " |")
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(BOARDS))
    for name in args.models:
        f = model_figures(name)
        g = 2 if f["guided"] else 1
        ort, ov = get_backend("onnxruntime").memory, get_backend("openvino").memory
        ort1 = board_estimate(f["params"], f["act_peak"], engines=1, batch=g, model=ort)
        ort8 = board_estimate(f["params"], f["act_peak"], engines=1, batch=8 * g, model=ort)
        ov1 = board_estimate(f["params"], f["act_peak"], engines=10, batch=g, model=ov)
        ov2 = board_estimate(f["params"], f["act_peak"], engines=2, batch=g, model=ov)
        times = [args.steps * g * f["macs"] / (peak * EFFICIENCY) for peak, _ in BOARDS.values()]
        print(f"| {name} | {f['params'] / 1e6:.1f} M | {f['macs'] / 1e9:.2f} | {f['act_peak'] / 1e6:.1f} MB | "
              f"{ort1:.0f} | {ort8:.0f} | {ov1:.0f} | {ov2:.0f} | " + " | ".join(f"{t:.2f}" for t in times) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
