"""dmruntime: sampling parity with diffusers, determinism, bundle validation, no torch."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_without_torch
from diffusers import DDIMScheduler
from dmruntime import Bundle, BundleError, DDIMSampler, InputError

from dmcompile import api

ROOT = Path(__file__).resolve().parents[1]


def diffusers_ddim(unet, scheduler_config, x, steps, eta, noises):
    """Reference: diffusers' DDIMScheduler driving the PyTorch UNet (as DDIMPipeline does)."""
    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    x = torch.from_numpy(x)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            eps = unet(x, t).sample
            noise = torch.from_numpy(noises[i]) if eta > 0 else None
            x = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
    return x.numpy()


class RecordingRNG:
    """Wraps a numpy Generator and keeps the per-step noise arrays the sampler draws."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.draws = []

    def standard_normal(self, shape, dtype=np.float32):
        a = self.rng.standard_normal(shape, dtype=dtype)
        self.draws.append(a)
        return a


def _parity(bundle_path, model_spec, steps, eta, n=3):
    bundle = Bundle.open(bundle_path)
    loaded = api.load_model(model_spec)
    sampler = DDIMSampler(bundle, steps=steps, eta=eta)
    x_T = np.random.default_rng(1).standard_normal((n, *bundle.sample_shape), dtype=np.float32)
    rec = RecordingRNG(2)
    got = sampler.run(x_T, rec)
    want = diffusers_ddim(loaded.unet, loaded.scheduler_config, x_T, steps, eta, rec.draws)
    return np.abs(got - want).max()


@pytest.mark.parametrize("steps,eta", [(50, 0.0), (50, 1.0), (13, 0.3)])
def test_sampler_matches_diffusers_tiny(tiny_export, tiny_model_dir, steps, eta):
    assert _parity(tiny_export, str(tiny_model_dir), steps, eta) <= 1e-4


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampler_matches_diffusers_digits16(eta):
    assert _parity(api.fp_bundle("digits16"), "digits16", 50, eta, n=4) <= 1e-4


def test_sampling_is_deterministic_and_batch_independent(tiny_export):
    b = Bundle.open(tiny_export)
    a = DDIMSampler(b, steps=10, eta=1.0, batch_size=7).sample(10, seed=3)
    c = DDIMSampler(b, steps=10, eta=1.0, batch_size=3).sample(10, seed=3)
    d = DDIMSampler(b, steps=10, eta=1.0, batch_size=7).sample(10, seed=4)
    np.testing.assert_allclose(a, c, atol=1e-6)
    assert np.abs(a - d).max() > 0.1


def test_an_export_is_one_group(tiny_export):
    # Input checks and multi-group lookup: runtimes/python/tests/test_runtime_only.py.
    b = Bundle.open(tiny_export)
    assert b.group_of(0).index == 0 and b.group_of(999).index == 0
    with pytest.raises(InputError, match="outside"):
        b.group_of(1000)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_bad_bundles_are_refused(tiny_export, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.open(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.open(empty)

    b = _copy(tiny_export, tmp_path / "schema")
    _edit_manifest(b, lambda m: m.update(schema_version=99))
    with pytest.raises(BundleError, match="schema_version 99 is not supported"):
        Bundle.open(b)

    b = _copy(tiny_export, tmp_path / "escape")
    (tmp_path / "outside.onnx").write_bytes(b"x")
    _edit_manifest(b, lambda m: m["files"].update({"../outside.onnx": {"bytes": 1, "sha256": "0" * 64}}))
    with pytest.raises(BundleError, match="outside the bundle"):
        Bundle.open(b)

    b = _copy(tiny_export, tmp_path / "sha")
    data = bytearray((b / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Bundle.open(b)

    b = _copy(tiny_export, tmp_path / "trunc")
    data = (b / "model.onnx").read_bytes()
    (b / "model.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(BundleError, match="truncated"):
        Bundle.open(b)
    # Without hash checks, the truncated engine still fails clearly when it is loaded.
    with pytest.raises(BundleError, match="corrupt or truncated"):
        Bundle.open(b, verify=False).predict(np.zeros((1, 2, 8, 8), np.float32), 5)

    b = _copy(tiny_export, tmp_path / "badjson")
    (b / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(b)

    b = _copy(tiny_export, tmp_path / "gap")
    _edit_manifest(b, lambda m: m["groups"][0].update(t_start=10))
    with pytest.raises(BundleError, match="uncovered"):
        Bundle.open(b)


def test_runtime_works_without_torch_or_diffusers(tiny_export, tmp_path):
    """Run dmruntime in a fresh interpreter where importing torch or diffusers fails."""
    run_without_torch(f"""
        import numpy as np
        from dmruntime import Bundle, DDIMSampler
        x = DDIMSampler(Bundle.open({str(tiny_export)!r}), steps=5, eta=1.0).sample(3, seed=0)
        assert x.shape == (3, 2, 8, 8) and np.isfinite(x).all()
    """, tmp_path)


def test_runtime_package_declares_no_torch():
    import tomllib

    meta = tomllib.loads((ROOT / "runtimes" / "python" / "pyproject.toml").read_text())
    deps = " ".join(meta["project"]["dependencies"]).lower()
    assert "numpy" in deps and "onnxruntime" in deps
    assert "torch" not in deps and "diffusers" not in deps
