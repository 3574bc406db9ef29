"""The runtime's committed fixture bundles (runtimes/python/tests/data) still agree with what the
compiler builds now; if this fails after a deliberate change to the compiler, regenerate them:
``.venv/bin/python tests/make_runtime_fixtures.py runtimes/python/tests/data``."""

import json

import numpy as np
from conftest import ROOT
from make_runtime_fixtures import FIXTURES, build_fixtures

DATA = ROOT / "runtimes" / "python" / "tests" / "data"


def test_committed_fixtures_match_a_fresh_build(tmp_path):
    out = tmp_path / "data"
    build_fixtures(out, tmp_path)
    fresh, committed = np.load(out / "reference.npz"), np.load(DATA / "reference.npz")
    assert sorted(fresh.files) == sorted(committed.files) == sorted([*FIXTURES, "fp32"])
    np.testing.assert_allclose(committed["fp32"], fresh["fp32"], atol=1e-5, err_msg="fp32")
    for name in FIXTURES:
        np.testing.assert_allclose(committed[name], fresh[name], atol=1e-5, err_msg=name)
        a = json.loads((DATA / name / "manifest.json").read_text())
        b = json.loads((out / name / "manifest.json").read_text())
        assert a["groups"] == b["groups"] and a["precision"] == b["precision"], name
        assert sorted(a["files"]) == sorted(b["files"]), name
