"""Build a bundle's TensorRT engines on the machine that will run them:

    python -m dmruntime.tensorrt.build BUNDLE [--batch-sizes 1 2 4 8]

One serialized engine (plan) per engine ONNX of the bundle (a timestep group each), from a
strongly typed network (the ONNX carries its FP16 / INT8 / INT4 types: no precision flags),
one static optimization profile per batch size (min = opt = max: what a CUDA graph needs), a
timing cache shared by all engines (kept for the next build). Written to ``BUNDLE/tensorrt/``
through a temporary folder, with ``engines.json`` recording the TensorRT version, the GPU, the
batch sizes and each plan's sha256; the runtime refuses plans built elsewhere.

The builder calls (``TrtBuilder``) follow TensorRT 10's Python API and have never run in this
project's environment (no TensorRT builder installable there).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..bundle import MANIFEST, validate_manifest
from ..conditioning import Conditioning
from ..errors import BundleError, InputError
from .record import (ENGINES_RECORD, PLANS_FOLDER, RECORD_KIND, RECORD_SCHEMA_VERSION, io_specs, manifest_entry, plan_name)

TIMING_CACHE = "timing.cache"


class TrtBuilder:
    """TensorRT's builder on this machine's GPU (the only code here that calls it)."""

    def __init__(self, workspace_bytes: int | None = None):
        from .gpu import CudaGpu, import_tensorrt

        self.trt = import_tensorrt()
        gpu = CudaGpu()  # the device the plans are for; fails clearly without a GPU
        self.device, self.tensorrt_version = gpu.device, gpu.tensorrt_version
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.builder = self.trt.Builder(self.logger)
        self.workspace_bytes = workspace_bytes

    def build(self, onnx_path: Path, profiles: list[dict[str, tuple]], timing_cache: bytes) -> tuple[bytes, bytes]:
        """(plan, updated timing cache) of one ONNX file."""
        trt = self.trt
        network = self.builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):  # reads external data next to the file
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BundleError(f"TensorRT's ONNX parser refused {onnx_path.name}: {errors}")
        config = self.builder.create_builder_config()
        if self.workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        cache = config.create_timing_cache(timing_cache)
        config.set_timing_cache(cache, False)
        for shapes in profiles:
            profile = self.builder.create_optimization_profile()
            for name, shape in shapes.items():
                profile.set_shape(name, shape, shape, shape)
            config.add_optimization_profile(profile)
        plan = self.builder.build_serialized_network(network, config)
        if plan is None:
            raise BundleError(f"TensorRT could not build an engine from {onnx_path.name} (see its log above)")
        return bytes(plan), bytes(config.get_timing_cache().serialize())


def check_plans_folder(out: Path) -> None:
    """Refuse to replace a folder that is not an earlier engine build of ours."""
    if not out.exists():
        return
    record = out / ENGINES_RECORD
    try:
        ours = out.is_dir() and json.loads(record.read_text()).get("kind") == RECORD_KIND
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise InputError(f"{out} exists and is not an engine build of dmruntime (no {ENGINES_RECORD} of ours); "
                         "move it away, nothing was changed")


def build_engines(root: str | Path, batch_sizes: list[int] | None = None, *, builder=None, progress=None,
                  workspace_bytes: int | None = None) -> dict:
    """Build every engine of the bundle at ``root`` into ``root/tensorrt/``; returns the record.
    ``builder``: an object with TrtBuilder's ``build``, ``device`` and ``tensorrt_version``
    (default: TensorRT on this machine's GPU)."""
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{root} is not a readable bundle ({e})") from None
    validate_manifest(manifest, root)
    entry = manifest_entry(manifest)
    sizes = sorted({int(b) for b in (batch_sizes or entry["batch_sizes"])})
    if not sizes or sizes[0] < 1:
        raise InputError(f"batch sizes must be integers >= 1, got {batch_sizes}")
    out = root / PLANS_FOLDER
    check_plans_folder(out)
    builder = builder or TrtBuilder(workspace_bytes)  # after the checks: they need no GPU
    conditioning = Conditioning.from_manifest(manifest, root)
    sample_shape = manifest["model"]["sample_shape"]
    profiles = [{s.name: s.shape for s in io_specs(sample_shape, conditioning, b)[0]} for b in sizes]
    cache = (out / TIMING_CACHE).read_bytes() if (out / TIMING_CACHE).is_file() else b""
    tmp = Path(tempfile.mkdtemp(prefix=".tensorrt-", dir=root))
    try:
        plans = {}
        for i, onnx_file in enumerate(entry["onnx"]):
            plan, cache = builder.build(root / onnx_file, profiles, cache)
            name = plan_name(onnx_file)
            (tmp / Path(name).name).write_bytes(plan)
            plans[onnx_file] = {"plan": name, "sha256": hashlib.sha256(plan).hexdigest(), "bytes": len(plan)}
            if progress:
                progress(i + 1, len(entry["onnx"]))
        (tmp / TIMING_CACHE).write_bytes(cache)
        record = {"kind": RECORD_KIND, "schema_version": RECORD_SCHEMA_VERSION,
                  "tensorrt_version": builder.tensorrt_version, "device": builder.device,
                  "manifest_sha256": hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest(),
                  "batch_sizes": sizes, "profiles": [{k: list(v) for k, v in p.items()} for p in profiles],
                  "strongly_typed": True, "plans": plans, "timing_cache": TIMING_CACHE}
        (tmp / ENGINES_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        old = None
        if out.exists():  # ours (checked above): swapped out, then removed
            old = root / f".tensorrt-old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dmruntime.tensorrt.build",
                                description="Build a dmcompile tensorrt bundle's engines on this GPU machine.")
    p.add_argument("bundle")
    p.add_argument("--batch-sizes", type=int, nargs="+", metavar="B",
                   help="engine batch sizes, one static profile each (default: the manifest's; guided sampling "
                        "runs 2 x the sample batch per call)")
    p.add_argument("--workspace-gb", type=float, help="TensorRT's workspace limit (default: TensorRT's)")
    args = p.parse_args(argv)
    try:
        record = build_engines(args.bundle, args.batch_sizes,
                               workspace_bytes=int(args.workspace_gb * 2**30) if args.workspace_gb else None,
                               progress=lambda i, n: print(f"engine {i}/{n} built", file=sys.stderr))
    except (BundleError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"built {len(record['plans'])} engines for batch sizes {record['batch_sizes']} with TensorRT "
          f"{record['tensorrt_version']} on {record['device']['name']} into {Path(args.bundle) / PLANS_FOLDER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
