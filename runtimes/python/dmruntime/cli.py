"""``python -m dmruntime``: sample a bundle where only the runtime is installed (a board, the
runtime container). Writes a PNG grid, or the raw float32 samples with ``.npy``.

    python -m dmruntime BUNDLE -n 16 -o grid.png [--steps 50] [--eta 0] [--seed 0]
                        [--batch-size 64] [--class K | --conditions FILE.npz] [--guidance S] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .conditioning import read_conditions
from .errors import DmRuntimeError, InputError
from .png import SOFTWARE, grid, png_software, write_png
from .sampler import DDIMSampler, to_uint8


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dmruntime", description="Sample a dmcompile bundle (torch-free).")
    p.add_argument("bundle", help="bundle folder (dmcompile build -o ...)")
    p.add_argument("-o", "--output", required=True, type=Path, help="grid.png, or samples.npy for the raw samples")
    p.add_argument("-n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples per UNet call (default 64; TensorRT engines: their largest batch profile, halved "
                        "when guided)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="tensorrt bundles: cuda runs the TensorRT engines (default), cpu runs ONNX Runtime over "
                        "their ONNX (slow, a reference)")
    p.add_argument("--class", dest="class_label", type=int, default=None, metavar="K",
                   help="class-conditional bundles: sample class K")
    p.add_argument("--conditions", type=Path, default=None, metavar="FILE.npz",
                   help="conditioning arrays named by input (one row per sample)")
    p.add_argument("--guidance", type=float, default=None, metavar="S",
                   help="classifier-free guidance scale (default: the bundle's calibration scale, if any)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    return p


def check_output(path: Path) -> None:
    """Refuse to replace anything but a grid we wrote (PNG text tag); an .npy file carries no
    such mark, so an existing one is never replaced."""
    if path.suffix not in (".png", ".npy"):
        raise InputError(f"-o {path}: the output must end in .png (a grid) or .npy (the samples)")
    if not path.exists() and not path.is_symlink():
        if not path.parent.is_dir():
            raise InputError(f"-o {path}: folder {path.parent} does not exist")
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
    return 64


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        check_output(args.output)
        bundle = Bundle.open(args.bundle, threads=args.threads, device=args.device)
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
        batch = args.batch_size or default_batch(bundle, guidance is not None)
        sampler = DDIMSampler(bundle, steps=args.steps, eta=args.eta, batch_size=batch, guidance_scale=guidance)
        t0 = time.perf_counter()
        images = sampler.sample(args.n, seed=args.seed, cond=cond)
        if bundle.decoder is not None:
            images = bundle.decode(images)
        seconds = time.perf_counter() - t0
    except DmRuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output.suffix == ".npy":
        tmp = args.output.with_name(args.output.name + ".tmp.npy")
        np.save(tmp, images.astype(np.float32))
        tmp.replace(args.output)
    else:
        write_png(args.output, grid(to_uint8(images)))
    print(f"wrote {args.output}: {args.n} samples, DDIM {args.steps} steps, eta {args.eta}, seed {args.seed} "
          f"({seconds:.2f} s)")
    return 0
