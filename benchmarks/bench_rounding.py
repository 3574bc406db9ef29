"""GPTQ rounding against round-to-nearest on real layer inputs (issue 12 groundwork).

    python benchmarks/bench_rounding.py [--model digits16] [--bits 3 4] [--trajectories 8]

Records every Conv / Gemm / weighted MatMul layer's input along fp32 DDIM-50 trajectories (every
5th step, all timesteps pooled), builds H = E[x x^T] per layer (im2col rows for Conv, at most
4096 rows per call), and prints per width the summed output error of each rounding on held-out
rows of the same trajectories (every 5th step, offset by 2), relative to round-to-nearest's, plus
the time of the GPTQ pass. Not a fidelity figure: the build does not use GPTQ yet.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def layer_rows(layer, node, x: np.ndarray) -> np.ndarray:
    from dmcompile.calibration.hessian import im2col

    if layer.op_type == "Conv":
        a = {at.name: list(at.ints) for at in node.attribute}
        k = layer.weight_shape[2:]
        return im2col(x, tuple(k), tuple(a.get("strides", [1, 1])), tuple(a.get("pads", [0, 0, 0, 0])),
                      tuple(a.get("dilations", [1, 1])))
    return x.reshape(-1, x.shape[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits16")
    p.add_argument("--bits", nargs="+", type=int, default=[3, 4])
    p.add_argument("--trajectories", type=int, default=8)
    args = p.parse_args(argv)

    import onnx
    from dmruntime import Bundle, DDIMSampler

    from dmcompile import onnxio, stages
    from dmcompile.calibration.hessian import SecondMoment
    from dmcompile.lowering.rounding import gptq_quantize, weight_matrix
    from dmcompile.quant import dequantize, quantize_weight, weight_axis

    fp = stages.fp_bundle(args.model)
    layers = [l for l in stages.load_layer_map(fp).layers if l.weight]
    model = onnxio.load(fp / "model.onnx")
    nodes = {n.name: n for n in model.graph.node}
    inputs = sorted({l.activation_input for l in layers})
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in inputs)
    sess = onnxio.session(model)
    fpb = Bundle.open(fp)
    inits = {i.name: i for i in model.graph.initializer}
    fit = {l.node: SecondMoment(weight_matrix(onnx.numpy_helper.to_array(inits[l.weight]), weight_axis(l)).shape[1],
                                max_rows=4096) for l in layers}
    held = {l.node: [] for l in layers}
    step = [0]

    class Recorder:
        schedule, sample_shape, conditioning = fpb.schedule, fpb.sample_shape, None

        def predict(self, x, t, cond=None):
            out = dict(zip(["eps", *inputs], sess.run(["eps", *inputs], {"sample": x, "timestep": np.full(len(x), t,
                                                                                                      np.int64)})))
            i = step[0]
            step[0] += 1
            if i % 5 in (0, 2):
                for l in layers:
                    rows = layer_rows(l, nodes[l.node], out[l.activation_input])
                    if i % 5 == 0:
                        fit[l.node].add(rows)
                    else:
                        held[l.node].append(rows[np.random.default_rng(i).choice(len(rows), min(512, len(rows)),
                                                                                 replace=False)])
            return out["eps"]

    DDIMSampler(Recorder(), steps=50).sample(args.trajectories, seed=0)
    print(f"{args.model}: {len(layers)} layers, H from {args.trajectories} trajectories x 10 steps")
    print("| bits | output error, GPTQ / round-to-nearest (sum over layers) | layers better | GPTQ pass s |")
    print("|---|---|---|---|")
    for bits in args.bits:
        tot_r = tot_g = 0.0
        better = 0
        t0 = time.perf_counter()
        for l in layers:
            w = onnx.numpy_helper.to_array(inits[l.weight])
            ax = weight_axis(l)
            W = weight_matrix(w, ax).astype(np.float64)
            X = np.concatenate(held[l.node])
            g = gptq_quantize(w, ax, bits, fit[l.node].matrix())
            err_g = float(np.sum((X @ (W - weight_matrix(dequantize(g), ax)).T) ** 2))
            err_r = float(np.sum((X @ (W - weight_matrix(dequantize(quantize_weight(w, ax, bits)), ax)).T) ** 2))
            tot_g, tot_r, better = tot_g + err_g, tot_r + err_r, better + (err_g < err_r)
        print(f"| {bits} | {tot_g / tot_r:.3f} | {better} / {len(layers)} | {time.perf_counter() - t0:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
