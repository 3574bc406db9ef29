"""GPTQ rounding against round-to-nearest (issue 12), in three phases.

    python benchmarks/bench_rounding.py layers   [--model digits16] [--bits 3 4] [--trajectories 8]
    python benchmarks/bench_rounding.py fidelity [--model digits16] [-n 256] [--variants ...]
    python benchmarks/bench_rounding.py float    [--model digits16] [-n 256] [--slack 0.02 0.1]
    python benchmarks/bench_rounding.py eps      [--model ddpm-cifar10-32] [--variants w8a8 w4-first-last-8]
    python benchmarks/bench_rounding.py pass     [--model ddpm-cifar10-32]

layers: every Conv / Gemm / weighted MatMul layer's input recorded along fp32 DDIM-50
trajectories (every 5th step, all timesteps pooled), H = E[x x^T] per layer (im2col rows for
Conv, at most 4096 rows per call); per width the summed output error of each rounding on
held-out rows of the same trajectories (every 5th step, offset by 2), relative to
round-to-nearest's, and the time of the GPTQ pass.

fidelity: the `dmcompile eval` protocol (DDIM 50, eta 0, same seeds as FP) per variant and
rounding, with and without PTQD's correction: paired PSNR / SSIM against the FP model and, for
digits models, FD to the real digits and to a second FP set, and the confident-class rate.

eps: one-step fidelity for models whose 50-step samples are chaotic (ddpm-cifar10-32's random
weights: about 10 dB paired PSNR for every variant): each variant's raw engine (no PTQD) against
fp32 on the same x_t of fp32 DDIM-50 trajectories, SQNR of eps in dB, all steps and per group.

float: the allocator may keep layers float per group (``--allow-float``, per-group weights, joint
allocation), 8-bit weights otherwise, under BOPs budgets a little above the all-int8 bundle's:
where float lands, what it buys (eval protocol as above) and what it costs (50-step runs
interleaved with the all-int8 bundle in one process, medians).

pass: the build's rounding work on a model, timed and its peak memory read (ru_maxrss of a
child process per step): calibration without and with the second moments (one pass), then
GPTQ of every weighted layer at 4 and 8 bits from the saved moments.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {
    "w8a8": ("W8A8", None),
    "w4-first-last-8": ("W4A8, first/last conv 8", "*=4,first_conv=8,last_conv=8"),
    "w3": ("uniform 3 bits (simulated)", "*=3"),
    "rd4.5": ("RD 4.5 bits (widths 4/8)", "4.5bits"),
    "rd5": ("RD 5 bits (widths 4/8)", "5bits"),
}


def bar(stage, i, n):
    if i == n or i % 50 == 0:
        print(f"  {stage} {i}/{n}", file=sys.stderr, flush=True)


def recipe_of(spec):
    from dmcompile.config import MixedRecipe, W8A8Recipe, parse_overrides

    if spec is None:
        return W8A8Recipe()
    if spec.endswith("bits"):
        return MixedRecipe(budget=spec)
    return MixedRecipe(overrides=parse_overrides(spec), allow_simulated_bits=True)


def fidelity_cmd(args) -> int:
    if args.guidance is not None:
        return conditional_fidelity(args)
    from dmcompile import api
    from dmcompile.config import AnalysisConfig, BuildConfig, EvalConfig, SampleConfig
    from dmcompile.eval.metrics import frechet_distance
    from dmcompile.frontend.torch_model import TorchEpsModel
    from machine import cpu_line

    ev = EvalConfig(sample=SampleConfig(n=args.n))
    sc = ev.sample
    ref = TorchEpsModel(api.load_model(args.model))
    want = api.sample_model(ref, sc)
    digits = args.model.startswith("digits")
    fp2_f = None
    if digits:
        other = api.sample_model(ref, SampleConfig(n=sc.n, seed=sc.seed + ev.floor_seed_offset))
        fp_sc, fp2_f = api.digit_scores(want), api.digit_scores(other)["features"]
        floor = frechet_distance(fp_sc["features"], fp2_f)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.variants:
            name, spec = VARIANTS[v]
            for rounding in ("rtn", "gptq"):
                cfg = BuildConfig(recipe=recipe_of(spec), eval_samples=0, analysis=AnalysisConfig(rounding=rounding))
                t0 = time.perf_counter()
                m = api.build(args.model, Path(tmp) / "b", cfg, progress=bar).manifest
                secs = time.perf_counter() - t0
                bits = (m.get("plan") or {}).get("average_weight_bits", [8.0])[0]
                for corr in (False, True):
                    got = api.sample(Path(tmp) / "b", sc, correction=corr)
                    r = _eval_row(got, want, digits, fp2_f)
                    if digits:
                        r.insert(3, f"{floor:.2f}")
                    rows.append([f"{name}{' + PTQD' if corr else ''}", rounding, f"{bits:.3f}", *r, f"{secs:.0f}"])
                    print(rows[-1], file=sys.stderr, flush=True)
                shutil.rmtree(Path(tmp) / "b")
    print(f"{args.model}, K = 10, A8, DDIM 50, eta 0, {args.n} samples, seeds as `dmcompile eval`; {cpu_line()}")
    if digits:
        print(f"FP: FD to real {fp_sc['fd_to_real']:.2f}, confident {fp_sc['confident_rate']:.1%}")
    cols = ["variant", "rounding", "avg weight bits", "PSNR vs FP (dB)", "SSIM vs FP"]
    cols += ["FD to FP set", "FP noise floor", "FD to real", "confident"] if digits else []
    cols += ["build s (machine shared)"]
    _table(cols, rows)
    return 0


def conditional_fidelity(args) -> int:
    """Conditional models: `dmcompile eval` itself (class labels 0-9 cycled, guided), calibrated guided."""
    from dmcompile import api
    from dmcompile.config import AnalysisConfig, BuildConfig, CalibrationConfig, EvalConfig, SampleConfig
    from machine import cpu_line

    labels = {"class_labels": np.arange(args.n) % 10}
    cal = CalibrationConfig(guidance_scale=args.guidance)
    ev = EvalConfig(sample=SampleConfig(n=args.n, guidance_scale=args.guidance))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.variants:
            name, spec = VARIANTS[v]
            for rounding in ("rtn", "gptq"):
                cfg = BuildConfig(recipe=recipe_of(spec), calibration=cal, eval_samples=0,
                                  analysis=AnalysisConfig(rounding=rounding))
                m = api.build(args.model, Path(tmp) / "b", cfg, progress=bar).manifest
                bits = (m.get("plan") or {}).get("average_weight_bits", [8.0])[0]
                for corr in (False, True):
                    r = api.evaluate(Path(tmp) / "b", ev, correction=corr, cond=labels).report
                    pv, d = r["paired_vs_fp"], r.get("digits", {})
                    rows.append([f"{name}{' + PTQD' if corr else ''}", rounding, f"{bits:.3f}",
                                 f"{pv['psnr_db_mean']:.2f}", f"{pv['ssim_mean']:.4f}",
                                 *(f"{d[k]:.2f}" for k in ("fd_to_fp", "noise_floor_fd", "fd_to_real", "fp_fd_to_real")
                                   if k in d), *([f"{d['class_accuracy']:.1%}"] if "class_accuracy" in d else [])])
                    print(rows[-1], file=sys.stderr, flush=True)
                shutil.rmtree(Path(tmp) / "b")
    print(f"{args.model}, K = 10, A8, calibrated and sampled with guidance {args.guidance:g}, class labels 0-9 "
          f"cycled, DDIM 50, eta 0, {args.n} samples (`dmcompile eval`); {cpu_line()}")
    cols = ["variant", "rounding", "avg weight bits", "PSNR vs FP (dB)", "SSIM vs FP", "FD to FP set",
            "FP noise floor", "FD to real", "FP FD to real", "class accuracy"]
    _table(cols[:len(rows[0])], rows)
    return 0


def _table(cols, rows) -> None:
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(r) + " |")


def _eval_row(got, want, digits, fp2_f):
    from dmcompile import api
    from dmcompile.eval.metrics import frechet_distance, psnr, ssim

    r = [f"{np.mean(np.minimum(psnr(got, want), 200)):.2f}", f"{np.mean(ssim(got, want)):.4f}"]
    if digits:  # FD to a second FP set, FD to the real digits, confident-class rate
        g = api.digit_scores(got)
        r += [f"{frechet_distance(g['features'], fp2_f):.2f}", f"{g['fd_to_real']:.2f}", f"{g['confident_rate']:.1%}"]
    return r


def float_cmd(args) -> int:
    import statistics

    from dmruntime import Bundle, DDIMSampler

    from dmcompile import api
    from dmcompile.config import AnalysisConfig, BuildConfig, EvalConfig, MixedRecipe, SampleConfig, W8A8Recipe
    from dmcompile.frontend.torch_model import TorchEpsModel
    from machine import cpu_line

    ev = EvalConfig(sample=SampleConfig(n=args.n))
    sc = ev.sample
    ref = TorchEpsModel(api.load_model(args.model))
    want = api.sample_model(ref, sc)
    digits = args.model.startswith("digits")
    fp2_f = api.digit_scores(api.sample_model(ref, SampleConfig(n=sc.n, seed=sc.seed + ev.floor_seed_offset)))[
        "features"] if digits else None
    rows, where, bundles = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        base = api.build(args.model, Path(tmp) / "int8", BuildConfig(recipe=W8A8Recipe(), eval_samples=0),
                         progress=bar)
        w8 = sum(l["bops"][0] for l in base.manifest["precision"]["layers"])
        bundles["all int8 (W8A8)"] = base.path
        for slack in args.slack:
            recipe = MixedRecipe(budget=f"BOPs={w8 * (1 + slack):.6g}", share_weights=False, allow_float=True,
                                 allow_simulated_bits=True)
            cfg = BuildConfig(recipe=recipe, eval_samples=0, analysis=AnalysisConfig(weight_bits=(8,)))
            name = f"8-bit + float, BOPs budget +{slack:.0%}"
            b = api.build(args.model, Path(tmp) / f"f{slack}", cfg, progress=bar)
            bundles[name] = b.path
            plan = b.manifest["plan"]
            where.append((name, plan["float"], plan["spent_step_weighted"] / w8,
                          len({g["engine"] for g in b.manifest["groups"]})))
        for name, path in bundles.items():
            for corr in (False, True):
                got = api.sample(path, sc, correction=corr)
                rows.append([name + (" + PTQD" if corr else ""), *_eval_row(got, want, digits, fp2_f)])
                print(rows[-1], file=sys.stderr, flush=True)
        opened = {n: Bundle.open(p) for n, p in bundles.items()}
        runs = {n: [] for n in opened}
        for r in range(args.repeats + 1):
            for n, b in opened.items():
                t0 = time.perf_counter()
                DDIMSampler(b, steps=50, batch_size=args.batch).sample(args.batch, seed=r)
                if r:  # round 0 warms every engine up
                    runs[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in runs.items()}
    base_s = med["all int8 (W8A8)"]
    print(f"{args.model}, K = 10, DDIM 50, eta 0, {args.n} samples, seeds as `dmcompile eval`; {cpu_line()}")
    print("\n| bundle | float layers per group | BOPs (step-weighted) / all-int8 | engines |\n|---|---|---|---|")
    for name, fl, ratio, engines in where:
        per = ", ".join(f"g{g}: {len(f)}" for g, f in enumerate(fl) if f) or "none"
        print(f"| {name} | {per} | {ratio:.3f}x | {engines} |")
    for name, fl, _, _ in where:
        for g, f in enumerate(fl):
            if f:
                print(f"\n{name}, group {g} float: {', '.join(f)}")
    cols = ["bundle", "PSNR vs FP (dB)", "SSIM vs FP"] + (["FD to FP set", "FD to real", "confident"] if digits else [])
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\n50-step run, batch {args.batch}, {args.repeats} interleaved runs, medians\n")
    print("| bundle | 50-step run s | vs all int8 |\n|---|---|---|")
    for n, v in med.items():
        print(f"| {n} | {v:.2f} | {v / base_s:.2f}x |")
    return 0


def eps_cmd(args) -> int:
    from dmruntime import Bundle, DDIMSampler

    from dmcompile import api
    from dmcompile.config import AnalysisConfig, BuildConfig
    from machine import cpu_line

    fp = Bundle.open(api.fp_bundle(args.model))
    rows_in = []

    class Recorder:
        sample_shape, schedule, conditioning = fp.sample_shape, fp.schedule, fp.conditioning

        def predict(self, x, t, cond=None):
            eps = fp.predict(x, t)
            rows_in.append((x.copy(), t, eps))
            return eps

    DDIMSampler(Recorder(), steps=50).sample(args.n, seed=[0, 0xE95])
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.variants:
            name, spec = VARIANTS[v]
            for rounding in ("rtn", "gptq"):
                cfg = BuildConfig(recipe=recipe_of(spec), eval_samples=0, correction=False,
                                  analysis=AnalysisConfig(rounding=rounding))
                api.build(args.model, Path(tmp) / "b", cfg, progress=bar)
                b = Bundle.open(Path(tmp) / "b", correction=False)
                sig, err = {}, {}
                for x, t, eps in rows_in:
                    g = b.group_of(t).index
                    d = b.predict(x, t) - eps
                    sig[g] = sig.get(g, 0.0) + float(np.sum(eps.astype(np.float64) ** 2))
                    err[g] = err.get(g, 0.0) + float(np.sum(d.astype(np.float64) ** 2))
                per = {g: 10 * np.log10(sig[g] / err[g]) for g in sorted(sig)}
                total = 10 * np.log10(sum(sig.values()) / sum(err.values()))
                out.append((name, rounding, total, per[min(per)], min(per.values()), max(per.values())))
                print(out[-1], file=sys.stderr, flush=True)
                shutil.rmtree(Path(tmp) / "b")
    print(f"{args.model}: eps SQNR of the raw engine against fp32 on the x_t of {args.n} fp32 DDIM-50 trajectories "
          f"(every step), K = 10; {cpu_line()}")
    _table(["variant", "rounding", "eps SQNR, all steps (dB)", "group 0 (dB)", "worst group (dB)", "best group (dB)"],
           [[n, r, f"{a:.2f}", f"{b0:.2f}", f"{lo:.2f}", f"{hi:.2f}"] for n, r, a, b0, lo, hi in out])
    return 0


def _child(code: str) -> tuple[float, float]:
    """(seconds, peak resident GB) of ``code`` run in a fresh interpreter (its own ru_maxrss)."""
    code += "\nimport resource; print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1],
                         stdout=subprocess.PIPE, text=True).stdout
    peak = int(next(l for l in out.splitlines() if l.startswith("PEAK_KB")).split()[1])
    return time.perf_counter() - t0, peak / 1e6


def pass_cmd(args) -> int:
    """Calibration (cache emptied for it) with and without moments, then the GPTQ pass."""
    from machine import cpu_line

    with tempfile.TemporaryDirectory() as cache:
        setup = (f"import os; os.environ['DMCOMPILE_CACHE'] = {cache!r}\n"
                 "from dmcompile import stages\n"
                 f"fp = stages.fp_bundle({args.model!r})\n"
                 "from dmcompile.config import CalibrationConfig\n")
        _child(setup)  # the export, not timed
        rows = []
        for moments in (None, "pooled"):
            code = setup + (f"import shutil; shutil.rmtree(stages.cache_dir() / 'calib', ignore_errors=True)\n"
                            f"stages.cached_calibration(fp, CalibrationConfig(), moments={moments!r})\n")
            secs, peak = _child(code)
            rows.append((f"calibration, moments {moments or 'none'}", secs, peak))
        for bits in args.bits:
            code = setup + ("import numpy as np, onnx\n"
                            "from dmcompile import onnxio\n"
                            "calib = stages.cached_calibration(fp, CalibrationConfig(), moments='pooled')\n"
                            "r = stages.rounder(calib, 'gptq'); r.cache = None\n"
                            "proto = onnxio.load(fp / 'model.onnx', weights=False)\n"
                            "inits = {i.name: i for i in proto.graph.initializer}\n"
                            "for l in stages.load_layer_map(fp).layers:\n"
                            "    if l.weight:\n"
                            f"        r.quantize(l, onnxio.array(inits[l.weight], fp), {bits})\n")
            secs, peak = _child(code)
            rows.append((f"GPTQ pass, every layer at {bits} bits (includes loading the calibration)", secs, peak))
    print(f"{args.model}; {cpu_line()}")
    print("| step | seconds | peak resident GB (child process) |\n|---|---|---|")
    for name, secs, peak in rows:
        print(f"| {name} | {secs:.1f} | {peak:.2f} |")
    return 0


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
    p.add_argument("phase", choices=("layers", "fidelity", "eps", "float", "pass"))
    p.add_argument("--slack", nargs="+", type=float, default=[0.02, 0.1])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", default="digits16")
    p.add_argument("--bits", nargs="+", type=int, default=None)
    p.add_argument("--trajectories", type=int, default=8)
    p.add_argument("-n", type=int, default=256)
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    p.add_argument("--guidance", type=float, default=None,
                   help="fidelity of a class-conditional model (digits-ldm): calibrated and sampled guided")
    args = p.parse_args(argv)
    if args.phase == "fidelity":
        return fidelity_cmd(args)
    if args.phase == "eps":
        return eps_cmd(args)
    if args.phase == "float":
        return float_cmd(args)
    if args.phase == "pass":
        args.bits = args.bits or [4, 8]
        return pass_cmd(args)
    args.bits = args.bits or [3, 4]

    import onnx
    from dmruntime import Bundle, DDIMSampler

    from dmcompile import onnxio, stages
    from dmcompile.calibration.hessian import SecondMoment
    from dmcompile.calibration.rounding import gptq_quantize, weight_matrix
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
