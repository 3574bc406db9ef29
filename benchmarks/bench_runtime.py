"""Runtime-only benchmark of one or more bundles: what a deployment engineer measures on the target.

    python benchmarks/bench_runtime.py BUNDLE [--compare BUNDLE2 ...] [--batch 1 8] [--steps 50]
                                       [--repeats 20] [--runs 3] [--threads 0]

Imports only dmruntime, numpy, onnxruntime and the standard library (plus machine.py beside it), so
it runs on a board where only the runtime is installed (copy this file and machine.py). Prints, as
markdown: the machine (CPU model, cores, int8 features, onnxruntime version), then per bundle the size
on disk, average weight bits and BOPs per sample from the manifest, session creation (opening the
bundle and the first call of every engine), per-call latency (median, and the 10th-90th percentile
spread, calls interleaved between the bundles), a full sampling run (interleaved, median), and peak
resident memory of a fresh process that opens the bundle and samples once. Ratios are to the first
bundle. Under emulation (an aarch64 Python on an x86 host via qemu) the times mean nothing: the
output says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def emulated() -> bool:
    """An ARM Python on an x86 host (qemu user mode): qemu 7 passes the host's /proc/cpuinfo
    through, qemu 8+ makes up an ARM one but leaves /sys (the host's CPU modalias) alone;
    scripts/check_arm64.sh also says so in DMRUNTIME_EMULATED."""
    if os.environ.get("DMRUNTIME_EMULATED"):
        return True
    if platform.machine() not in ("aarch64", "arm64"):
        return False
    for path, x86 in (("/proc/cpuinfo", "vendor_id"), ("/sys/devices/system/cpu/modalias", "type:x86")):
        try:
            if x86 in Path(path).read_text():
                return True
        except OSError:
            pass
    return False


def manifest_figures(m: dict, root: Path) -> dict:
    """Size on disk, average weight bits (over weighted layers, group 0 .. last), BOPs per sample
    (an fp32 export has no precision record: its layer map's MACs at 32 x 32 bits)."""
    layers = m.get("precision", {}).get("layers", [])
    if not layers and (root / "layer_map.json").is_file():
        layers = [{"macs": l["macs"]} for l in json.loads((root / "layer_map.json").read_text())["layers"]]
    size = sum(f["bytes"] for f in m.get("files", {}).values())
    bops = [sum(x) for x in zip(*(l["bops"] for l in layers if l.get("bops")))] if layers else []
    fp32 = sum(l["macs"] * 32 * 32 for l in layers)
    weighted = [l for l in layers if l.get("weight_bits")]
    n = sum(l["params"] for l in weighted)
    avg = [sum(l["weight_bits"][g] * l["params"] for l in weighted) / n for g in range(len(weighted[0]["weight_bits"]))] \
        if weighted else []
    return {"bytes": size, "avg_bits": avg, "bops": bops, "bops_fp32": fp32, "format": m.get("format", "fp32"),
            "groups": len(m.get("groups", [])), "runtime": m.get("engine", {}).get("runtime", "onnxruntime")}


def _cond(bundle, n: int):
    return bundle.conditioning.dummy(n) if bundle.conditioning else None


CHILD = """
import json, resource, sys, time
from dmruntime import Bundle, DDIMSampler
path, batch, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
b = Bundle.open(path, threads=threads)
cond = b.conditioning.dummy(batch) if b.conditioning else None
DDIMSampler(b, steps=steps, batch_size=batch).sample(batch, seed=0, cond=cond)
# VmHWM: this process image's own peak. ru_maxrss is not: Linux carries the forking parent's
# peak across exec, so every child of a big benchmark process would report the parent's.
try:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
    peak = int(hwm) / 1024
except (OSError, IndexError):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_mb": peak}))
"""


def peak_memory(path: Path, batch: int, steps: int, threads: int) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(batch), str(steps), str(threads)],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--compare", type=Path, nargs="*", default=[])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=20, help="interleaved rounds of per-call timing")
    p.add_argument("--runs", type=int, default=3, help="interleaved full sampling runs")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: the runtime's default)")
    args = p.parse_args(argv)

    from dmruntime import Bundle, BundleError, DDIMSampler, ddim_timesteps
    from machine import cpu_line

    paths = [args.bundle, *args.compare]
    bundles, opened = {}, {}
    for path in paths:
        t0 = time.perf_counter()
        try:
            b = Bundle.open(path, threads=args.threads)
        except BundleError as e:
            print(f"bench_runtime: {e}", file=sys.stderr)
            return 2
        x = np.zeros((1, *b.sample_shape), np.float32)
        for g in b.groups:  # every engine's session is created on its first call
            b.predict(x, g.t_start, _cond(b, 1))
        opened[path] = time.perf_counter() - t0
        bundles[path] = b
    names = {p_: p_.name for p_ in paths}
    base = paths[0]
    calls, runs = {}, {}
    for batch in args.batch:
        x = np.random.default_rng(batch).standard_normal((batch, *bundles[base].sample_shape)).astype(np.float32)
        ts = [int(t) for t in ddim_timesteps(bundles[base].schedule, args.steps)]
        per = {p_: [] for p_ in paths}
        for r in range(args.repeats):
            t = ts[(r * 7) % len(ts)]
            for p_, b in bundles.items():
                cond = _cond(b, batch)
                b.predict(x, t, cond)  # the group's engine warm, switching excluded
                t0 = time.perf_counter()
                b.predict(x, t, cond)
                per[p_].append(time.perf_counter() - t0)
        full = {p_: [] for p_ in paths}
        for r in range(args.runs):
            for p_, b in bundles.items():
                t0 = time.perf_counter()
                DDIMSampler(b, steps=args.steps, batch_size=batch).sample(batch, seed=r, cond=_cond(b, batch))
                full[p_].append(time.perf_counter() - t0)
        calls[batch], runs[batch] = per, full
    peaks = {p_: peak_memory(p_, args.batch[-1], args.steps, args.threads) for p_ in paths}

    print(f"{cpu_line()}; Python {platform.python_version()}; threads {args.threads or 'default'}")
    if emulated():
        print("\n**Emulated (qemu user mode on another CPU): the times below mean nothing, and the resident memory "
              "includes the emulator's own; size, BOPs and bits hold.**")
    print(f"\n{args.repeats} interleaved rounds per call (group engine warm), {args.runs} interleaved {args.steps}-step "
          f"runs, medians; peak memory: a fresh process sampling {args.batch[-1]} once; ratios to {names[base]}\n")
    print("| bundle | format | runtime | groups | size on disk | avg weight bits | BOPs per sample (fp32 / it) | "
          "session creation s | peak resident MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p_ in paths:
        f = manifest_figures(bundles[p_].manifest, p_)
        bits = (f"{min(f['avg_bits']):.2f}-{max(f['avg_bits']):.2f}" if f["avg_bits"] and
                min(f["avg_bits"]) != max(f["avg_bits"]) else f"{f['avg_bits'][0]:.2f}" if f["avg_bits"] else "32 (fp32)")
        bops = f"{f['bops'][0] / 1e9:.3f} G ({f['bops_fp32'] / f['bops'][0]:.1f}x)" if f["bops"] else \
            f"{f['bops_fp32'] / 1e9:.3f} G (1.0x)"
        print(f"| {names[p_]} | {f['format']} | {f['runtime']} | {f['groups']} | {f['bytes'] / 1e6:.2f} MB | {bits} | "
              f"{bops} | {opened[p_]:.2f} | {peaks[p_]:.0f} |")
    print("\n| bundle | batch | ms per call (median) | p10-p90 ms | vs first | "
          f"{args.steps}-step run s | vs first |\n|---|---|---|---|---|---|---|")
    for batch in args.batch:
        c0 = statistics.median(calls[batch][base])
        r0 = statistics.median(runs[batch][base])
        for p_ in paths:
            c = np.array(calls[batch][p_]) * 1e3
            r = statistics.median(runs[batch][p_])
            print(f"| {names[p_]} | {batch} | {np.median(c):.2f} | {np.percentile(c, 10):.2f}-{np.percentile(c, 90):.2f} "
                  f"| {np.median(c) / 1e3 / c0:.2f}x | {r:.2f} | {r / r0:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
