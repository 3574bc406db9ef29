"""TensorRT on an NVIDIA GPU: a bundle's per-group INT8 engines against one FP16 engine of the
same model, with and without CUDA graphs, in one process, interleaved; medians and ratios.

    dmcompile build digits16 --target tensorrt -o build/trt-d16      # anywhere
    python -m dmruntime.tensorrt.build build/trt-d16                 # on the GPU machine
    python benchmarks/bench_tensorrt.py build/trt-d16 [--batch 1 8] [--repeats 50] [--steps 50]

Prints, per batch size: per-call latency (one UNet call: copy in, the engine, copy out) of
INT8-graph, INT8-direct, FP16-graph, FP16-direct; a full DDIM sampling run with each (CUDA
graphs on); BOPs of the bundle against FP16 (MACs x 16 x 16); GPU memory: plan bytes, the shared
activation buffer, and the drop in free device memory when each engine set loads.

The FP16 baseline is the bundle's own fp32 export typed FP16 by the same pass as the engines
(``dmcompile.lowering.fp16``) and built with the same profiles and timing cache: the one
difference is the quantization. Needs dmcompile, dmruntime[tensorrt] and a GPU; it has never run
in this project's environment (no TensorRT builder installable there, no GPU lent to the issue).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def interleaved(fns: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved (one of each per round) so that
    clock and thermal drift hit every variant alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()  # predict() ends with a synchronous copy out: the call is finished
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def make_gpu():
    """The GPU (tests replace this and make_builder with fakes)."""
    from dmruntime.tensorrt.gpu import CudaGpu

    return CudaGpu()


def make_builder():
    from dmruntime.tensorrt.build import TrtBuilder

    return TrtBuilder()


def fp16_engine(gpu, bundle, sizes, cuda_graphs: bool):
    """The fp32 export of ``bundle``'s model typed FP16 and built like the bundle's engines."""
    from dmruntime.tensorrt.record import io_specs
    from dmruntime.tensorrt.runtime import TensorRTEngines

    from dmcompile import onnxio, stages
    from dmcompile.lowering.fp16 import to_float16
    from dmcompile.lowering.qdq import to_opset

    fp = stages.fp_bundle(stages.reference_model(bundle))  # the bundle's fp32 export (cached)
    with tempfile.TemporaryDirectory() as tmp:
        model = to_float16(to_opset(onnxio.load(fp / "model.onnx"), 21))
        onnxio.save(model, Path(tmp) / "fp16.onnx")
        del model
        profiles = [{s.name: s.shape for s in io_specs(bundle.sample_shape, bundle.conditioning, b)[0]} for b in sizes]
        cache = (bundle.root / "tensorrt" / "timing.cache")
        plan, _ = make_builder().build(Path(tmp) / "fp16.onnx", profiles, cache.read_bytes() if cache.is_file() else b"")
    engines = TensorRTEngines(gpu, {"fp16": gpu.load(plan)}, sizes, bundle.sample_shape, bundle.conditioning,
                              cuda_graphs)
    return engines, len(plan)


def engine_bops(manifest: dict, group: int = 0) -> int:
    """BOPs per sample of a tensorrt bundle's engine as it runs: int8 layers at weight x 8 bits,
    INT4 weight-only layers at 4 x 16 (FP16 activations), float layers at 16 x 16 (FP16), unlike
    the manifest's BOPs, which count float at 32 bits on every target."""
    total = 0
    for l in manifest["precision"]["layers"]:
        wb = l["weight_bits"][group] if l.get("weight_bits") else None
        if wb is None or wb == 32 or not l.get("activation_bits"):
            total += l["macs"] * 16 * 16
        elif group in l.get("weight_only_groups", []):
            total += l["macs"] * wb * 16
        else:
            total += l["macs"] * wb * l["activation_bits"]
    return total


class Fp16Model:
    """The FP16 engine with a Bundle's sampling interface (schedule, predict), no correction."""

    def __init__(self, bundle, engines):
        self.schedule, self.sample_shape, self.conditioning = bundle.schedule, bundle.sample_shape, bundle.conditioning
        self.engines = engines

    def predict(self, x, t, cond=None):
        return self.engines.predict("fp16", x, t, cond)

    def residual_variance(self, t, ndim):
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path, help="a tensorrt bundle whose engines are built on this machine")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="UNet call batch sizes (default 1 8)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the sampling run")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    from dmruntime import Bundle, DDIMSampler
    from dmruntime.errors import DmRuntimeError
    from dmruntime.tensorrt import runtime as trt_runtime
    from dmruntime.tensorrt.runtime import TensorRTEngines

    try:
        gpu = make_gpu()
        free0, total = gpu.memory_info()
        trt_runtime.default_gpu = lambda: gpu  # the bundle's engines on this same device and stream
        bundle = Bundle.open(args.bundle)  # TensorRT engines, CUDA graphs
        free1, _ = gpu.memory_info()
        direct = TensorRTEngines.load(bundle.root, bundle.manifest, bundle.sample_shape, bundle.conditioning, gpu=gpu,
                                      cuda_graphs=False)
    except DmRuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    int8 = bundle.engine(bundle.groups[0].engine).engines
    sizes = int8.batch_sizes
    free2, _ = gpu.memory_info()
    fp16_graph, fp16_plan_bytes = fp16_engine(gpu, bundle, sizes, True)
    free3, _ = gpu.memory_info()
    fp16_direct, _ = fp16_engine(gpu, bundle, sizes, False)
    record = json.loads((bundle.root / "tensorrt" / "engines.json").read_text())
    print(f"GPU: {gpu.device['name']} (compute capability {gpu.device['compute_capability']}, "
          f"{total / 2**30:.1f} GiB); TensorRT {gpu.tensorrt_version}; bundle {args.bundle} "
          f"({len(record['plans'])} engines, batch profiles {sizes})")
    macs = sum(l["macs"] for l in bundle.manifest["precision"]["layers"])
    bops_fp16, bops_int8 = macs * 16 * 16, engine_bops(bundle.manifest)
    print(f"BOPs per sample: bundle {bops_int8 / 1e9:.2f} G (group 0; FP16 layers at 16 x 16) vs FP16 "
          f"{bops_fp16 / 1e9:.2f} G: {bops_fp16 / bops_int8:.2f}x fewer")
    plan_bytes = sum(p["bytes"] for p in record["plans"].values())
    print(f"GPU memory: INT8 plans {plan_bytes / 1e6:.1f} MB ({len(record['plans'])} engines, a weight copy each), "
          f"FP16 plan {fp16_plan_bytes / 1e6:.1f} MB; activation buffer INT8 {int8.activation_bytes / 1e6:.1f} MB, "
          f"FP16 {fp16_graph.activation_bytes / 1e6:.1f} MB; free memory dropped {(free0 - free1) / 1e6:.0f} MB "
          f"loading the INT8 set, {(free2 - free3) / 1e6:.0f} MB loading FP16")
    results = {"device": gpu.device, "tensorrt": gpu.tensorrt_version, "batch_profiles": sizes, "calls": {},
               "bops": {"int8": bops_int8, "fp16": bops_fp16},
               "runs": {}, "plan_bytes": {"int8": plan_bytes, "fp16": fp16_plan_bytes}}
    name = bundle.groups[0].engine
    rng = np.random.default_rng(0)
    for b in args.batch:
        x = rng.standard_normal((b, *bundle.sample_shape)).astype(np.float32)
        cond = None
        if bundle.conditioning:
            cond = bundle.conditioning.check(bundle.conditioning.null, b) if bundle.conditioning.null else None
        fns = {"int8 graph": lambda: int8.predict(name, x, 500, cond),
               "int8 direct": lambda: direct.predict(name, x, 500, cond),
               "fp16 graph": lambda: fp16_graph.predict("fp16", x, 500, cond),
               "fp16 direct": lambda: fp16_direct.predict("fp16", x, 500, cond)}
        med = interleaved(fns, args.repeats)
        results["calls"][b] = med
        print(f"batch {b}: per call " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in med.items())
              + f"; INT8/FP16 {med['int8 graph'] / med['fp16 graph']:.2f}x (graphs), "
              f"{med['int8 direct'] / med['fp16 direct']:.2f}x (direct); graph/direct INT8 "
              f"{med['int8 graph'] / med['int8 direct']:.2f}x")
        guided = bundle.conditioning.null is not None and b % 2 == 0
        kw = {"guidance_scale": 3.0} if guided else {}
        n = b // 2 if guided else b
        c = {k: v[:n] for k, v in cond.items()} if cond else None
        runs = {"int8": lambda: DDIMSampler(bundle, steps=args.steps, batch_size=n, **kw).sample(n, cond=c),
                "fp16": lambda: DDIMSampler(Fp16Model(bundle, fp16_graph), steps=args.steps, batch_size=n,
                                            null_cond=bundle.conditioning.null, **kw).sample(n, cond=c)}
        med = interleaved(runs, max(3, args.repeats // 10), warmup=1)
        results["runs"][b] = med
        print(f"batch {b}: {args.steps}-step run int8 {med['int8'] * 1e3:.1f} ms, fp16 {med['fp16'] * 1e3:.1f} ms: "
              f"INT8/FP16 {med['int8'] / med['fp16']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
