"""The command line: parse arguments, build a config, call dmcompile.api, print the result.

Errors of the user's making print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__, zoo

EXIT_USER_ERROR = 2


def _progress_bar(desc: str):
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(*args):
        label, i, n = (desc, *args) if len(args) == 2 else args
        bar = bars.get(label)
        if bar is None:
            bar = bars[label] = tqdm(total=n, desc=label, unit="step", leave=False, file=sys.stderr)
        bar.n = i
        bar.refresh()
        if i >= n:
            bar.close()

    return update


def cmd_export(args) -> int:
    from . import api

    cfg = api.ExportConfig(opset=args.opset, seed=args.seed)
    model = api.load_model(args.model, seed=args.seed)
    print(f"model {model.id}: {model.num_parameters() / 1e6:.2f} M parameters, sample {list(model.sample_shape)}")
    res = api.export(model, args.output, cfg)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(res.layer_map.counts().items()))
    print(f"wrote {res.path}/model.onnx ({res.onnx_bytes / 1e6:.1f} MB) and layer_map.json in {res.export_seconds:.1f} s")
    print(f"quantizable nodes: {counts}; {res.layer_map.total_macs / 1e6:.1f} M MACs per sample")
    print(f"parity vs PyTorch: max abs error {res.parity_max_abs_err:.2e} (tolerance {cfg.parity_tol:g})")
    return 0


def _sample_config(args, n_default: int):
    from .config import SampleConfig

    return SampleConfig(n=n_default if args.n is None else args.n, steps=args.steps, eta=args.eta, seed=args.seed,
                        batch_size=args.batch_size)


def cmd_sample(args) -> int:
    from . import api
    from .eval.grid import save_grid

    cfg = _sample_config(args, 64)
    images = api.sample(args.target, cfg, fp=args.fp, progress=_progress_bar("DDIM"), correction=not args.no_correction)
    save_grid(images, args.output)
    print(f"wrote {args.output}: {cfg.n} samples, DDIM {cfg.steps} steps, eta {cfg.eta}, seed {cfg.seed}")
    if api.is_digits_shape(images.shape[1:]) and cfg.n >= 2:
        s = api.digit_scores(images)
        print(f"FD to real digits: {s['fd_to_real']:.3f} ({cfg.n} samples; small sets read high, "
              f"see `dmcompile eval` for the noise floor); confident-class rate {s['confident_rate']:.1%}")
    return 0


def cmd_eval(args) -> int:
    from . import api
    from .artifacts import write_json
    from .config import EvalConfig
    from .eval.grid import save_fd_figure, save_grid

    cfg = EvalConfig(sample=_sample_config(args, 1000))
    res = api.evaluate(args.target, cfg, progress=_progress_bar("eval"), correction=not args.no_correction)
    r = res.report
    pv = r["paired_vs_fp"]
    corr = ", PTQD correction on" if r["correction"] else ""
    print(f"{r['model']} ({r['format']}), {cfg.sample.n} samples, DDIM {cfg.sample.steps} steps, eta {cfg.sample.eta}{corr}")
    print(f"paired vs full precision (same seeds): PSNR {pv['psnr_db_mean']:.2f} dB (median {pv['psnr_db_median']:.2f}), "
          f"SSIM {pv['ssim_mean']:.4f}, max |diff| {pv['max_abs_diff']:.2e}")
    d = r.get("digits")
    if d:
        print(f"FD to real digits: {d['fd_to_real']:.3f}   (FP: {d['fp_fd_to_real']:.3f})")
        print(f"FD to an FP set of other seeds: {d['fd_to_fp']:.3f}   noise floor (FP vs FP): {d['noise_floor_fd']:.3f}"
              f"   (real digits, half vs half: {d['real_halves_fd']:.3f})")
        print(f"confident-class rate (max p >= {cfg.confident_threshold}): {d['confident_rate']:.1%}   "
              f"(FP: {d['fp_confident_rate']:.1%}); classes {d['class_histogram']}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "eval.json", r)
        save_grid(res.images[:64], out / "samples.png")
        written = ["eval.json", "samples.png"]
        if d:
            save_fd_figure({"model vs real": d["fd_to_real"], "FP vs real": d["fp_fd_to_real"],
                            "model vs FP": d["fd_to_fp"], "FP noise floor": d["noise_floor_fd"]},
                           out / "fd.png", f"{r['model']} {r['format']}: {cfg.sample.n} samples, "
                           f"DDIM {cfg.sample.steps}")
            written.append("fd.png")
        print(f"wrote {', '.join(str(out / w) for w in written)}")
    if args.json:
        print(json.dumps(r, indent=2))
    return 0


def cmd_build(args) -> int:
    from . import api
    from .config import BuildConfig, CalibrationConfig

    calib = CalibrationConfig(size=args.calib_size, steps=args.calib_steps, seed=args.seed, groups=args.groups,
                              observer=args.observer, timesteps=args.calib_timesteps)
    cfg = BuildConfig(format=args.format, float_layers=tuple(args.float_layer), calibration=calib,
                      eval_samples=args.eval_samples, seed=args.seed, budget=args.budget, allocator=args.allocator,
                      share_weights=args.share_weights, allow_simulated_bits=args.allow_simulated_bits,
                      analysis=_analysis_config(args), weight_bits=_weight_bits(args.weight_bits),
                      correction=not args.no_correction, step_aware=args.step_aware)
    out = args.output or Path("build") / f"{Path(str(args.model)).name}-{args.format}"
    res = api.build(args.model, out, cfg, progress=_progress_bar("build"))
    m = res.manifest
    sizes = sum(f["bytes"] for f in m["files"].values())
    fusion = m["build"]["fusion"]
    engines = len({g["engine"] for g in m["groups"]})
    print(f"wrote {res.path}: {len(m['groups'])} timestep group(s), {engines} engine(s), {sizes / 1e6:.2f} MB, "
          f"{fusion['ratio']:.0%} of Conv/Gemm/MatMul on integer kernels, {m['build']['seconds']:.1f} s")
    if m.get("plan"):
        avg = m["plan"]["average_weight_bits"]
        extra = f" under {m['plan']['budget']} ({m['plan']['allocator']})" if m["plan"].get("budget") else ""
        print(f"weight bits: average {min(avg):.3f}-{max(avg):.3f} over the groups{extra}")
    if m.get("correction"):
        ks = [g["k"] for g in m["correction"]["groups"]]
        print(f"PTQD correction: k from {min(ks):+.4f} to {max(ks):+.4f} over the groups")
    if m.get("step_aware_activation"):
        sa = m["step_aware_activation"]
        print("step-aware activation bits per group: " + " ".join(str(g["selected_bits"]) for g in sa["groups"])
              + f" ({sa['note']})")
    if "fidelity" in m:
        f = m["fidelity"]
        print(f"fidelity vs fp32 ({f['samples']} samples, DDIM {f['steps']}): PSNR {f['psnr_db_mean']:.2f} dB, "
              f"SSIM {f['ssim_mean']:.4f}")
    return 0


def _weight_bits(spec: str | None) -> dict | None:
    """'*=4,first_conv=8' -> {'*': 4, 'first_conv': 8}."""
    from .errors import ConfigError

    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        name, _, bits = part.strip().rpartition("=")
        if not name or not bits.isdigit():
            raise ConfigError(f"cannot read --weight-bits entry {part!r}; write NAME=BITS, e.g. *=4,first_conv=8")
        out[name] = int(bits)
    return out


def _analysis_config(args):
    from .config import AnalysisConfig

    return AnalysisConfig(samples_per_group=args.rd_samples, distortion=args.distortion, sweep=args.sweep,
                          weight_bits=tuple(args.rd_weight_bits), act_bits=tuple(args.rd_act_bits))


def cmd_analyze(args) -> int:
    from . import api
    from .analysis.plots import save_rd_curves
    from .config import CalibrationConfig

    calib = CalibrationConfig(size=args.calib_size, steps=args.calib_steps, seed=args.seed, groups=args.groups)
    curves = api.analyze(args.model, _analysis_config(args), calib, out=args.output, progress=_progress_bar("analyze"))
    save_rd_curves(curves, args.output / "rd_curves.png")
    G, L, B = curves.weight.shape
    print(f"wrote {args.output}: curves of {L} weighted layers x {len(curves.weight_bits)} weight widths and "
          f"{len(curves.tensors)} activation tensors x {len(curves.act_bits)} widths, {G} groups, "
          f"{curves.seconds:.1f} s measuring ({curves.config['analysis']['sweep']} sweep); rd_curves.png")
    return 0


def cmd_inspect(args) -> int:
    from . import api
    from .inspect import bundle_report, format_report

    bundle = api.open_bundle(args.bundle)
    report = bundle_report(bundle, fusion=not args.no_fusion)
    print(format_report(report))
    if args.plots:
        for path in api.inspect_plots(bundle, args.plots, curves_dir=args.curves):
            print(f"wrote {path}")
    return 0


def _add_analysis(p: argparse.ArgumentParser) -> None:
    p.add_argument("--distortion", default="ssim+mse", choices=["ssim+mse", "mse", "sqnr"],
                   help="output distortion of the RD curves (default ssim+mse, the paper's)")
    p.add_argument("--rd-samples", type=int, default=16, help="inputs per group for the RD curves (default 16)")
    p.add_argument("--sweep", default="full", choices=["full", "model"],
                   help="full: measure every width; model: measure 3 and 6 bits, fit the rest from weight noise power")
    p.add_argument("--rd-weight-bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8])
    p.add_argument("--rd-act-bits", type=int, nargs="+", default=[6, 8])


def _add_sampling(p: argparse.ArgumentParser, n_help: str) -> None:
    p.add_argument("-n", type=int, default=None, help=n_help)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic (default), 1 DDPM-like")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--batch-size", type=int, default=256, help="UNet batch size (default 256)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dmcompile", description="Compile diffusion models into low-bit inference "
                                "bundles and sample them with the torch-free runtime dmruntime.")
    p.add_argument("--version", action="version", version=f"dmcompile {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    models = ", ".join(zoo.names())

    e = sub.add_parser("export", help="trace a model to fp32 ONNX with a layer map",
                       description=f"Trace a UNet to ONNX (inputs sample, timestep; output eps; dynamic batch), "
                       f"check parity with PyTorch, write model.onnx, layer_map.json and manifest.json. "
                       f"MODEL: a zoo name ({models}) or a local diffusers UNet folder.")
    e.add_argument("model", nargs="?", default=zoo.DEFAULT_MODEL, help=f"default {zoo.DEFAULT_MODEL}")
    e.add_argument("-o", "--output", required=True, type=Path, help="output folder (written atomically)")
    e.add_argument("--opset", type=int, default=17)
    e.add_argument("--seed", type=int, default=0, help="random-weight seed of presets, parity inputs")
    e.set_defaults(func=cmd_export)

    b = sub.add_parser("build", help="compile a model into a per-timestep-group int8 bundle",
                       description="Calibrate along DDIM trajectories of the full-precision model, quantize "
                       "(W8A8: int8 per-channel weights, uint8 per-tensor activations with per-group scales), "
                       f"write one ONNX Runtime model per timestep group. MODEL: {models} or a folder.")
    b.add_argument("model", nargs="?", default=zoo.DEFAULT_MODEL, help=f"default {zoo.DEFAULT_MODEL}")
    b.add_argument("-o", "--output", type=Path, default=None, help="bundle folder (default build/MODEL-FORMAT)")
    b.add_argument("--format", default="w8a8", choices=["w8a8", "mixed"],
                   help="w8a8: int8 weights; mixed: per-layer weight bits under --budget (RD allocation)")
    b.add_argument("--budget", default=None, help="mixed: 5.0bits (average weight bits), 20MB (weight bytes) or "
                   "BOPs=1.5e9 (MACs x weight bits x activation bits)")
    b.add_argument("--allocator", default="dp", choices=["dp", "lagrange"],
                   help="dp: exact knapsack (default); lagrange: the paper's multiplier sweep")
    b.add_argument("--share-weights", dest="share_weights", action="store_true", default=True,
                   help="one weight allocation for all groups, weights stored once (default)")
    b.add_argument("--per-group-weights", dest="share_weights", action="store_false",
                   help="one allocation per group (the paper): an engine per distinct allocation")
    b.add_argument("--allow-simulated-bits", action="store_true",
                   help="allow widths the target cannot store natively (2, 3, 5, 6): kept in 4- or 8-bit containers")
    b.add_argument("--weight-bits", default=None, metavar="SPEC",
                   help="mixed without a budget: explicit widths, e.g. '*=4,first_conv=8,last_conv=8'")
    b.add_argument("--groups", type=int, default=10, help="timestep groups K (1: one scale for all timesteps)")
    b.add_argument("--calib-size", type=int, default=64, help="calibration trajectories (default 64)")
    b.add_argument("--calib-steps", type=int, default=50, help="DDIM steps per trajectory (default 50)")
    b.add_argument("--observer", default="mse", choices=["minmax", "percentile", "mse"])
    b.add_argument("--calib-timesteps", default="trajectory", choices=["trajectory", "ptq4dm"],
                   help="record every step, or PTQ4DM's normally distributed timesteps")
    b.add_argument("--float-layer", action="append", default=[], metavar="NAME",
                   help="keep in float: node/module name or prefix, op type, first_conv, last_conv (repeatable)")
    b.add_argument("--eval-samples", type=int, default=16, help="samples for the fidelity check (0: skip)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-correction", action="store_true",
                   help="skip estimating PTQD noise-correction statistics (the bundle then has none)")
    b.add_argument("--step-aware", action="store_true",
                   help="select activation bits per group by PTQD's SNR rule (reported in the manifest)")
    _add_analysis(b)
    b.set_defaults(func=cmd_build)

    a = sub.add_parser("analyze", help="rate-distortion curves per timestep group (cached, resumable)",
                       description="Measure, per timestep group, the UNet output distortion when one layer's weights "
                       "(or input activations) are quantized to each candidate width; writes curves.json, "
                       "curves.npz and rd_curves.png. Builds with --format mixed reuse the cached curves.")
    a.add_argument("model", nargs="?", default=zoo.DEFAULT_MODEL, help=f"default {zoo.DEFAULT_MODEL}")
    a.add_argument("-o", "--output", required=True, type=Path, help="folder for the curves")
    a.add_argument("--groups", type=int, default=10)
    a.add_argument("--calib-size", type=int, default=64)
    a.add_argument("--calib-steps", type=int, default=50)
    a.add_argument("--seed", type=int, default=0)
    _add_analysis(a)
    a.set_defaults(func=cmd_analyze)

    i = sub.add_parser("inspect", help="groups, per-layer precision, fusion, MACs and size of a bundle")
    i.add_argument("bundle")
    i.add_argument("--no-fusion", action="store_true", help="skip the ONNX Runtime fusion check (faster)")
    i.add_argument("--plots", type=Path, default=None, metavar="DIR",
                   help="write bits_heatmap.png (and rd_curves.png when the curves are cached or --curves is given)")
    i.add_argument("--curves", type=Path, default=None, help="curves folder from `dmcompile analyze`")
    i.set_defaults(func=cmd_inspect)

    s = sub.add_parser("sample", help="DDIM-sample a bundle (or with --fp a model) into a PNG grid",
                       description="Sample through dmruntime and write a PNG grid. TARGET: a bundle or export "
                       f"folder; with --fp also a model ({models} or a folder), whose fp32 ONNX export is "
                       "cached under $DMCOMPILE_CACHE (default ~/.cache/dmcompile).")
    s.add_argument("target")
    s.add_argument("--fp", action="store_true", help="sample the full-precision model")
    s.add_argument("-o", "--output", required=True, type=Path, help="PNG grid to write")
    _add_sampling(s, "number of samples (default 64)")
    s.add_argument("--no-correction", action="store_true", help="turn the bundle's PTQD noise correction off")
    s.set_defaults(func=cmd_sample)

    v = sub.add_parser("eval", help="fidelity of a bundle against its full-precision model",
                       description="Sample the bundle and its full-precision PyTorch model with the same seeds; "
                       "report paired PSNR/SSIM and, for digits models, FD to real digits, the FP noise floor "
                       "and the confident-class rate.")
    v.add_argument("target", help="bundle or export folder")
    v.add_argument("--out", type=Path, default=None, help="folder for eval.json, samples.png, fd.png")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_sampling(v, "number of samples (default 1000)")
    v.add_argument("--no-correction", action="store_true", help="turn the bundle's PTQD noise correction off")
    v.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    from dmruntime import DmRuntimeError

    from .errors import DmcompileError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DmcompileError, DmRuntimeError) as e:
        print(f"dmcompile {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
