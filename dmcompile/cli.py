"""The command line: parse arguments, build a config, call dmcompile.api, print the result.

Errors of the user's making print one line and exit with code 2; Ctrl-C / SIGTERM print one line
and exit with 130 / 143 (dmruntime.cli.run_main, shared with ``python -m dmruntime``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dmruntime.cli import add_sdxl_options, check_output, run_main, sdxl_options, write_samples

from . import __version__, zoo
from .artifacts import EVAL, check_replaceable
from .config import (ALLOCATORS, CALIB_TIMESTEPS, DISTORTIONS, OBSERVERS, RECIPES, ROUNDINGS, SWEEPS, AnalysisConfig,
                     BuildConfig, CalibrationConfig, EvalConfig, ExportConfig, MixedRecipe, Override, SampleConfig,
                     W8A8Recipe, default, parse_overrides)
from .errors import ConfigError, DmcompileError
from .budget import span
from .targets import PROFILES

CONV_PARAMS = {"auto": "auto", "constant": True, "per-group": False}  # --conv-params -> BuildConfig


def _api():
    """dmcompile.api, imported on first use: it loads onnx and ONNX Runtime (seconds on these
    machines), which ``dmcompile --help`` and a mistyped option should not wait for."""
    from . import api

    return api


def _progress_bar(desc: str):
    """Bars on a terminal, one line per stage with its time in a log (dmruntime.progress)."""
    from dmruntime.progress import Progress

    return Progress("auto", label=desc)


def cmd_export(args) -> int:
    api = _api()
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
    """The sampling options; without --guidance, a bundle calibrated with guidance samples at
    that scale (its manifest says which)."""
    guidance = args.guidance
    if guidance is None:
        guidance = (_manifest(Path(getattr(args, "target", ""))).get("conditioning") or {}).get(
            "calibration_guidance_scale")
    return SampleConfig(n=n_default if args.n is None else args.n, steps=args.steps, eta=args.eta, seed=args.seed,
                        batch_size=args.batch_size, guidance_scale=guidance, sampler=args.sampler, karras=args.karras)


def _manifest(target: Path) -> dict:
    """A target folder's manifest ({} for a model name or an unreadable manifest: opening the
    bundle reports what is wrong with it)."""
    try:
        return json.loads((target / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def _conditions(args, n: int) -> dict | None:
    """Conditions from --class / --conditions; for a class-conditional bundle without either,
    the classes in turn (the null class left out). None for unconditional targets."""
    import numpy as np
    from dmruntime import Conditioning

    api = _api()
    target = Path(args.target)
    spec = Conditioning.from_manifest(_manifest(target), target)  # the manifest only: the bundle is opened once
    if args.class_label is not None and args.conditions:
        raise ConfigError("pass either --class or --conditions, not both")
    if not spec:
        if args.class_label is not None or args.conditions or args.guidance is not None:
            raise ConfigError(f"{target} is not a conditional bundle: --class, --conditions and --guidance do not apply")
        return None
    if args.conditions:
        rows, _, _ = api.load_conditions(Path(args.conditions), spec)
        if rows is None:
            raise ConfigError(f"--conditions {args.conditions} holds no conditions (arrays named {list(spec.names)})")
        if len(next(iter(rows.values()))) not in (1, n):
            raise ConfigError(f"--conditions holds {len(next(iter(rows.values())))} rows for {n} samples; give one row "
                              "per sample or one row for all")
        return rows
    if "class_labels" not in spec.names and not spec.embedded_classes:
        if _manifest(target).get("text") and args.class_label is None:
            return None  # a text-to-image bundle: prompts (eval --prompts, sample --prompt)
        raise ConfigError(f"this bundle needs {', '.join(spec.describe())}: pass them with --conditions FILE.npz")
    if args.class_label is not None:
        return {"class_labels": np.full(n, args.class_label, np.int64)}
    null = int(spec.null["class_labels"]) if spec.null and "class_labels" in spec.null else None
    k = len(spec.class_table) if spec.embedded_classes else spec.num_classes
    classes = [c for c in range(k) if c != null]
    return {"class_labels": np.array([classes[i % len(classes)] for i in range(n)], np.int64)}


def cmd_sample(args) -> int:
    import numpy as np

    api = _api()
    if args.prompt:
        return _generate(args)
    sdxl_options(args)
    if args.negative_prompt is not None:
        raise ConfigError("--negative-prompt goes with --prompt")
    if _manifest(Path(args.target)).get("text") and not args.conditions:
        raise ConfigError(f"{args.target} is a text-to-image bundle: pass --prompt TEXT (or its embeddings with "
                          "--conditions FILE.npz)")
    cfg = _sample_config(args, default(SampleConfig, "n"))
    check_output(args.output)  # before sampling: .png/.npy, writable, never a file we did not write
    cond = _conditions(args, cfg.n)
    cfg = api.sampling_config(args.target, cfg, fp=args.fp)
    images = api.sample(args.target, cfg, fp=args.fp, progress=_progress_bar("sample"),
                        correction=not args.no_correction, cond=cond)
    write_samples(args.output, images)
    guided = f", guidance {cfg.guidance_scale:g}" if cfg.guidance_scale is not None else ""
    eta = f", eta {cfg.eta}" if cfg.sampler == "ddim" else ""
    karras = ", Karras sigmas" if cfg.karras else ""
    print(f"wrote {args.output}: {cfg.n} samples, {cfg.sampler} {cfg.steps} steps{karras}{eta}, seed {cfg.seed}{guided}")
    if api.is_digits_shape(images.shape[1:]) and cond and "class_labels" in cond:
        # samples of chosen classes: FD against all digits would mislead; say whether they are those digits
        acc = api.class_accuracy(images, np.broadcast_to(cond["class_labels"], (len(images),)))
        print(f"class accuracy (the digit classifier agrees with the requested class): {acc:.1%}")
    elif api.is_digits_shape(images.shape[1:]) and cfg.n >= 2:
        s = api.digit_scores(images)
        print(f"FD to real digits: {s['fd_to_real']:.3f} ({cfg.n} samples; small sets read high, "
              f"see `dmcompile eval` for the noise floor); confident-class rate {s['confident_rate']:.1%}")
    return 0


def _generate(args) -> int:
    """sample --prompt: n images per prompt (default 1), one grid row per prompt, at the
    pipeline's resolution."""
    api = _api()
    if args.class_label is not None or args.conditions:
        raise ConfigError("--prompt replaces --class and --conditions: pass one or the other")
    cfg = SampleConfig(n=1 if args.n is None else args.n, steps=args.steps, eta=args.eta, seed=args.seed,
                       batch_size=args.batch_size, guidance_scale=args.guidance, sampler=args.sampler,
                       karras=args.karras)
    check_output(args.output)
    cfg = api.sampling_config(args.target, cfg, fp=args.fp)
    images = api.generate(args.target, args.prompt, cfg, negative_prompt=args.negative_prompt, fp=args.fp,
                          progress=_progress_bar("sample"), correction=not args.no_correction, **sdxl_options(args))
    write_samples(args.output, images, cols=cfg.n, native=True)
    karras = ", Karras sigmas" if cfg.karras else ""
    print(f"wrote {args.output}: {len(images)} image(s) of {images.shape[2]}x{images.shape[3]} for "
          f"{len(args.prompt)} prompt(s), {cfg.sampler} {cfg.steps} steps{karras}, seed {cfg.seed}")
    return 0


def cmd_eval(args) -> int:
    api = _api()
    cfg = EvalConfig(sample=_sample_config(args, default(EvalConfig, "sample").n),
                     prompts=args.prompts and str(args.prompts))
    if args.out:
        check_replaceable(args.out, EVAL)  # before minutes of sampling
    res = api.evaluate(args.target, cfg, progress=_progress_bar("eval"), correction=not args.no_correction,
                       cond=_conditions(args, cfg.sample.n), ray=args.ray, workers=args.ray_workers)
    r = res.report
    if args.json:  # stdout holds the JSON alone (a pipe into jq); what else there is to say goes to stderr
        written = api.write_eval(res, args.out) if args.out else []
        for w in written:
            print(f"wrote {w}", file=sys.stderr)
        print(json.dumps(r, indent=2))
        return 0
    pv = r["paired_vs_fp"]
    corr = ", PTQD correction on" if r["correction"] else ""
    guided = f", guidance {cfg.sample.guidance_scale:g}" if cfg.sample.guidance_scale is not None else ""
    sc = res.config.sample
    how = f"{sc.sampler} {sc.steps} steps" + (", Karras sigmas" if sc.karras else "") + \
        (f", eta {sc.eta}" if sc.sampler == "ddim" else "")
    print(f"{r['model']} ({r['format']}), {sc.n} samples, {how}{guided}{corr}")
    print(f"paired vs full precision (same seeds): PSNR {pv['psnr_db_mean']:.2f} dB (median {pv['psnr_db_median']:.2f}), "
          f"SSIM {pv['ssim_mean']:.4f}, max |diff| {pv['max_abs_diff']:.2e}")
    tr = r.get("tensorrt_reference")
    if tr:
        print(f"tensorrt bundle, run by {tr['runs']}: vs the simulated quantized model ({tr['simulated']}) PSNR "
              f"{tr['engines_vs_simulated_psnr_db_mean']:.2f} dB; simulated vs full precision "
              f"{tr['simulated_vs_fp_psnr_db_mean']:.2f} dB")
    d = r.get("digits")
    if d:
        print(f"FD to real digits: {d['fd_to_real']:.3f}   (FP: {d['fp_fd_to_real']:.3f})")
        print(f"FD to an FP set of other seeds: {d['fd_to_fp']:.3f}   noise floor (FP vs FP): {d['noise_floor_fd']:.3f}"
              f"   (real digits, half vs half: {d['real_halves_fd']:.3f})")
        print(f"confident-class rate (max p >= {cfg.confident_threshold}): {d['confident_rate']:.1%}   "
              f"(FP: {d['fp_confident_rate']:.1%}); classes {d['class_histogram']}")
        if "class_accuracy" in d:
            print(f"class accuracy (classifier agrees with the requested class): {d['class_accuracy']:.1%}   "
                  f"(FP: {d['fp_class_accuracy']:.1%})")
    if r.get("prompts"):
        print(f"prompts: {r['prompts']['count']} ({r['prompts']['source']}), cycled over the samples")
    pa = r.get("prompt_accuracy")
    if pa:
        held = (f"; phrasings not used in training: {pa['held_out_phrasings']:.1%}   "
                f"(FP: {pa['fp_held_out_phrasings']:.1%})") if pa["held_out_samples"] else \
            " (no sample reached the held-out phrasings: -n 120 covers every evaluation prompt)"
        print(f"prompt accuracy (classifier agrees with the prompt's digit): {pa['accuracy']:.1%}   "
              f"(FP: {pa['fp_accuracy']:.1%}){held}")
    if args.out:
        written = api.write_eval(res, args.out)
        print(f"wrote {', '.join(str(w) for w in written)}")
    return 0


def _recipe(args):
    """The recipe of ``build``'s options: --format picks the class, the rest fill it."""
    overrides = tuple(Override(n, "float") for n in args.float_layer) + parse_overrides(args.weight_bits)
    if args.format == MixedRecipe.name:
        return MixedRecipe(budget=args.budget, allocator=args.allocator, share_weights=args.share_weights,
                           allow_simulated_bits=args.allow_simulated_bits, overrides=overrides,
                           allow_float=args.allow_float)
    if args.budget or args.allow_float:
        raise ConfigError(f"{'--budget' if args.budget else '--allow-float'} applies to --format mixed only")
    return W8A8Recipe(overrides=overrides)


def _calibration_config(args):
    return CalibrationConfig(size=args.calib_size, steps=args.calib_steps, seed=args.seed, groups=args.groups,
                             batch_size=args.calib_batch_size, sampler=args.sampler, karras=bool(args.karras),
                             observer=args.observer, timesteps=args.calib_timesteps, guidance_scale=args.guidance,
                             conditions=args.calib_conditions and str(args.calib_conditions),
                             prompts=args.calib_prompts and str(args.calib_prompts),
                             negative_prompt=args.negative_prompt)


def default_output(model: str, fmt: str) -> Path:
    """build/<model name>-<format>: a folder's own name, also for "." or "models/x/"."""
    p = Path(str(model))
    name = p.resolve().name if p.exists() else p.name
    return Path("build") / f"{name or 'model'}-{fmt}"


def cmd_build(args) -> int:
    from dmruntime.engines import engine_runtime

    api = _api()
    cfg = BuildConfig(recipe=_recipe(args), profile=args.target, calibration=_calibration_config(args),
                      analysis=_analysis_config(args), eval_samples=args.eval_samples, seed=args.seed,
                      correction=not args.no_correction, step_aware=args.step_aware, null_class=args.null_class,
                      decoder=args.decoder, max_engines=args.max_engines, residual_int8=not args.no_residual_int8,
                      text_encoder=args.text_encoder, clip_skip=args.clip_skip, speed_check=args.speed_check,
                      constant_conv_params=CONV_PARAMS[args.conv_params], shared_engine=args.shared_engine,
                      float_precision=args.float_precision, ray=args.ray,
                      ray_workers=args.ray_workers)
    out = args.output or default_output(args.model, args.format)
    res = api.build(args.model, out, cfg, progress=_progress_bar("build"))
    m = res.manifest
    sizes = sum(f["bytes"] for f in m["files"].values())
    fusion = m["build"]["fusion"]
    engines = len({g["engine"] for g in m["groups"]})
    print(f"wrote {res.path}: {len(m['groups'])} timestep group(s), {engines} engine(s), {sizes / 1e6:.2f} MB, "
          f"{fusion['ratio']:.0%} of Conv/Gemm/MatMul on integer kernels, {m['build']['seconds']:.1f} s")
    sp = m["sampler"]
    print(f"calibrated on {sp['name']} {sp['steps']} steps{', Karras sigmas' if sp['karras'] else ''} "
          "(sample and eval default to it)")
    if m.get("plan"):
        avg = m["plan"]["average_weight_bits"]
        extra = f" under {m['plan']['budget']} ({m['plan']['allocator']})" if m["plan"].get("budget") else ""
        print(f"weight bits: average {span(avg, '.3f')}" + (" over the groups" if len(set(avg)) > 1 else "") + extra)
    if m.get("correction"):
        ks = [g["k"] for g in m["correction"]["groups"]]
        print(f"PTQD correction: k from {min(ks):+.4f} to {max(ks):+.4f} over the groups")
    if m.get("step_aware_activation"):
        sa = m["step_aware_activation"]
        print("step-aware activation bits per group: " + " ".join(str(g["selected_bits"]) for g in sa["groups"])
              + f" ({sa['note']})")
    if "fidelity" in m:
        f = m["fidelity"]
        where = "" if engine_runtime(m["engine"]["runtime"]).devices[0] == "cpu" else \
            " (ONNX Runtime on the CPU over the engines' ONNX)"  # a GPU bundle, checked here on the CPU
        print(f"fidelity vs fp32 ({f['samples']} samples, {f.get('sampler', 'ddim')} {f['steps']} steps){where}: PSNR {f['psnr_db_mean']:.2f} dB, "
              f"SSIM {f['ssim_mean']:.4f}")
    if m.get("speed"):
        from dmruntime.bench import describe_speed

        for line in describe_speed(m["speed"]):
            print(line)
    for line in api.build_notes(res):
        print(line)
    return 0


def _analysis_config(args):
    return AnalysisConfig(samples_per_group=args.rd_samples, distortion=args.distortion, sweep=args.sweep,
                          weight_bits=tuple(args.rd_weight_bits), act_bits=tuple(args.rd_act_bits),
                          rounding=args.rounding)


def cmd_analyze(args) -> int:
    api = _api()
    curves = api.analyze(args.model, _analysis_config(args), _calibration_config(args), out=args.output,
                         progress=_progress_bar("analyze"), null_class=args.null_class, ray=args.ray,
                         workers=args.ray_workers)
    G, L, B = curves.weight.shape
    print(f"wrote {args.output}: curves of {L} weighted layers x {len(curves.weight_bits)} weight widths and "
          f"{len(curves.tensors)} activation tensors x {len(curves.act_bits)} widths, {G} groups, "
          f"{curves.seconds:.1f} s measuring ({curves.config['analysis']['sweep']} sweep); rd_curves.png")
    return 0


def cmd_inspect(args) -> int:
    api = _api()
    bundle = api.open_bundle(args.bundle)
    report = api.bundle_report(bundle, fusion=not args.no_fusion)
    print(api.format_report(report))
    if args.plots:
        for path in api.inspect_plots(bundle, args.plots, curves_dir=args.curves):
            print(f"wrote {path}")
    return 0


def cmd_bench(args) -> int:
    from dmruntime import bench

    return bench.run(args)


def cmd_cache(args) -> int:
    if args.all and not args.clean:
        raise ConfigError("--all goes with --clean (dmcompile cache --clean --all removes every cache entry)")
    api = _api()
    if args.clean:
        removed = api.clean_cache(everything=args.all)
        print(f"removed {len(removed)} {'entries and temporaries' if args.all else 'stale temporaries'} from "
              f"{api.cache_dir()}")
        for p in removed[:20]:
            print(f"  {p}")
    rep = api.cache_report()
    print(f"cache {rep.root}: {rep.total_bytes / 1e6:.1f} MB")
    for kind, (n, size) in rep.entries.items():
        print(f"  {kind:8s} {n:3d} entries  {size / 1e6:9.1f} MB")
    for label, items in (("stale temporaries (dmcompile cache --clean removes them)", rep.stale),
                         ("temporaries of running builds", rep.in_use)):
        if items:
            print(f"  {label}: {len(items)}, {sum(b for _, b in items) / 1e6:.1f} MB")
            for p, b in items[:10]:
                print(f"    {p} ({b / 1e6:.1f} MB)")
    return 0


def _add_ray(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help=f"run {what} as Ray tasks (pip install 'dmcompile[ray]'): without ADDRESS on a Ray cluster "
                   "started here, 'auto' on the one running on this node, else at ADDRESS (host:port or "
                   "ray://host:10001); the results are the same bytes as without --ray")
    p.add_argument("--ray-workers", type=int, default=None, metavar="N",
                   help="--ray without ADDRESS: the local cluster's CPUs (default all)")


def _add_analysis(p: argparse.ArgumentParser) -> None:
    A = AnalysisConfig
    p.add_argument("--distortion", default=default(A, "distortion"), choices=DISTORTIONS,
                   help=f"output distortion of the RD curves (default {default(A, 'distortion')}, the paper's)")
    p.add_argument("--rd-samples", type=int, default=default(A, "samples_per_group"),
                   help=f"inputs per group for the RD curves (default {default(A, 'samples_per_group')})")
    p.add_argument("--sweep", default=default(A, "sweep"), choices=SWEEPS,
                   help="full: measure every width; model: measure two widths, fit the rest from weight noise power")
    p.add_argument("--rd-weight-bits", type=int, nargs="+", default=list(default(A, "weight_bits")))
    p.add_argument("--rd-act-bits", type=int, nargs="+", default=list(default(A, "act_bits")))
    p.add_argument("--rounding", default=default(A, "rounding"), choices=ROUNDINGS,
                   help="how weights are rounded onto their grid, in the RD curves and the bundle: gptq "
                        "(error-compensating on the layer inputs' second moments, gathered during calibration) "
                        f"or rtn (round to nearest); default {default(A, 'rounding')}")


def _add_calibration(p: argparse.ArgumentParser) -> None:
    C = CalibrationConfig
    p.add_argument("--groups", type=int, default=default(C, "groups"),
                   help=f"timestep groups K (default {default(C, 'groups')}; 1: one scale for all timesteps)")
    p.add_argument("--calib-size", type=int, default=default(C, "size"),
                   help=f"calibration trajectories (default {default(C, 'size')})")
    p.add_argument("--calib-batch-size", type=int, default=default(C, "batch_size"),
                   help=f"trajectories per model call (default {default(C, 'batch_size')}); the calibration pass "
                   "commits its progress after each such chunk, and an interrupted pass resumes from the last")
    p.add_argument("--calib-steps", "--steps", dest="calib_steps", type=int, default=default(C, "steps"),
                   help=f"sampler steps per calibration trajectory (default {default(C, 'steps')}); the bundle "
                   "samples with the same sampler and steps unless told otherwise")
    _add_sampler(p, "calibrate along this sampler's trajectories (default: the model's scheduler/ config; DDIM for "
                 "a DDPMScheduler config)")
    p.add_argument("--observer", default=default(C, "observer"), choices=OBSERVERS,
                   help=f"how a clipping range is chosen (default {default(C, 'observer')})")
    p.add_argument("--calib-timesteps", default=default(C, "timesteps"), choices=CALIB_TIMESTEPS,
                   help="record every step (trajectory), or PTQ4DM's normally distributed timesteps (ptq4dm)")
    p.add_argument("--calib-conditions", type=Path, default=None, metavar="FILE.npz",
                   help="conditional models: calibration conditions by input name, one row per trajectory (cycled), "
                   "and null_<name> for guidance's null condition; default: class labels drawn uniformly")
    p.add_argument("--calib-prompts", type=Path, default=None, metavar="FILE.txt",
                   help="text-to-image models: calibration prompts, one per line (UTF-8), a seeded selection per "
                   "trajectory; default: the pipeline folder's calibration_prompts.txt, else dmcompile's 80 prompts")
    p.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="text-to-image models: the null branch of guidance during calibration (default: empty)")
    p.add_argument("--guidance", type=float, default=default(C, "guidance_scale"), metavar="S",
                   help="conditional models: calibrate on the guided sampler at scale S (both branches recorded)")
    p.add_argument("--null-class", type=int, default=None, metavar="K",
                   help="class-conditional models: class label K is the null condition of guidance (stored in "
                   "the bundle)")
    p.add_argument("--seed", type=int, default=default(BuildConfig, "seed"))


def _add_sampler(p: argparse.ArgumentParser, what: str) -> None:
    from dmruntime import SAMPLERS

    p.add_argument("--sampler", default=None, metavar="NAME",
                   help=f"{what}: {', '.join(SAMPLERS)}, or a diffusers scheduler class name")
    p.add_argument("--karras", action="store_true", default=None,
                   help="Karras sigmas (dpmpp*, euler, unipc)")


def _add_sampling(p: argparse.ArgumentParser, n_default: int, prompts: bool = False) -> None:
    S = SampleConfig
    p.add_argument("-n", type=int, default=None, help=f"number of samples (default {n_default})")
    _add_sampler(p, "sampler (default: the one the bundle was calibrated with)")
    p.add_argument("--steps", type=int, default=default(S, "steps"),
                   help="sampler steps (default: the bundle's calibration steps, else 50)")
    p.add_argument("--eta", type=float, default=default(S, "eta"), help="DDIM eta: 0 deterministic (default), 1 DDPM-like")
    p.add_argument("--seed", type=int, default=default(S, "seed"), help="seed of the initial noise (default 0)")
    p.add_argument("--batch-size", type=int, default=default(S, "batch_size"),
                   help=f"UNet batch size (default {default(S, 'batch_size')})")
    p.add_argument("--class", dest="class_label", type=int, default=None, metavar="K",
                   help="class-conditional bundles: sample class K (default: the classes in turn)")
    p.add_argument("--conditions", type=Path, default=None, metavar="FILE.npz",
                   help="conditional bundles: conditions by input name (class_labels, encoder_hidden_states), "
                   "one row per sample or one for all")
    if prompts:
        p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                       help="text-to-image bundles: generate from this prompt, -n images each (default 1; "
                       "repeatable: one grid row per prompt), at the pipeline's resolution")
        p.add_argument("--negative-prompt", default=None, metavar="TEXT",
                       help="with --prompt: the null branch of guidance (default: the empty prompt, or zeros where the "
                       "pipeline forces them: SDXL)")
        add_sdxl_options(p)
    p.add_argument("--guidance", type=float, default=default(S, "guidance_scale"), metavar="S",
                   help="classifier-free guidance scale (needs a bundle with a null condition); default: the scale "
                   "the bundle was calibrated with, else none")


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
    e.add_argument("-o", "--output", required=True, type=Path,
                   help="output folder (written atomically); must be absent, empty or an earlier export or bundle")
    e.add_argument("--opset", type=int, default=default(ExportConfig, "opset"))
    e.add_argument("--seed", type=int, default=default(ExportConfig, "seed"),
                   help="random-weight seed of presets, parity inputs")
    e.set_defaults(func=cmd_export)

    b = sub.add_parser("build", help="compile a model into a per-timestep-group int8 bundle",
                       description="Calibrate along sampling trajectories of the full-precision model, quantize "
                       "(W8A8: int8 per-channel weights, uint8 per-tensor activations with per-group scales; mixed: "
                       "per-layer weight widths by RD allocation), write the engines and per-group inputs. "
                       f"MODEL: {models} or a folder.")
    b.add_argument("model", nargs="?", default=zoo.DEFAULT_MODEL, help=f"default {zoo.DEFAULT_MODEL}")
    b.add_argument("-o", "--output", type=Path, default=None,
                   help="bundle folder (default build/MODEL-FORMAT); must be absent, empty or an earlier bundle")
    b.add_argument("--format", default=default(BuildConfig, "recipe").name, choices=sorted(RECIPES),
                   help="w8a8: int8 weights; mixed: per-layer weight bits under --budget (RD allocation)")
    b.add_argument("--target", default=default(BuildConfig, "profile"), choices=sorted(PROFILES),
                   help=f"target profile (default {default(BuildConfig, 'profile')}): ort-cpu (ONNX Runtime, one "
                   "fused engine fed each group's scales), openvino-cpu (OpenVINO, one compiled model per engine, "
                   "scales compiled in; needs the openvino package) or tensorrt (NVIDIA GPUs: strongly typed FP16 "
                   "ONNX with int8 Q/DQ per group; engines built where TensorRT is installed)")
    b.add_argument("--no-residual-int8", action="store_true",
                   help="tensorrt: keep residual Adds' skip inputs FP16 (default: Q/DQ on them, so TensorRT fuses "
                        "the Add into the int8 Conv; costs quality, 5 dB PSNR on digits16)")
    b.add_argument("--shared-engine", action="store_true",
                   help="openvino-cpu: one compiled engine for every timestep group, fed each group's scalars (the "
                   "memory of one compiled model; slower: 1.09-1.18x per call on ddpm-cifar10-32, more on tiny models); "
                   "default: one engine per group, its scales compiled in")
    b.add_argument("--float-precision", choices=("f32", "bf16"), default="f32",
                   help="openvino-cpu: run the layers left float (attention's MatMuls, normalisations) in bf16, "
                   "OpenVINO's own default on CPUs with bf16 (AVX512-BF16, AMX): faster there, at some fidelity "
                   "(benchmarks/README.md); default f32")
    b.add_argument("--conv-params", choices=tuple(CONV_PARAMS), default="auto",
                   help="ort-cpu with several groups: 'constant': one zero point per Conv input for all groups, "
                   "biases added in float (ONNX Runtime's symmetric int8 Conv); 'per-group': every group's own "
                   "zero points and int32 biases (its generic int8 Conv, which has an AMX kernel); default 'auto': "
                   "per-group where the build CPU has AMX, else constant (benchmarks/README.md)")
    b.add_argument("--max-engines", type=int, default=default(BuildConfig, "max_engines"), metavar="N",
                   help="openvino-cpu, tensorrt: at most N engines; adjacent groups with the closest activation scales share "
                   "one (bounds resident memory: each compiled model holds its own weights)")
    b.add_argument("--budget", default=None, help="mixed: 5.0bits (average weight bits), 1MB (weight bytes) or "
                   "BOPs=4e9 (MACs x weight bits x activation bits); an infeasible one is an error naming the "
                   "smallest feasible budget, before any calibration")
    b.add_argument("--allocator", default=default(MixedRecipe, "allocator"), choices=ALLOCATORS,
                   help="dp: exact knapsack (default); lagrange: the paper's multiplier sweep")
    b.add_argument("--share-weights", dest="share_weights", action="store_true",
                   default=default(MixedRecipe, "share_weights"),
                   help="one weight allocation for all groups, weights stored once (default)")
    b.add_argument("--per-group-weights", dest="share_weights", action="store_false",
                   help="one allocation per group (the paper): an engine per distinct allocation")
    b.add_argument("--allow-simulated-bits", action="store_true",
                   help="allow widths the target cannot store natively (2, 3, 5, 6): kept in 4- or 8-bit containers")
    b.add_argument("--allow-float", action="store_true",
                   help="let the allocator keep a layer float in a group when that buys distortion most cheaply "
                        "(costed as float32: 32-bit weights, 32x32 BOPs); with --per-group-weights the budget then "
                        "bounds the step-weighted average over groups")
    b.add_argument("--weight-bits", default=None, metavar="SPEC",
                   help="per-layer rules PATTERN=BITS|float, e.g. '*=4,first_conv=8,time_embedding=float'; the most "
                   "specific pattern wins (node > module > module prefix > op type > *); with --budget, the "
                   "layers they name are pinned and the rest allocated")
    b.add_argument("--float-layer", action="append", default=[], metavar="NAME",
                   help="keep in float (the rule NAME=float): node/module name or prefix, op type, first_conv, "
                   "last_conv (repeatable)")
    _add_calibration(b)
    b.add_argument("--eval-samples", type=int, default=default(BuildConfig, "eval_samples"),
                   help=f"samples for the fidelity check (default {default(BuildConfig, 'eval_samples')}; 0: skip)")
    b.add_argument("--no-correction", action="store_true",
                   help="skip estimating PTQD noise-correction statistics (the bundle then has none)")
    b.add_argument("--speed-check", dest="speed_check", action="store_true", default="auto",
                   help="time the engines against the fp32 export on this machine and record the ratio in the "
                   "manifest (default: on for models under 1 GMAC per sample on CPU targets, which build in about a "
                   "minute)")
    b.add_argument("--no-speed-check", dest="speed_check", action="store_false", help="skip the speed check")
    b.add_argument("--step-aware", action="store_true",
                   help="select activation bits per group by PTQD's SNR rule (reported in the manifest)")
    b.add_argument("--text-encoder", choices=["fp32", "int8"], default=default(BuildConfig, "text_encoder"),
                   help="text-to-image models: ship the text encoders in fp32 (default) or int8 (ONNX Runtime's "
                   "dynamic quantization; its error on the calibration prompts goes in the manifest)")
    b.add_argument("--clip-skip", type=int, default=None, metavar="N",
                   help="text-to-image models: condition on the text encoder's hidden state N layers before the "
                   "last (diffusers' clip_skip)")
    b.add_argument("--decoder", choices=["fp32", "w8a8"], default=BuildConfig().decoder,
                   help="latent models: ship the VAE decoder in fp32 (default) or W8A8, calibrated on latents "
                   "the fp32 model samples (its PSNR against fp32 goes in the manifest)")
    _add_analysis(b)
    _add_ray(b, "the RD probes of --format mixed")
    b.set_defaults(func=cmd_build)

    a = sub.add_parser("analyze", help="rate-distortion curves per timestep group (cached, resumable)",
                       description="Measure, per timestep group, the UNet output distortion when one layer's weights "
                       "(or input activations) are quantized to each candidate width; writes curves.json, "
                       "curves.npz and rd_curves.png. Builds with --format mixed reuse the cached curves.")
    a.add_argument("model", nargs="?", default=zoo.DEFAULT_MODEL, help=f"default {zoo.DEFAULT_MODEL}")
    a.add_argument("-o", "--output", required=True, type=Path,
                   help="folder for the curves; must be absent, empty or earlier curves")
    _add_calibration(a)
    _add_analysis(a)
    _add_ray(a, "the RD probes")
    a.set_defaults(func=cmd_analyze)

    i = sub.add_parser("inspect", help="groups, per-layer precision, fusion, MACs and size of a bundle")
    i.add_argument("bundle")
    i.add_argument("--no-fusion", action="store_true", help="skip the ONNX Runtime fusion check (faster)")
    i.add_argument("--plots", type=Path, default=None, metavar="DIR",
                   help="write bits_heatmap.png (and rd_curves.png when the curves are cached or --curves is given)")
    i.add_argument("--curves", type=Path, default=None, help="curves folder from `dmcompile analyze`")
    i.set_defaults(func=cmd_inspect)

    s = sub.add_parser("sample", help="sample a bundle (or with --fp a model) into a PNG grid",
                       description="Sample through dmruntime and write a PNG grid. TARGET: a bundle or export "
                       f"folder; with --fp also a model ({models} or a folder), whose fp32 ONNX export is "
                       "cached under $DMCOMPILE_CACHE (default ~/.cache/dmcompile).")
    s.add_argument("target")
    s.add_argument("--fp", action="store_true", help="sample the full-precision model")
    s.add_argument("-o", "--output", required=True, type=Path,
                   help="PNG grid to write (an existing file is replaced only if dmcompile wrote it)")
    _add_sampling(s, default(SampleConfig, "n"), prompts=True)
    s.add_argument("--no-correction", action="store_true", help="turn the bundle's PTQD noise correction off")
    s.set_defaults(func=cmd_sample)

    v = sub.add_parser("eval", help="fidelity of a bundle against its full-precision model",
                       description="Sample the bundle and its full-precision PyTorch model with the same seeds; "
                       "report paired PSNR/SSIM and, for digits models, FD to real digits, the FP noise floor "
                       "and the confident-class rate.")
    v.add_argument("target", help="bundle or export folder")
    v.add_argument("--out", type=Path, default=None, help="folder for eval.json, samples.png, fd.png "
                   "(must be absent, empty or an earlier evaluation)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--prompts", type=Path, default=None, metavar="FILE.txt",
                   help="text-to-image bundles: prompts, one per line, cycled over the samples (default: the digit "
                   "evaluation prompts for digits models, which gives prompt accuracy; else dmcompile's default set)")
    _add_sampling(v, default(EvalConfig, "sample").n)
    v.add_argument("--no-correction", action="store_true", help="turn the bundle's PTQD noise correction off")
    _add_ray(v, "the sampling (bundle, fp reference, noise floor) in shards of --batch-size rows")
    v.set_defaults(func=cmd_eval)

    bn = sub.add_parser("bench", help="time bundles on this machine: per call, per sampling run, memory, size",
                        description="The runtime benchmark (dmruntime.bench; benchmarks/bench_runtime.py runs the same "
                        "where only the runtime is installed): session creation, per-call latency and full DDIM runs "
                        "interleaved between the bundles (medians, ratios to the first), peak resident memory of a "
                        "fresh process, size, weight bits and BOPs; the CPU line first. Compare with the fp32 "
                        "export: --compare $(dmcompile export MODEL -o DIR) or an export folder from the cache.")
    from dmruntime.bench import add_arguments

    add_arguments(bn)
    bn.set_defaults(func=cmd_bench)

    c = sub.add_parser("cache", help="what the cache holds; --clean removes what killed runs left there",
                       description="Show the cache ($DMCOMPILE_CACHE, default ~/.cache/dmcompile): entries per kind, "
                       "and temporaries that killed or interrupted runs left (a running build's are kept).")
    c.add_argument("--info", action="store_true", help="show the cache (the default)")
    c.add_argument("--clean", action="store_true", help="remove stale temporaries")
    c.add_argument("--all", action="store_true", help="with --clean: remove every cache entry too")
    c.set_defaults(func=cmd_cache)
    return p


def main(argv: list[str] | None = None) -> int:
    from dmruntime import DmRuntimeError

    args = build_parser().parse_args(argv)
    return run_main(f"dmcompile {args.command}", lambda: args.func(args), errors=(DmcompileError, DmRuntimeError),
                    interrupted="interrupted; rerun to resume (finished stages are cached)")


if __name__ == "__main__":
    raise SystemExit(main())
