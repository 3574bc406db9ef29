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
