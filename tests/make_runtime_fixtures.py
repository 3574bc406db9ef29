"""Build the bundles that the runtime's own tests (runtimes/python/tests) sample, and their reference
samples, from the tiny seeded UNet of conftest.py:

    .venv/bin/python tests/make_runtime_fixtures.py runtimes/python/tests/data

``tiny-w8a8`` (2 timestep groups) and ``tiny-w4`` (4-bit weights stored packed, first and last
conv 8-bit, 2 groups), plus ``reference.npz``: what this machine's runtime samples from each
(REFERENCE_SAMPLES samples, REFERENCE_STEPS DDIM steps, seed 0) and what the fp32 export samples
(``fp32``), the images another machine (an ARM board, an emulated aarch64) compares its own
samples with. tests/test_runtime_fixtures.py
checks that the committed copies still agree with what the compiler builds now.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

FIXTURES = {"tiny-w8a8": {}, "tiny-w4": {"weight_bits": "*=4,first_conv=8,last_conv=8"}}
REFERENCE_SAMPLES, REFERENCE_STEPS = 4, 10
# Files the runtime does not read: left out to keep the committed fixtures small.
SKIP = ("samples.png", "fp_samples.png", "eval.json", "bits.png")


def build_fixtures(out: Path, work: Path) -> None:
    """Write the fixture bundles and reference.npz into ``out`` (which must not exist)."""
    from conftest import make_unet_folder
    from dmruntime import Bundle, DDIMSampler

    from dmcompile import api
    from dmcompile.config import BuildConfig, CalibrationConfig, MixedRecipe, W8A8Recipe, parse_overrides

    model = make_unet_folder(work / "unet")
    calib = CalibrationConfig(size=4, steps=6, groups=2, batch_size=4)
    staging = work / "fixtures"
    staging.mkdir()
    refs = {}
    for name, kw in FIXTURES.items():
        recipe = MixedRecipe(overrides=parse_overrides(kw["weight_bits"])) if kw else W8A8Recipe()
        built = api.build(str(model), work / name, BuildConfig(recipe=recipe, calibration=calib, eval_samples=0,
                                                             correction=False, seed=0, speed_check=False)).path
        shutil.copytree(built, staging / name, ignore=shutil.ignore_patterns(*SKIP))
        sampler = DDIMSampler(Bundle.open(staging / name), steps=REFERENCE_STEPS)
        refs[name] = sampler.sample(REFERENCE_SAMPLES, seed=0)
    # the full-precision samples (the fp32 export, same seeds): how close each machine gets
    refs["fp32"] = DDIMSampler(Bundle.open(api.fp_bundle(str(model))), steps=REFERENCE_STEPS).sample(
        REFERENCE_SAMPLES, seed=0)
    np.savez(staging / "reference.npz", **refs)
    (staging / "README.md").write_text(
        "Built by `tests/make_runtime_fixtures.py` on x86-64; do not edit by hand.\n"
        f"reference.npz: {REFERENCE_SAMPLES} samples per bundle and of the fp32 export (`fp32`), "
        f"{REFERENCE_STEPS} DDIM steps, seed 0.\n")
    staging.rename(out)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    out = Path(argv[0])
    if out.exists():
        if not (out / "reference.npz").is_file():
            print(f"error: {out} exists and is not a fixtures folder; pick another path", file=sys.stderr)
            return 2
        shutil.rmtree(out)  # our own earlier output: replaced
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        build_fixtures(out, Path(tmp))
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in out.iterdir() if p.is_dir()}
    print(json.dumps({"out": str(out), "bytes": sizes}))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main(sys.argv[1:]))
