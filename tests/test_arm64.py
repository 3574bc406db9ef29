"""The runtime on aarch64, under qemu user-mode emulation: scripts/check_arm64.sh --fast builds the
aarch64 environment (Debian arm64 packages, aarch64 wheels, downloads cached in build/) and runs
the runtime's own tests there (~40 s from nothing). The full check (digits16 bundles sampled on
both machines and compared, bench_runtime under emulation; about 6 minutes) is documented in
benchmarks/README.md and run by hand."""

import re
import subprocess

from conftest import ROOT


def test_runtime_tests_pass_on_emulated_aarch64():
    work = ROOT / "build" / "arm64-test"
    r = subprocess.run(["bash", "scripts/check_arm64.sh", "--fast", "--work", str(work)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "emulated: aarch64" in out
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 10 and "failed" not in out, out[-4000:]


def test_arm64_compare_passes_equal_fidelity_and_fails_a_worse_machine(tmp_path, capsys):
    import sys

    import numpy as np

    sys.path.insert(0, str(ROOT / "scripts"))
    import arm64_compare

    data = ROOT / "runtimes" / "python" / "tests" / "data"
    x86 = tmp_path / "tiny.x86_64.npz"
    arm64_compare.run(str(data / "tiny-w4"), str(x86), n=6, steps=4)
    got = np.load(x86)
    assert got["samples"].shape == (6, 2, 8, 8) and got["eps"].shape == (arm64_compare.CALLS, 8, 2, 8, 8)
    rng = np.random.default_rng(0)
    fp = tmp_path / "fp.npz"  # a reference 1% away from the quantized bundle
    np.savez(fp, samples=got["samples"] + 0.01 * rng.standard_normal(got["samples"].shape),
             eps=got["eps"] * 1.02)
    same = tmp_path / "same.aarch64.npz"
    np.savez(same, samples=got["samples"] + 1e-4, eps=got["eps"] * (1 + 1e-4))
    assert arm64_compare.compare(str(fp), [str(x86)], [str(same)]) == 0
    worse = tmp_path / "worse.aarch64.npz"  # samples 10x further from fp32 than x86-64's
    np.savez(worse, samples=got["samples"] + 0.1 * rng.standard_normal(got["samples"].shape), eps=got["eps"])
    assert arm64_compare.compare(str(fp), [str(x86)], [str(worse)]) == 1
    assert "further from fp32" in capsys.readouterr().out
    off = tmp_path / "off.aarch64.npz"  # one call as far from x86-64 as from fp32
    np.savez(off, samples=got["samples"], eps=got["eps"] * 1.05)
    assert arm64_compare.compare(str(fp), [str(x86)], [str(off)]) == 1
