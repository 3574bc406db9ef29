"""The runtime's committed fixture bundles (runtimes/python/tests/data) still agree with what the
compiler builds now; if this fails after a deliberate change to the compiler, regenerate them:
``.venv/bin/python tests/make_runtime_fixtures.py runtimes/python/tests/data``.

What the compiler writes is compared exactly (groups, precision, file list, the engine graph and its
weights); the per-group scales to float32 round-off, because calibration runs the fp32 export on this
CPU's float kernels (AVX2 and AVX-512 differ in the last bits, and the MSE observer's choice follows);
the samples as another machine's are (runtimes/python/tests/test_runtime_only.py): near the committed
ones and as close to fp32, since an int8 code flipped by such a last bit carries a trajectory elsewhere.
"""

import json
import sys

import numpy as np
from conftest import ROOT
from make_runtime_fixtures import FIXTURES, build_fixtures

DATA = ROOT / "runtimes" / "python" / "tests" / "data"
sys.path.insert(0, str(ROOT / "runtimes" / "python" / "tests"))
from test_runtime_only import FP32_MARGIN_DB, MIN_PSNR_DB, psnr  # noqa: E402


def test_committed_fixtures_match_a_fresh_build(tmp_path):
    out = tmp_path / "data"
    build_fixtures(out, tmp_path)
    fresh, committed = np.load(out / "reference.npz"), np.load(DATA / "reference.npz")
    assert sorted(fresh.files) == sorted(committed.files) == sorted([*FIXTURES, "fp32"])
    np.testing.assert_allclose(committed["fp32"], fresh["fp32"], atol=1e-5, err_msg="fp32")
    for name in FIXTURES:
        a = json.loads((DATA / name / "manifest.json").read_text())
        b = json.loads((out / name / "manifest.json").read_text())
        assert a["groups"] == b["groups"] and a["precision"] == b["precision"], name
        assert sorted(a["files"]) == sorted(b["files"]), name
        assert (DATA / name / "unet.onnx").read_bytes() == (out / name / "unet.onnx").read_bytes(), name
        for g in a["groups"]:
            x, y = np.load(DATA / name / g["inputs"]), np.load(out / name / g["inputs"])
            assert sorted(x.files) == sorted(y.files), name
            for k in x.files:
                np.testing.assert_allclose(x[k], y[k], rtol=1e-5, atol=0, err_msg=f"{name} {g['inputs']} {k}")
        ref, got, fp32 = committed[name], fresh[name], committed["fp32"]
        assert psnr(got, ref) >= MIN_PSNR_DB, f"{name}: {psnr(got, ref):.1f} dB from the committed samples"
        assert psnr(got, fp32) >= psnr(ref, fp32) - FP32_MARGIN_DB, name
