"""``python -m dmruntime``: sample a bundle where only the runtime is installed (a board, the
runtime container). Writes a PNG grid, or the raw float32 samples with ``.npy``.

    python -m dmruntime BUNDLE -n 64 -o grid.png [--sampler NAME] [--steps N] [--karras] [--eta 0] [--seed 0]
                        [--batch-size 64] [--class K | --conditions FILE.npz] [--guidance S] [--threads N]
                        [--prompt TEXT ... [--negative-prompt TEXT]]
                        [--prompt-2 TEXT ... [--negative-prompt-2 TEXT]]
                        [--original-size H W] [--crop-top-left TOP LEFT] [--target-size H W]
                        [--cache-dir DIR]

Its options, defaults and checks are the ones ``dmcompile sample`` has; ``run_main`` (shared by
both command lines) turns errors into one line and exit code 2, Ctrl-C into 130, SIGTERM into 143.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from . import __version__
from .bundle import Bundle
from .conditioning import read_conditions
from .errors import DmRuntimeError, InputError
from .progress import Progress
from .png import SOFTWARE, grid, png_software, write_png
from .sampler import DEFAULT_BATCH, DEFAULT_N, DEFAULT_STEPS, SamplingLoop, to_uint8
from .samplers import SAMPLERS
from .text2image import Text2Image

EXIT_USER_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 130, 143


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that cleanups (temporary folders) run."""


def run_main(prog: str, body, errors: tuple[type[BaseException], ...] = (DmRuntimeError,),
             interrupted: str = "interrupted; nothing was written") -> int:
    """``body()``'s exit code; an error in ``errors`` prints ``prog: error: ...`` and gives 2,
    Ctrl-C prints ``prog: <interrupted>`` and gives 130, SIGTERM the same with 143 (each one line,
    after the temporaries are removed)."""
    def on_term(signum, frame):
        raise Terminated()

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_term) if main_thread else None
    try:
        return body()
    except errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _end_line()
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        _end_line()
        print(f"{prog}: terminated (SIGTERM); {interrupted.split('; ', 1)[-1]}", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _end_line() -> None:
    """A progress bar may hold the terminal's line: start a fresh one."""
    with contextlib.suppress(Exception):
        if sys.stderr.isatty():
            sys.stderr.write("\n")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dmruntime", description="Sample a dmcompile bundle (torch-free).")
    p.add_argument("bundle", help="bundle folder (dmcompile build -o ...)")
    p.add_argument("--version", action="version", version=f"dmruntime {__version__}")
    p.add_argument("-o", "--output", required=True, type=Path, help="grid.png, or samples.npy for the raw samples")
    p.add_argument("-n", type=int, default=None,
                   help=f"number of samples (default {DEFAULT_N}); with --prompt: images per prompt (default 1)")
    p.add_argument("--sampler", default=None, metavar="NAME",
                   help=f"{', '.join(SAMPLERS)}, or a diffusers scheduler class name (default: the one the bundle "
                   "was calibrated with)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampler steps (default: the bundle's calibration steps, else {DEFAULT_STEPS})")
    p.add_argument("--karras", action="store_true", default=None, help="Karras sigmas (dpmpp*, euler, unipc)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta in [0, 1]: 0 deterministic (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise, >= 0 (default 0)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"samples per UNet call (default {DEFAULT_BATCH}; TensorRT engines: their largest batch "
                        "profile, halved when guided)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="tensorrt bundles: cuda runs the TensorRT engines (default), cpu runs ONNX Runtime over "
                        "their ONNX (slow, a reference)")
    p.add_argument("--class", dest="class_label", type=int, default=None, metavar="K",
                   help="class-conditional bundles: sample class K")
    p.add_argument("--conditions", type=Path, default=None, metavar="FILE.npz",
                   help="conditioning arrays named by input (one row per sample)")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="text-to-image bundles: generate from this prompt (repeatable: one grid row per prompt)")
    p.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="with --prompt: the null branch of guidance (default: the empty prompt, or zeros where the "
                   "pipeline forces them: SDXL)")
    add_sdxl_options(p)
    p.add_argument("--guidance", type=float, default=None, metavar="S",
                   help="classifier-free guidance scale (default: the bundle's calibration scale, if any; with "
                        "--prompt else 7.5)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads, >= 0 (0: the runtime's default)")
    p.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                   help="openvino bundles: OpenVINO's compile cache (a second start imports instead of compiling)")
    return p


def check_output(path: Path) -> None:
    """Refuse an output that is not .png / .npy, in a folder that is missing or not writable, and
    to replace anything but a grid we wrote (PNG text tag); an .npy file carries no such mark, so
    an existing one is never replaced. Both command lines check -o with this, before any work."""
    path = Path(path)
    if path.suffix not in (".png", ".npy"):
        raise InputError(f"-o {path}: the output must end in .png (a grid) or .npy (the samples)")
    if not path.parent.is_dir():
        raise InputError(f"-o {path}: folder {path.parent} does not exist")
    try:
        probe = path.with_name(f".{path.name}.probe-{os.getpid()}")
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as e:
        raise InputError(f"-o {path}: cannot write in {path.parent} ({e.strerror or e}); choose another path") from None
    if not path.exists() and not path.is_symlink():
        return
    ours = path.is_file() and not path.is_symlink() and path.suffix == ".png" and png_software(path) == SOFTWARE
    if not ours:
        what = "an .npy file is never replaced" if path.suffix == ".npy" else "it is not a grid dmruntime wrote"
        raise InputError(f"{path} exists ({what}); refusing to overwrite it: choose another path or remove it yourself")


def default_batch(bundle: Bundle, guided: bool) -> int:
    """64 samples per call, or what the engines' largest batch holds (TensorRT's profiles)."""
    limit = getattr(bundle.engine(bundle.groups[0].engine), "max_batch", None)  # as the engines were built
    if limit:
        return max(1, limit // (2 if guided else 1))
    return DEFAULT_BATCH


def write_samples(path: Path, images: np.ndarray, cols: int | None = None, native: bool = False) -> None:
    """A PNG grid of ``images`` ([-1, 1]; ``cols`` columns, default about square; ``native``: at
    the images' own resolution, one image without a border), or the float32 samples for ``.npy``,
    written whole (a temporary name, then a rename)."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}.npy")
            try:
                np.save(tmp, images.astype(np.float32))
                tmp.replace(path)
            finally:
                tmp.unlink(missing_ok=True)
        else:
            kw = {"scale": 1, "pad": 0 if len(images) == 1 else 2} if native else {}
            write_png(path, grid(to_uint8(images), cols=cols, **kw))
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}; choose another path") from None


def add_sdxl_options(p: argparse.ArgumentParser) -> None:
    """The prompt options of pipelines with two text encoders and size conditioning (SDXL)."""
    p.add_argument("--prompt-2", action="append", default=None, metavar="TEXT",
                   help="with --prompt, SDXL bundles: the second text encoder's prompt, one per --prompt (default: "
                   "the same)")
    p.add_argument("--negative-prompt-2", default=None, metavar="TEXT",
                   help="with --prompt, SDXL bundles: the second encoder's negative prompt (default: --negative-prompt)")
    p.add_argument("--original-size", type=float, nargs=2, default=None, metavar=("H", "W"),
                   help="with --prompt, SDXL bundles: time_ids' original size (default: the bundle's resolution)")
    p.add_argument("--crop-top-left", type=float, nargs=2, default=None, metavar=("TOP", "LEFT"),
                   help="with --prompt, SDXL bundles: time_ids' crop coordinates (default 0 0)")
    p.add_argument("--target-size", type=float, nargs=2, default=None, metavar=("H", "W"),
                   help="with --prompt, SDXL bundles: time_ids' target size (default: the bundle's resolution)")


def sdxl_options(args) -> dict:
    """Text2Image.generate's keywords from ``add_sdxl_options``'s; InputError when given without --prompt."""
    given = {"prompts_2": args.prompt_2, "negative_prompt_2": args.negative_prompt_2,
             "original_size": args.original_size, "crops_coords_top_left": args.crop_top_left,
             "target_size": args.target_size}
    if not args.prompt and any(v is not None for v in given.values()):
        flags = {"prompts_2": "--prompt-2", "negative_prompt_2": "--negative-prompt-2", "original_size": "--original-size",
                 "crops_coords_top_left": "--crop-top-left", "target_size": "--target-size"}
        raise InputError(f"{', '.join(flags[k] for k, v in given.items() if v is not None)} go(es) with --prompt")
    return {k: v for k, v in given.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_main("python -m dmruntime", lambda: _sample(args))


def _sample(args) -> int:
    check_output(args.output)
    bundle = Bundle.open(args.bundle, threads=args.threads, device=args.device, cache_dir=args.cache_dir)
    if args.prompt:
        return _generate(args, bundle)
    sdxl_options(args)
    if args.negative_prompt is not None:
        raise InputError("--negative-prompt goes with --prompt")
    if "text" in bundle.components and args.conditions is None:
        raise InputError(f"{args.bundle} is a text-to-image bundle: pass --prompt TEXT (or its embeddings with "
                         "--conditions FILE.npz)")
    n = DEFAULT_N if args.n is None else args.n
    cond = None
    if args.class_label is not None and args.conditions is not None:
        raise InputError("pass either --class or --conditions, not both")
    if args.class_label is not None:
        cond = {"class_labels": np.asarray(args.class_label, np.int64)}
    elif args.conditions is not None:
        cond, _, _ = read_conditions(args.conditions, bundle.conditioning)
    guidance = args.guidance
    if guidance is None:
        guidance = (bundle.manifest.get("conditioning") or {}).get("calibration_guidance_scale")
    batch = args.batch_size if args.batch_size is not None else default_batch(bundle, guidance is not None)
    loop = SamplingLoop(bundle, args.sampler, batch_size=batch, guidance_scale=guidance, steps=args.steps,
                        karras=args.karras, eta=args.eta)
    t0 = time.perf_counter()
    images = loop.sample(n, seed=args.seed, cond=cond, progress=Progress("auto", label=loop.choice.name))
    if bundle.decoder is not None:
        images = bundle.decode(images)
    seconds = time.perf_counter() - t0
    write_samples(args.output, images)
    print(f"wrote {args.output}: {n} samples, {loop.choice.describe()}, seed {args.seed} ({seconds:.2f} s)")
    return 0


def _generate(args, bundle: Bundle) -> int:
    """--prompt: n images per prompt, one grid row per prompt, at the pipeline's resolution."""
    if args.class_label is not None or args.conditions is not None:
        raise InputError("--prompt replaces --class and --conditions: pass one or the other")
    n = 1 if args.n is None else args.n
    pipe = Text2Image(bundle, args.sampler, steps=args.steps, karras=args.karras, eta=args.eta,
                      guidance_scale=args.guidance, batch_size=args.batch_size or DEFAULT_BATCH,
                      negative_prompt=args.negative_prompt)
    loop = pipe.loop()
    t0 = time.perf_counter()
    images = pipe.generate(args.prompt, n=n, seed=args.seed, progress=Progress("auto", label=loop.choice.name),
                           **sdxl_options(args))
    seconds = time.perf_counter() - t0
    write_samples(args.output, images, cols=n, native=True)
    guided = f", guidance {loop.guidance_scale:g}" if loop.guidance_scale is not None else ""
    print(f"wrote {args.output}: {len(images)} image(s) of {images.shape[2]}x{images.shape[3]} for {len(args.prompt)} "
          f"prompt(s), {loop.choice.describe()}{guided}, seed {args.seed} ({seconds:.2f} s)")
    return 0
