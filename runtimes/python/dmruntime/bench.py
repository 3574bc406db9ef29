"""Timing bundles on the machine they run on: what a deployment engineer measures on the target.

    dmcompile bench BUNDLE [--compare BUNDLE2 ...] [--batch 1 8] [--steps 50] [--repeats 20] [--runs 3]
                           [--threads 0] [--no-memory]

(also ``benchmarks/bench_runtime.py``, which runs where only the runtime is installed). Prints, as
markdown: the machine (CPU model, cores, int8 features, onnxruntime version), then per bundle the size
on disk, average weight bits and BOPs per sample from the manifest, session creation (opening the
bundle and the first call of every engine), per-call latency (median, and the 10th-90th percentile
spread, calls interleaved between the bundles), a full sampling run (interleaved, median), and peak
resident memory of a fresh process that opens the bundle and samples once. Ratios are to the first
bundle. Under emulation (an aarch64 Python on an x86 host via qemu) the times mean nothing: the
output says so.

:func:`speed_check` is the build's own measurement against the fp32 export (``--speed-check``).
Imports only numpy, onnxruntime (through the bundles) and the standard library.
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

INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "asimddp", "i8mm", "sve", "sme")


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and its feature flags (from /proc/cpuinfo; empty flags where there is none)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, flags


def cpu_line() -> str:
    """CPU model, cores, int8 features, ONNX Runtime version: ONNX Runtime and OpenVINO pick
    different int8 kernels on CPUs with and without VNNI / AMX, so every timing carries it."""
    model, flags = cpu_info()
    have = [f for f in INT8_FLAGS if f in flags]
    try:
        import onnxruntime

        ort = f"onnxruntime {onnxruntime.__version__}"
    except ImportError:
        ort = "onnxruntime not installed"
    return (f"CPU: {model} ({os.cpu_count()} cores visible); int8 features: {', '.join(have) or 'none found'}; "
            f"{ort}; {platform.system()} {platform.machine()}")


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


def dummy_cond(bundle, n: int):
    """A condition of the right shape for timing (None for unconditional bundles)."""
    return bundle.conditioning.dummy(n) if bundle.conditioning else None


def warm(bundle) -> None:
    """Create every engine's session (each engine's first call)."""
    x = np.zeros((1, *bundle.sample_shape), np.float32)
    for g in bundle.groups:
        bundle.predict(x, g.t_start, dummy_cond(bundle, 1))


def time_calls(bundles: list, batch: int, timesteps: list[int], repeats: int, seed: int = 0,
               warm_group: bool = True, stride: int = 7) -> list[list[float]]:
    """Seconds per model call, per bundle: ``repeats`` rounds, each round calling every bundle in
    turn at the round's timestep (``timesteps[r * stride % len]``), so that drifts of a shared
    machine hit all bundles alike. ``warm_group``: call once untimed first (the group's engine
    warm: switching excluded); else the timed call is the first at that timestep."""
    x = np.random.default_rng(seed).standard_normal((batch, *bundles[0].sample_shape)).astype(np.float32)
    conds = [dummy_cond(b, batch) for b in bundles]
    out = [[] for _ in bundles]
    for r in range(repeats):
        t = timesteps[(r * stride) % len(timesteps)]
        for i, b in enumerate(bundles):
            if warm_group:
                b.predict(x, t, conds[i])
            t0 = time.perf_counter()
            b.predict(x, t, conds[i])
            out[i].append(time.perf_counter() - t0)
    return out


def time_runs(bundles: list, batch: int, steps: int, runs: int) -> list[list[float]]:
    """Seconds per full DDIM sampling run of ``batch`` samples, interleaved between the bundles."""
    from . import DDIMSampler

    out = [[] for _ in bundles]
    for r in range(runs):
        for i, b in enumerate(bundles):
            t0 = time.perf_counter()
            DDIMSampler(b, steps=steps, batch_size=batch).sample(batch, seed=r, cond=dummy_cond(b, batch))
            out[i].append(time.perf_counter() - t0)
    return out


def speed_check(bundle, reference, batches=(1, 8), rounds: int = 3) -> dict:
    """The bundle against ``reference`` (the fp32 export) on this machine, interleaved: per batch
    size, the median seconds per model call over ``rounds`` passes through every group (a call at
    each group's middle timestep, so a run's engine switching is included), and their ratio."""
    warm(bundle)
    warm(reference)
    mids = [(g.t_start + g.t_end) // 2 for g in bundle.groups]
    out = {}
    for batch in batches:
        got, want = time_calls([bundle, reference], batch, mids, rounds * len(mids), seed=batch, warm_group=False,
                               stride=1)
        b, f = statistics.median(got), statistics.median(want)
        out[str(batch)] = {"bundle_ms": round(b * 1e3, 3), "fp32_ms": round(f * 1e3, 3), "ratio": round(b / f, 3)}
    return {"reference": "fp32 ONNX export on ONNX Runtime", "machine": cpu_line(), "calls_per_batch": rounds * len(mids),
            "batches": out, "slower": any(v["ratio"] > 1.0 for v in out.values())}


def describe_speed(record: dict) -> list[str]:
    """A manifest's ``speed`` record as lines: the ratios per batch, and the advice when slower."""
    if "skipped" in record:
        return [f"speed check skipped: {record['skipped']}"]
    ratios = ", ".join(f"batch {b}: {v['ratio']:.2f}x ({v['bundle_ms']:.2f} vs {v['fp32_ms']:.2f} ms)"
                       for b, v in record["batches"].items())
    lines = [f"speed vs the {record['reference']} per call on the build machine: {ratios}",
             f"  ({record['machine']})"]
    if record["slower"]:
        lines.append("  SLOWER than fp32 here: " + record.get("advice", "see dmcompile bench"))
    return lines


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
    """Peak resident MB of a fresh process that opens the bundle and samples ``batch`` once."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(batch), str(steps), str(threads)],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``dmcompile bench`` and benchmarks/bench_runtime.py)."""
    p.add_argument("bundle", type=Path, help="bundle or fp32 export folder (the ratios' reference)")
    p.add_argument("--compare", type=Path, nargs="*", default=[], metavar="BUNDLE",
                   help="more bundles or exports, timed interleaved with the first")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of a full run")
    p.add_argument("--repeats", type=int, default=20, help="interleaved rounds of per-call timing")
    p.add_argument("--runs", type=int, default=3, help="interleaved full sampling runs")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: the runtime's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")


def run(args) -> int:
    """Open, time and print (see the module docstring). Raises InputError for bad options and
    BundleError for a folder that is no bundle (before any timing)."""
    from . import Bundle, InputError, ddim_timesteps

    for name, v, least in (("--batch", min(args.batch), 1), ("--steps", args.steps, 1), ("--repeats", args.repeats, 1),
                           ("--runs", args.runs, 1), ("--threads", args.threads, 0)):
        if v < least:
            raise InputError(f"{name} must be >= {least}, got {v}")
    paths = [args.bundle, *args.compare]
    bundles, opened = {}, {}
    for path in paths:
        t0 = time.perf_counter()
        b = Bundle.open(path, threads=args.threads)
        warm(b)
        opened[path] = time.perf_counter() - t0
        bundles[path] = b
    names = {p_: p_.name for p_ in paths}
    base = paths[0]
    calls, runs = {}, {}
    for batch in args.batch:
        ts = [int(t) for t in ddim_timesteps(bundles[base].schedule, args.steps)]
        calls[batch] = dict(zip(paths, time_calls(list(bundles.values()), batch, ts, args.repeats, seed=batch)))
        runs[batch] = dict(zip(paths, time_runs(list(bundles.values()), batch, args.steps, args.runs)))
    peaks = {p_: None if args.no_memory else peak_memory(p_, args.batch[-1], args.steps, args.threads) for p_ in paths}

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
        peak = "-" if peaks[p_] is None else f"{peaks[p_]:.0f}"
        print(f"| {names[p_]} | {f['format']} | {f['runtime']} | {f['groups']} | {f['bytes'] / 1e6:.2f} MB | {bits} | "
              f"{bops} | {opened[p_]:.2f} | {peak} |")
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


def main(argv=None) -> int:
    """benchmarks/bench_runtime.py and ``python -m dmruntime.bench``: errors as one line, exit 2."""
    from .cli import run_main

    args = parser("bench_runtime").parse_args(argv)
    return run_main("bench_runtime", lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
