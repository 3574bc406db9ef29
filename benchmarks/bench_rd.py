"""Rate-distortion analysis and mixed precision, measured (issue 4).

    python benchmarks/bench_rd.py curves     [--model digits16] [--rd-samples 16]   # timing, model error
    python benchmarks/bench_rd.py additivity [--model digits16]
    python benchmarks/bench_rd.py allocators [--model digits16]
    python benchmarks/bench_rd.py fidelity   [--samples 256]                        # digits16 at 5 and 6 bits
    python benchmarks/bench_rd.py bops       [--model ddpm-cifar10-32]             # W4A8 BOPs vs fp32

Curves are cached under $DMCOMPILE_CACHE/rd (delete it to re-time). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmcompile import api
from dmcompile.config import (
    AnalysisConfig,
    BuildConfig,
    EvalConfig,
    MixedRecipe,
    SampleConfig,
    parse_overrides,
)


def bar(stage, i, n):
    if i == n or i % 50 == 0:
        print(f"  {stage} {i}/{n}", file=sys.stderr, flush=True)


def curves_cmd(args):
    """Times the full sweep (and with --time-model the model sweep); the model's error is computed
    from the full curves by refitting from their measured columns (the same numbers a model
    sweep measures)."""
    import onnx

    from dmcompile.analysis.rd import model_error, model_fill
    from dmcompile.frontend.layermap import LayerMap

    t0 = time.perf_counter()
    if args.model_only:  # time the model sweep alone (large models)
        m = api.analyze(args.model, AnalysisConfig(samples_per_group=args.rd_samples, sweep="model"), progress=bar)
        G, L, _ = m.weight.shape
        print(f"{args.model}: {G} groups x {args.rd_samples} inputs, {L} weighted layers, {len(m.tensors)} "
              f"activation tensors; model sweep ({list(m.config['analysis']['model_bits'])} + activations "
              f"{list(m.act_bits)}): {m.seconds:.1f} s measuring, wall incl. calibration {time.perf_counter() - t0:.1f} s")
        return
    full = api.analyze(args.model, AnalysisConfig(samples_per_group=args.rd_samples), progress=bar)
    G, L, _ = full.weight.shape
    print(f"{args.model}: {G} groups x {args.rd_samples} inputs, {L} weighted layers, {len(full.tensors)} activation "
          "tensors")
    print("| sweep | weight widths measured | seconds measuring |\n|---|---|---|")
    print(f"| full | {list(full.weight_bits)} + activations {list(full.act_bits)} | {full.seconds:.1f} |")
    if args.time_model:
        m = api.analyze(args.model, AnalysisConfig(samples_per_group=args.rd_samples, sweep="model"), progress=bar)
        print(f"| model | {list(m.config['analysis']['model_bits'])} + activations | {m.seconds:.1f} |")
    fp = api.fp_bundle(args.model)
    proto = onnx.load(str(fp / "model.onnx"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    layers = {l.node: l for l in LayerMap.load(fp / "layer_map.json").layers}
    ordered = [layers[n] for n in full.layers]
    print()
    from dmcompile.budget import Budget
    from dmcompile.analysis.plan import plan_bits

    print("| model bits | median abs log ratio (modelled / measured) | p90 | Spearman | points | "
          "allocation regret at 5 / 6 bits (widths 2-8, true D of the modelled plan / of the measured plan) |")
    print("|---|---|---|---|---|---|")
    wb = full.weight_bits
    for mb in ((3, 6), (4, 8), (2, 6), (2, 8)):
        W = full.weight.copy()
        W[:, :, [i for i, b in enumerate(wb) if b not in mb]] = np.nan
        measured = np.array([[b in mb for b in wb]] * L)
        modelled = model_fill(W, ordered, inits, wb, mb)
        e = model_error(full, modelled, measured)
        regret = []
        for avg in (5.0, 6.0):
            true = {}
            for name, curves_w in (("model", modelled), ("full", full.weight)):
                bits, _ = plan_bits(curves_w, ordered, wb, wb, Budget("bits", avg), "dp", share=True)
                cols = np.array([[wb.index(b) for b in row] for row in bits])
                true[name] = sum(full.weight[g, np.arange(L), cols[g]].sum() for g in range(G))
            regret.append(true["model"] / true["full"])
        print(f"| {mb} | {e['median_abs_log_ratio']:.3f} | {e['p90_abs_log_ratio']:.3f} | {e['spearman']:.4f} | "
              f"{e['points']} | {regret[0]:.3f} / {regret[1]:.3f} |")
    print(f"(wall {time.perf_counter() - t0:.1f} s)")


def additivity_cmd(args):
    from dmcompile.analysis.rd import check_additivity

    cfg = AnalysisConfig(samples_per_group=args.rd_samples)
    curves = api.analyze(args.model, cfg, progress=bar)
    calib = api.calibrate(args.model)
    # the probe fake-quantizes exactly the tensors the curves cover
    probe, X, T, C, _ = api.probe_inputs(api.fp_bundle(args.model), lambda proto, lm: list(curves.tensors), calib,
                                         cfg)
    res = check_additivity(probe, X, T, {8: calib.ranges(bits=8)}, curves, allocations=args.allocations,
                           progress=bar, C=C)
    print("| group | t range | Spearman (predicted vs measured) | median measured / predicted |")
    print("|---|---|---|---|")
    for g, (a, b) in enumerate(curves.groups):
        print(f"| {g} | [{a}, {b}) | {res['spearman'][g]:.3f} | {res['measured_over_predicted'][g]:.2f} |")


def allocators_cmd(args):
    from dmcompile.budget import Budget
    from dmcompile.analysis.plan import plan_bits
    from dmcompile.frontend.layermap import LayerMap

    curves = api.analyze(args.model, AnalysisConfig(samples_per_group=args.rd_samples), progress=bar)
    lm = LayerMap.load(api.fp_bundle(args.model) / "layer_map.json")
    layers = [l for l in lm.layers if l.weight]
    idx = [curves.layers.index(l.node) for l in layers]
    d = curves.weight[:, idx]
    print("| allowed widths | budget (avg bits) | allocation | DP predicted D | Lagrange predicted D | Lagrange / DP |")
    print("|---|---|---|---|---|---|")
    for allowed in ((4, 8), tuple(curves.weight_bits)):
        for avg in (4.5, 5.0, 5.5, 6.0, 7.0):
            if avg < min(allowed):
                continue
            for share in (True, False):
                r = {}
                for alloc in ("dp", "lagrange"):
                    _, info = plan_bits(d, layers, curves.weight_bits, allowed, Budget("bits", avg), alloc, share=share)
                    r[alloc] = sum(info["predicted_distortion"])
                print(f"| {list(allowed)} | {avg} | {'shared' if share else 'per group'} | {r['dp']:.5f} | "
                      f"{r['lagrange']:.5f} | {r['lagrange'] / r['dp']:.4f} |")


def fidelity_cmd(args):
    """The `dmcompile eval` protocol with the FP reference and noise-floor sets sampled once."""
    import shutil

    from dmcompile.eval.metrics import frechet_distance, psnr, ssim
    from dmcompile.frontend.torch_model import TorchEpsModel

    ev = EvalConfig(sample=SampleConfig(n=args.samples))
    sc = ev.sample
    ref = TorchEpsModel(api.load_model("digits16"))
    want = api.sample_model(ref, sc)
    other = api.sample_model(ref, SampleConfig(n=sc.n, seed=sc.seed + ev.floor_seed_offset))
    fp_f, fp2_f = api.digit_scores(want)["features"], api.digit_scores(other)["features"]
    floor = frechet_distance(fp_f, fp2_f)
    variants = []
    for avg in (5, 6):
        variants += [
            (f"RD dp, widths 4/8, {avg} bits", MixedRecipe(budget=f"{avg}bits")),
            (f"uniform {avg} bits (simulated)", MixedRecipe(overrides=parse_overrides(f"*={avg}"),
                                                            allow_simulated_bits=True)),
        ]
    variants.append(("first+last conv 8, rest 4", MixedRecipe(overrides=parse_overrides("*=4,first_conv=8,last_conv=8"))))
    variants.append(("RD dp, widths 2-8 (simulated), 5 bits", MixedRecipe(budget="5bits", allow_simulated_bits=True)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, recipe in variants:
            cfg = BuildConfig(recipe=recipe, eval_samples=0)
            m = api.build("digits16", Path(tmp) / "b", cfg, progress=bar).manifest
            size = sum(f["bytes"] for f in m["files"].values())
            for corr in (False, True):  # the allocation alone, then with PTQD's correction
                got = api.sample(Path(tmp) / "b", sc, correction=corr)
                sc_ = api.digit_scores(got)
                rows.append((name + (" + PTQD" if corr else ""), m["plan"]["average_weight_bits"][0], size,
                             float(np.mean(np.minimum(psnr(got, want), 200))), float(np.mean(ssim(got, want))),
                             frechet_distance(sc_["features"], fp2_f), floor, sc_["fd_to_real"], sc_["confident_rate"]))
                print(rows[-1], file=sys.stderr, flush=True)
            shutil.rmtree(Path(tmp) / "b")
    fp_real = api.digit_scores(want)
    print(f"digits16, K = 10, A8, DDIM 50, eta 0, {args.samples} samples, seeds as `dmcompile eval`; "
          f"FP: FD to real {fp_real['fd_to_real']:.2f}, confident {fp_real['confident_rate']:.1%}")
    print("| variant | avg weight bits | bundle bytes | PSNR vs FP (dB) | SSIM vs FP | FD to FP set | FP noise floor | "
          "FD to real | confident |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.3f} | {r[2]} | {r[3]:.2f} | {r[4]:.4f} | {r[5]:.2f} | {r[6]:.2f} | {r[7]:.2f} | "
              f"{r[8]:.1%} |")


def bops_cmd(args):
    from dmcompile.analysis.plan import bops
    from dmcompile.frontend.layermap import LayerMap

    lm = LayerMap.load(api.fp_bundle(args.model) / "layer_map.json")
    fp = sum(l.macs * 32 * 32 for l in lm.layers)
    print("| setting | BOPs per sample | fp32 / setting |\n|---|---|---|")
    for name, wb in (("W8A8", 8), ("W4A8", 4)):
        q = sum(bops(l, wb if l.weight else None, 8) for l in lm.layers)
        print(f"| {args.model} {name} (every Conv/Gemm/MatMul; attention MatMuls A8 x A8) | {q / 1e9:.3f} G | "
              f"{fp / q:.1f}x |")
    print(f"| {args.model} fp32 | {fp / 1e9:.3f} G | 1.0x |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["curves", "additivity", "allocators", "fidelity", "bops"])
    p.add_argument("--model", default=None)
    p.add_argument("--rd-samples", type=int, default=16)
    p.add_argument("--allocations", type=int, default=16)
    p.add_argument("--time-model", action="store_true", help="curves: also time a model sweep")
    p.add_argument("--model-only", action="store_true", help="curves: time only the model sweep")
    p.add_argument("--samples", type=int, default=256)
    args = p.parse_args(argv)
    args.model = args.model or ("ddpm-cifar10-32" if args.what == "bops" else "digits16")
    {"curves": curves_cmd, "additivity": additivity_cmd, "allocators": allocators_cmd, "fidelity": fidelity_cmd,
     "bops": bops_cmd}[args.what](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
