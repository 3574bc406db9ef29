"""The runtime's own tests: they need only dmruntime, numpy, onnxruntime and pytest, so they run
where only the runtime is installed (an ARM board, scripts/check_arm64.sh's emulated aarch64).

They sample the committed fixture bundles in ``data/`` (built on x86-64 by
tests/make_runtime_fixtures.py: W8A8, and 4-bit packed weights with 8-bit first/last conv, two
timestep groups each) and compare with the samples the build machine drew (``reference.npz``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmruntime import Bundle, BundleError, DDIMSampler, InputError
from dmruntime.weights import load_weights, pack_int4, unpack_int4

DATA = Path(__file__).resolve().parent / "data"
BUNDLES = ("tiny-w8a8", "tiny-w4")
STEPS, N = 10, 4  # as in data/README.md
# Machines with other float code (AVX-512, AVX2, NEON: exp, rsqrt) round a few values differently;
# one that lands on a quantizer's rounding boundary flips an int8 code, and the quantized sampler
# carries the flip into another, equally good, trajectory (benchmarks/README.md "ARM64"). So another
# machine's samples are held to two things: near the build machine's (a runtime computing something
# else lands far below: the AVX2 overflow gave 21-26 dB), and as close to full precision as the
# build machine's, within FP32_MARGIN_DB. On the build machine the samples are equal.
MIN_PSNR_DB = 30.0
FP32_MARGIN_DB = 1.5


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Over the [-1, 1] sample range (peak-to-peak 2)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


@pytest.mark.parametrize("name", BUNDLES)
def test_samples_match_the_build_machine(name):
    refs = np.load(DATA / "reference.npz")
    ref, fp32 = refs[name], refs["fp32"]
    x = DDIMSampler(Bundle.open(DATA / name), steps=STEPS).sample(N, seed=0)
    assert x.shape == ref.shape == (N, 2, 8, 8) and np.isfinite(x).all()
    assert psnr(x, ref) >= MIN_PSNR_DB, f"{name}: {psnr(x, ref):.1f} dB from the x86-64 samples"
    assert psnr(x, fp32) >= psnr(ref, fp32) - FP32_MARGIN_DB, \
        f"{name}: {psnr(x, fp32):.1f} dB from fp32 here, {psnr(ref, fp32):.1f} dB on the build machine"


def test_sampling_is_deterministic_and_batch_independent():
    b = Bundle.open(DATA / "tiny-w4")
    a = DDIMSampler(b, steps=STEPS, eta=1.0, batch_size=4).sample(6, seed=3)
    c = DDIMSampler(b, steps=STEPS, eta=1.0, batch_size=3).sample(6, seed=3)
    d = DDIMSampler(b, steps=STEPS, eta=1.0, batch_size=4).sample(6, seed=4)
    np.testing.assert_array_equal(a, DDIMSampler(b, steps=STEPS, eta=1.0, batch_size=4).sample(6, seed=3))
    np.testing.assert_allclose(a, c, atol=1e-5)
    assert np.abs(a - d).max() > 0.1


def test_groups_and_engines():
    b = Bundle.open(DATA / "tiny-w8a8")
    assert [g.index for g in b.groups] == [0, 1]
    assert b.group_of(0).index == 0 and b.group_of(b.num_train_timesteps - 1).index == 1
    boundary = b.groups[1].t_start
    assert b.group_of(boundary - 1).index == 0 and b.group_of(boundary).index == 1
    # The two groups' activation scales differ, so the same input gives different outputs.
    x = np.random.default_rng(0).standard_normal((2, 2, 8, 8)).astype(np.float32)
    assert not np.array_equal(b.predict(x, boundary - 1), b.predict(x, boundary))


def test_packed_4bit_weights():
    m = json.loads((DATA / "tiny-w4" / "manifest.json").read_text())
    tensors = m["weights"]["tensors"]
    packed = [k for k, t in tensors.items() if t["storage_bits"] == 4]
    assert packed and any(t["storage_bits"] == 8 for t in tensors.values())
    w = load_weights(DATA / "tiny-w4", m["weights"])
    for k in packed:
        assert w[k].dtype == np.int8 and list(w[k].shape) == tensors[k]["shape"]
        assert w[k].min() >= -8 and w[k].max() <= 7 and len(np.unique(w[k])) > 8
    q = np.random.default_rng(1).integers(-8, 8, size=(3, 5, 7)).astype(np.int8)  # odd element count
    assert pack_int4(q).size == (q.size + 1) // 2
    np.testing.assert_array_equal(unpack_int4(pack_int4(q), q.shape), q)


def test_input_checks():
    b = Bundle.open(DATA / "tiny-w8a8")
    with pytest.raises(InputError, match="outside"):
        b.group_of(b.num_train_timesteps)
    with pytest.raises(InputError, match="float32"):
        b.predict(np.zeros((1, 2, 8, 8), np.float64), 10)
    with pytest.raises(InputError, match=r"shape \[B, 2, 8, 8\]"):
        b.predict(np.zeros((1, 1, 8, 8), np.float32), 10)
    with pytest.raises(InputError, match="steps"):
        DDIMSampler(b, steps=0)


def test_bad_bundles_are_refused(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.open(tmp_path / "nope")
    b = shutil.copytree(DATA / "tiny-w4", tmp_path / "sha")
    data = bytearray((b / "weights.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "weights.npz").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Bundle.open(b)
    b = shutil.copytree(DATA / "tiny-w8a8", tmp_path / "schema")
    m = json.loads((b / "manifest.json").read_text())
    m["schema_version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="schema_version 99 is not supported"):
        Bundle.open(b)


def test_the_runtime_loads_no_torch():
    """In a fresh interpreter: sampling imports neither torch nor diffusers nor the compiler."""
    code = (
        "import sys\n"
        "from dmruntime import Bundle, DDIMSampler\n"
        f"DDIMSampler(Bundle.open({str(DATA / 'tiny-w4')!r}), steps=2).sample(1)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'dmcompile'))\n"
        "print('loaded:', bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "loaded: []", r.stdout


def _png_size(path: Path) -> tuple[int, int, int]:
    """(width, height, colour type) from the IHDR chunk, and check the image data decompresses."""
    import struct
    import zlib

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h, depth, color = struct.unpack(">IIBB", data[16:26])
    idat = data.index(b"IDAT")
    n = struct.unpack(">I", data[idat - 4:idat])[0]
    channels = {0: 1, 2: 3}[color]
    assert len(zlib.decompress(data[idat + 4:idat + 4 + n])) == h * (1 + w * channels) and depth == 8
    return w, h, color


def test_cli_samples_to_png_and_npy(tmp_path):
    from dmruntime.cli import main
    from dmruntime.png import SOFTWARE, png_software

    out = tmp_path / "x.npy"
    assert main([str(DATA / "tiny-w4"), "-n", "3", "--steps", str(STEPS), "-o", str(out)]) == 0
    want = DDIMSampler(Bundle.open(DATA / "tiny-w4"), steps=STEPS).sample(3, seed=0)
    np.testing.assert_array_equal(np.load(out), want)
    assert main([str(DATA / "tiny-w4"), "-n", "3", "--steps", "2", "-o", str(out)]) == 2  # .npy: never replaced
    np.testing.assert_array_equal(np.load(out), want)
    png = tmp_path / "grid.png"
    assert main([str(DATA / "tiny-w4"), "-n", "4", "--steps", "2", "-o", str(png)]) == 0
    w, h, color = _png_size(png)
    # 2 x 2 grid of 8 x 8 grey images with 1-pixel padding (19 px), enlarged 27x to about 512 px
    assert (w, h, color) == (19 * 27, 19 * 27, 0) and png_software(png) == SOFTWARE
    assert main([str(DATA / "tiny-w4"), "-n", "1", "--steps", "2", "-o", str(png)]) == 0  # ours: replaced
    assert list(tmp_path.glob("*.tmp*")) == []


def test_cli_refuses_bad_input(tmp_path, capsys):
    from dmruntime.cli import main

    foreign = tmp_path / "notes.png"
    foreign.write_bytes(b"not written by us")
    assert main([str(DATA / "tiny-w4"), "-o", str(foreign)]) == 2
    assert foreign.read_bytes() == b"not written by us"
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main([str(tmp_path / "nope"), "-o", str(tmp_path / "a.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(DATA / "tiny-w4"), "-o", str(tmp_path / "a.jpg")]) == 2
    assert main([str(DATA / "tiny-w4"), "--class", "1", "-o", str(tmp_path / "a.png")]) == 2
    assert "unconditional" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_every_subpackage_is_packaged():
    """pyproject.toml lists the runtime's packages by name: a new one (a sampler folder, say) must
    be listed or a non-editable install (a board, the arm64 check) lacks it."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = sorted(".".join(p.parent.relative_to(root).parts) for p in (root / "dmruntime").rglob("__init__.py"))
    assert sorted(listed) == found


def test_a_registered_sampler_in_the_loop_is_ddimsampler():
    """DDIMSampler is the sampling loop with the registry's ``ddim``: same noise stream, same samples;
    guidance wraps the model, so it applies to any sampler."""
    from dmruntime import SAMPLERS, SamplingLoop, make_sampler

    b = Bundle.open(DATA / "tiny-w8a8")
    ddim = make_sampler("ddim", b.schedule, eta=1.0)
    ddim.set_timesteps(STEPS)
    got = SamplingLoop(b, ddim, batch_size=3).sample(5, seed=11)
    np.testing.assert_array_equal(got, DDIMSampler(b, steps=STEPS, eta=1.0, batch_size=3).sample(5, seed=11))
    assert "ddim" in SAMPLERS and list(ddim.timesteps) == list(DDIMSampler(b, steps=STEPS).timesteps)
    with pytest.raises(InputError, match="unknown sampler 'no-such-sampler'"):
        make_sampler("no-such-sampler", b.schedule)
    with pytest.raises(InputError, match="set_timesteps"):
        make_sampler("ddim", b.schedule).step(np.zeros((1, 2, 8, 8), np.float32), 500,
                                              np.zeros((1, 2, 8, 8), np.float32))


def test_components_and_engine_runtimes_come_from_their_registries(tmp_path):
    from dmruntime import COMPONENTS, ENGINE_RUNTIMES
    from dmruntime.engines import engine_runtime

    b = Bundle.open(DATA / "tiny-w8a8")
    assert b.components == {} and b.decoder is None and "decoder" in COMPONENTS
    assert set(ENGINE_RUNTIMES) == {"onnxruntime", "openvino", "tensorrt"}
    assert engine_runtime("onnxruntime").devices == ("cpu",) and engine_runtime("tensorrt").devices[0] == "cuda"
    bad = tmp_path / "b"
    shutil.copytree(DATA / "tiny-w8a8", bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["decoder"] = {"file": "decoder.onnx"}  # a component whose file the bundle does not list
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="the decoder file 'decoder.onnx' is not listed"):
        Bundle.open(bad)


def test_samples_that_go_non_finite_are_an_error_not_a_result():
    b = Bundle.open(DATA / "tiny-w8a8")
    for eta in (2.0, float("nan"), -0.5):
        with pytest.raises(InputError, match=r"eta must be in \[0, 1\]"):
            DDIMSampler(b, steps=STEPS, eta=eta)

    class Blows:  # a model whose output is infinite below t = 500
        schedule, sample_shape, conditioning = b.schedule, b.sample_shape, None

        def predict(self, x, t, cond=None):
            out = b.predict(x, t)
            return np.full_like(out, np.inf) if t < 500 else out

    with pytest.raises(InputError, match=r"non-finite at step 6 of 10 \(t = 400\): the model output was already"):
        DDIMSampler(Blows(), steps=STEPS).sample(2, seed=0)


def test_the_runtime_cli_refuses_a_bad_eta_and_writes_nothing(tmp_path, capsys):
    from dmruntime.cli import main

    out = tmp_path / "e.png"
    assert main([str(DATA / "tiny-w8a8"), "--eta", "nan", "-n", "2", "--steps", "2", "-o", str(out)]) == 2
    assert "eta must be in [0, 1]" in capsys.readouterr().err and not out.exists()


def test_predict_refuses_inputs_quantization_would_hide():
    b = Bundle.open(DATA / "tiny-w8a8")
    x = np.zeros((2, 2, 8, 8), np.float32)
    for bad, what in ((np.full_like(x, np.nan), "NaN or inf"), (np.full_like(x, np.inf), "NaN or inf"),
                      (np.zeros((0, 2, 8, 8), np.float32), "batch 0")):
        with pytest.raises(InputError, match=what):
            b.predict(bad, 500)
    for t in (float("nan"), 1.5, "500", True):
        with pytest.raises(InputError, match="timestep must be one integer training timestep"):
            b.predict(x, t)
    assert np.isfinite(b.predict(x, np.int64(500))).all() and np.isfinite(b.predict(x, 500.0)).all()
    with pytest.raises(InputError, match="seed must be >= 0"):
        DDIMSampler(b, steps=2).sample(1, seed=-1)


def test_predict_takes_one_timestep_per_row_across_groups():
    b = Bundle.open(DATA / "tiny-w4")
    x = np.random.default_rng(0).standard_normal((4, 2, 8, 8)).astype(np.float32)
    ts = np.array([10, 900, 499, 500])  # rows in both groups, interleaved
    assert b.group_of(10) != b.group_of(900)
    out = b.predict(x, ts)
    for i, t in enumerate(ts):
        np.testing.assert_allclose(out[i], b.predict(x[i:i + 1], int(t))[0], rtol=0, atol=1e-6)
    for bad, what in ((np.array([10, 20]), "one per row"), (np.array([10, 20, 30, 1.5]), "one integer"),
                      (np.array([10, 20, 30, 1000]), "outside")):
        with pytest.raises(InputError, match=what):
            b.predict(x, bad)


def test_non_finite_conditions_are_refused():
    from dmruntime.conditioning import CondInput, Conditioning

    spec = Conditioning((CondInput("encoder_hidden_states", "float32", (None, None, 4)),), None, 2)
    good = np.zeros((1, 2, 4), np.float32)
    assert spec.check({"encoder_hidden_states": good}, 1)["encoder_hidden_states"].shape == (1, 2, 4)
    with pytest.raises(InputError, match="encoder_hidden_states holds NaN or inf"):
        spec.check({"encoder_hidden_states": np.full_like(good, np.nan)}, 1)
