"""benchmarks/bench_runtime.py (issue 13 groundwork): runs with the runtime alone and prints the table."""

from conftest import ROOT, run_without_torch

from dmcompile import api
from dmcompile.config import BuildConfig, CalibrationConfig

SMALL = CalibrationConfig(size=4, steps=6, groups=3, batch_size=4)


def test_bench_runtime_needs_only_the_runtime(tiny_model_dir, tmp_path):
    bundle = api.build(str(tiny_model_dir), tmp_path / "tiny-w8a8", BuildConfig(calibration=SMALL, eval_samples=0,
                                                                                correction=False)).path
    export = api.fp_bundle(str(tiny_model_dir))
    run_without_torch(f"""
        import contextlib, io, re, sys
        sys.path.insert(0, {str(ROOT / 'benchmarks')!r})
        import bench_runtime
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = bench_runtime.main([{str(bundle)!r}, "--compare", {str(export)!r}, "--batch", "1", "2",
                                     "--steps", "4", "--repeats", "2", "--runs", "1"])
        out = buf.getvalue()
        assert rc == 0, out
        assert "int8 features" in out and "onnxruntime" in out
        rows = [l for l in out.splitlines() if l.startswith("| tiny-w8a8 |")]
        assert len(rows) == 3, out  # the summary row and one per batch
        cells = [c.strip() for c in rows[0].split("|")[1:-1]]
        assert cells[1] == "w8a8" and cells[3] == "3" and cells[5] == "8.00"
        assert float(re.search(r"\\(([0-9.]+)x\\)", cells[6]).group(1)) > 10  # BOPs: fp32 / W8A8
        assert float(cells[8]) > 0  # peak resident MB of the child
        assert sum(l.startswith("| " + {export.name!r} + " |") for l in out.splitlines()) == 3
        assert bench_runtime.main(["/no/such/bundle"]) == 2
    """, tmp_path)


def test_emulation_is_detected(monkeypatch):
    from dmruntime import bench as bench_runtime

    monkeypatch.delenv("DMRUNTIME_EMULATED", raising=False)
    assert not bench_runtime.emulated()  # x86-64 on x86-64
    monkeypatch.setenv("DMRUNTIME_EMULATED", "qemu-aarch64 -cpu cortex-a76")  # what check_arm64.sh sets
    assert bench_runtime.emulated()
    # qemu 8+ makes up an ARM /proc/cpuinfo; the host's CPU still shows in /sys
    monkeypatch.delenv("DMRUNTIME_EMULATED")
    monkeypatch.setattr(bench_runtime.platform, "machine", lambda: "aarch64")
    fake = {"/proc/cpuinfo": "processor : 0\nFeatures : fp asimd asimddp\n",
            "/sys/devices/system/cpu/modalias": "cpu:type:x86,ven0002fam0019:feature:,0000\n"}
    monkeypatch.setattr(bench_runtime, "Path", lambda p: type("P", (), {"read_text": lambda self: fake[p]})())
    assert bench_runtime.emulated()
    fake["/sys/devices/system/cpu/modalias"] = "cpu:type:aarch64:feature:,0000\n"
    assert not bench_runtime.emulated()


def test_child_peak_memory_is_its_own(tmp_path):
    """A parent holding 400 MB must not show up in the child's peak (Linux carries ru_maxrss
    across fork + exec; the benchmark reads the child's own VmHWM)."""
    run_without_torch(f"""
        import sys
        import numpy as np
        sys.path.insert(0, {str(ROOT / 'benchmarks')!r})
        import bench_runtime
        from pathlib import Path
        big = np.ones(400 * 2**20 // 8)  # touched: resident in this process
        peak = bench_runtime.peak_memory(Path({str(ROOT / 'runtimes/python/tests/data/tiny-w8a8')!r}), 2, 2, 0)
        assert 20 < peak < 300, peak
        del big
    """, tmp_path)
