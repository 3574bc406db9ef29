"""Calibration shards and RD probes as Ray tasks (``--ray``): serial against a local Ray cluster in
one process (speedup, overhead, the results compared bit for bit), and, with ``--per-task``, one
task's time and data for a model, projected to clusters of N nodes.

    python benchmarks/bench_ray.py --model ddpm-cifar10-32                 # serial vs 2 workers
    python benchmarks/bench_ray.py --model sd15-unet --per-task            # one shard, one probe batch

Compare: the export is cached once; each variant then calibrates and measures RD curves from an
empty calibration / RD cache, variants interleaved (serial, ray, serial, ray, ...), medians.
Per task: one calibration shard of one trajectory, one weight-probe batch and one activation-probe
batch on this machine, the bytes a worker receives and returns; the projection's assumptions are
printed with it.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import cpu_line


def _configs(args):
    from dmcompile.config import AnalysisConfig, CalibrationConfig

    cal = CalibrationConfig(size=args.calib_size, steps=args.calib_steps, groups=args.groups,
                            batch_size=args.calib_batch)
    ana = AnalysisConfig(samples_per_group=args.rd_samples, sweep=args.sweep, rounding=args.rounding)
    return cal, ana


def compare(args) -> None:
    from dmcompile import api, parallel

    cal, ana = _configs(args)
    cache = Path(args.work) / "cache"
    os.environ["DMCOMPILE_CACHE"] = str(cache)
    t0 = time.perf_counter()
    api.fp_bundle(args.model)
    print(f"export (cached for all variants): {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    pool = parallel.RayPool(parallel.LOCAL, workers=args.workers)
    start = time.perf_counter() - t0
    print(f"Ray local cluster of {pool.workers} workers started in {start:.1f} s", flush=True)
    times = {"serial": {"calibration": [], "rd": []}, "ray": {"calibration": [], "rd": []}}
    results = {}
    for r in range(args.repeats):
        for name, ray in (("serial", None), ("ray", parallel.LOCAL)):
            for sub in ("calib", "rd"):
                shutil.rmtree(cache / sub, ignore_errors=True)
            t0 = time.perf_counter()
            calib = api.calibrate(args.model, cal, progress=None, ray=ray)
            t1 = time.perf_counter()
            curves = api.analyze(args.model, ana, cal, progress=None, ray=ray)
            t2 = time.perf_counter()
            times[name]["calibration"].append(t1 - t0)
            times[name]["rd"].append(t2 - t1)
            results[name] = (calib, curves)
            print(f"  round {r}: {name:6s} calibration {t1 - t0:7.1f} s, RD curves {t2 - t1:7.1f} s", flush=True)
    pool.close()
    (c1, r1), (c2, r2) = results["serial"], results["ray"]
    same = all(np.array_equal(c1.observers[g][n].hist, c2.observers[g][n].hist) for g in range(len(c1.observers))
               for n in c1.tensors) and np.array_equal(r1.weight, r2.weight) and np.array_equal(r1.act, r2.act)
    print(f"\nresults bit-identical serial vs ray: {same}")
    print(f"calibration: {cal.size} trajectories x {cal.steps} steps in shards of {cal.batch_size} "
          f"({-(-cal.size // cal.batch_size)} tasks); RD: {len(r1.layers)} layers x {len(r1.weight_bits)} widths + "
          f"{len(r1.tensors)} tensors x {len(r1.act_bits)} widths, {ana.samples_per_group} inputs per group, "
          f"{ana.sweep} sweep")
    print("| stage | serial s | ray s | serial / ray |\n|---|---|---|---|")
    for stage in ("calibration", "rd"):
        a, b = statistics.median(times["serial"][stage]), statistics.median(times["ray"][stage])
        print(f"| {stage} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    print(f"(cluster start {start:.1f} s, once per process, not in the table)")


def per_task(args) -> None:
    from dmcompile import api, stages
    from dmcompile.analysis.rd import _payload, _Rows, flat_rows, job_batches, run_batch
    from dmcompile.calibration.trajectory import CalibrationResult

    cal, ana = _configs(args)
    fp = api.fp_bundle(args.model)
    for old in Path(stages.cache_dir(), "calib").glob(f"{fp.name}-*"):
        shutil.rmtree(old)  # time the shard, not the cache
    t0 = time.perf_counter()
    calib = api.calibrate(args.model, cal, progress=None)  # one shard (cal.size <= cal.batch_size), its session built
    shard_s = time.perf_counter() - t0
    saved = next(Path(stages.cache_dir(), "calib").glob(f"{fp.name}-*/calibration.json")).parent
    shard_bytes = (saved / "histograms.npz").stat().st_size
    print(f"calibration shard ({cal.size} trajectory x {cal.steps} steps, {len(calib.tensors)} tensors): {shard_s:.1f} s, "
          f"its histograms {shard_bytes / 1e6:.1f} MB compressed", flush=True)
    assert isinstance(calib, CalibrationResult)
    from dmcompile.calibration.hessian import layer_columns

    cols = layer_columns(stages.load_graph(fp), stages.load_layer_map(fp).layers)
    moment_bytes = sum(4 * c.n * c.n for c in cols.values())
    print(f"with GPTQ a shard also writes its second-moment sums: {moment_bytes / 1e9:.2f} GB per scope (pooled, "
          "and one per group with per-group weights), read back by the driver to fold", flush=True)
    import dataclasses

    ana = dataclasses.replace(ana, rounding="rtn")  # the probes' time does not depend on the rounding (driver side)
    t0 = time.perf_counter()
    probe, X, T, C, _ = stages.probe_inputs(fp, stages.ORT_CPU.layer_input_tensors, calib, ana)
    inputs_s = time.perf_counter() - t0
    G, n = X.shape[:2]
    x, t, c = X.reshape(G * n, *X.shape[2:]), T.reshape(-1), flat_rows(C)
    w0 = probe.layers[0].weight
    ref_w = probe.run(x, t, {w0: probe.weights[w0]}, cond=c)  # also builds the sessions (not timed below)
    off = (np.ones(len(x), np.float32), np.zeros(len(x), np.float32), np.full(len(x), 255.0, np.float32),
           np.zeros(len(x), np.float32))
    ref_a = probe.run(x, t, acts={probe.tensors[0]: off}, cond=c)
    rows = _Rows(x, t, c, G, n, ref_w.reshape(G, n, *ref_w.shape[1:]), ref_a.reshape(G, n, *ref_a.shape[1:]),
                 ana.distortion, ana.max_rows, False)
    jobs = [("w", 0, len(ana.weight_bits) - 1), *(("a", i, 0) for i in range(len(probe.tensors)))]
    batches = job_batches(jobs, max(1, ana.max_rows // (G * n)))
    ranges = {b: calib.ranges(bits=b) for b in ana.act_bits}
    timing = {}
    for kind, batch in (("weight", batches[0]), ("activation", batches[1])):
        payload = _payload(probe, batch, ranges, tuple(ana.weight_bits), tuple(ana.act_bits), G, n, False)
        t0 = time.perf_counter()
        out = run_batch((probe, rows), payload)
        timing[kind] = (time.perf_counter() - t0, len(pickle.dumps(payload)), len(pickle.dumps(out)), len(batch))
        print(f"{kind} probe batch ({len(batch)} jobs): {timing[kind][0]:.2f} s, payload {timing[kind][1] / 1e6:.2f} MB, "
              f"result {timing[kind][2]} bytes", flush=True)
    shipped = probe.for_workers()
    shared = len(pickle.dumps((shipped, rows)))
    print(f"group inputs from fp32 trajectories (driver, once): {inputs_s:.1f} s; shared object per worker "
          f"{shared / 1e6:.1f} MB ({'graph by path' if shipped.fp is None else 'graph inside'})")
    L, A = len(probe.layers), len(probe.tensors)
    w_jobs = L * (len(ana.model_bits) if ana.sweep == "model" else len(ana.weight_bits))
    a_batches = -(-A * len(ana.act_bits) // max(1, ana.max_rows // (G * n)))
    shards = -(-args.full_size // args.full_batch)
    shard_full = shard_s * args.full_batch / cal.size * args.full_steps / cal.steps
    work = shards * shard_full, w_jobs * timing["weight"][0], a_batches * timing["activation"][0]
    print(f"\nprojection for calibration {args.full_size} trajectories x {args.full_steps} steps in shards of "
          f"{args.full_batch} ({shards} tasks of {shard_full:.0f} s) and RD curves of {w_jobs} weight jobs and "
          f"{a_batches} activation batches ({args.rd_samples} inputs per group x {G} groups):")
    print("assumptions: one worker per node, each as fast as this machine's 2 cores; tasks of a stage spread evenly; "
          f"each node receives the shared object once at {args.bandwidth_gbs} GB/s; the driver's own work (group "
          f"inputs {inputs_s:.0f} s, GPTQ rounding of each weight feed, folding) stays serial and is not divided.")
    print("| nodes | calibration | RD curves | total |\n|---|---|---|---|")
    for N in (1, 8, 32, 128):
        ship = shared / (args.bandwidth_gbs * 1e9)
        calib_t = -(-shards // N) * shard_full
        rd_t = ship + inputs_s + (-(-w_jobs // N)) * timing["weight"][0] + (-(-a_batches // N)) * timing["activation"][0]
        print(f"| {N} | {calib_t / 3600:.2f} h | {rd_t / 3600:.2f} h | {(calib_t + rd_t) / 3600:.2f} h |")
    print(f"(serial work: calibration {work[0] / 3600:.2f} h, weight probes {work[1] / 3600:.2f} h, activation probes "
          f"{work[2] / 3600:.2f} h)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ddpm-cifar10-32")
    p.add_argument("--work", default=tempfile.gettempdir() + "/dmcompile-ray")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--calib-size", type=int, default=16)
    p.add_argument("--calib-batch", type=int, default=4)
    p.add_argument("--calib-steps", type=int, default=20)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--rd-samples", type=int, default=4)
    p.add_argument("--sweep", default="model", choices=("full", "model"))
    p.add_argument("--rounding", default="rtn", choices=("rtn", "gptq"),
                   help="rtn (default): GPTQ's rounding runs on the driver either way, and its second moments "
                   "double the calibration's work")
    p.add_argument("--per-task", action="store_true", help="one task's time and data, projected to N nodes")
    p.add_argument("--full-size", type=int, default=64, help="projection: calibration trajectories")
    p.add_argument("--full-batch", type=int, default=1, help="projection: trajectories per shard")
    p.add_argument("--full-steps", type=int, default=50, help="projection: calibration steps")
    p.add_argument("--bandwidth-gbs", type=float, default=1.0, help="projection: GB/s to each node")
    args = p.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    print(cpu_line(), flush=True)
    (per_task if args.per_task else compare)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
