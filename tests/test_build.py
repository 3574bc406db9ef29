"""dmcompile build: per-group int8 bundles, 100% integer kernels, shared weights, atomic output."""

import json
import shutil

import numpy as np
import onnx
import pytest

from dmcompile import api
from dmcompile.backends.onnxruntime import fusion_report
from dmcompile.cli import main
from dmcompile.config import BuildConfig, CalibrationConfig
from dmcompile.errors import ConfigError
from dmruntime import Bundle, DDIMSampler

SMALL = CalibrationConfig(size=4, steps=6, groups=3, batch_size=4)


@pytest.fixture(scope="module")
def tiny_bundle(tiny_model_dir, tmp_path_factory):
    return api.build(str(tiny_model_dir), tmp_path_factory.mktemp("b") / "tiny-w8a8",
                     BuildConfig(calibration=SMALL, eval_samples=4)).path


def test_bundle_layout_and_manifest(tiny_bundle):
    assert sorted(p.name for p in tiny_bundle.iterdir()) == [
        "group_00.onnx", "group_01.onnx", "group_02.onnx", "manifest.json", "weights.bin"]
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert m["schema_version"] == 1 and m["format"] == "w8a8" and m["profile"] == "ort-cpu"
    assert [(g["t_start"], g["t_end"]) for g in m["groups"]] == [(0, 333), (333, 667), (667, 1000)]
    assert m["calibration"]["groups"] == 3 and m["calibration"]["size"] == 4
    layers = m["precision"]["layers"]
    assert layers and all(l["activation"] == "uint8" for l in layers)
    assert all(l["weight_bits"] == [8, 8, 8] for l in layers if l["params"])
    assert 0 < m["fidelity"]["ssim_mean"] <= 1
    assert set(m["files"]) == {"group_00.onnx", "group_01.onnx", "group_02.onnx", "weights.bin"}


def test_every_group_runs_integer_kernels(tiny_bundle):
    for g in range(3):
        rep = fusion_report(tiny_bundle / f"group_{g:02d}.onnx")
        assert rep["float"] == {} and rep["ratio"] == 1.0
        assert rep["integer"]["QLinearConv"] > 0 and rep["integer"].get("QGemm", 0) > 0


def test_groups_have_own_scales_and_share_weights(tiny_bundle):
    models = [onnx.load(str(tiny_bundle / f"group_{g:02d}.onnx"), load_external_data=False) for g in range(3)]
    scales = [{i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer if i.name.endswith(".q_scale")}
              for m in models]
    assert scales[0].keys() == scales[2].keys()
    assert any(not np.allclose(scales[0][k], scales[2][k]) for k in scales[0])  # per-group calibration
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    shared = {t["name"] for t in m["shared_weights"]["tensors"]}
    for model in models:
        ext = {i.name for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
        assert ext == shared  # every group reads the same bytes of weights.bin
    int8 = [t for t in m["shared_weights"]["tensors"] if t["dtype"] == "int8"]
    assert len(int8) == sum(1 for l in m["precision"]["layers"] if l["params"])


def test_runtime_switches_engines_by_group(tiny_bundle):
    b = Bundle.open(tiny_bundle)
    x = np.random.default_rng(0).standard_normal((2, 2, 8, 8), dtype=np.float32)
    assert b.group_of(332).engine == "group_00.onnx" and b.group_of(333).engine == "group_01.onnx"
    for t in (0, 500, 999):
        own = b.engine_for(t).predict(x, t)
        np.testing.assert_array_equal(b.predict(x, t), own)
    # A group's engine is calibrated for its own timesteps: running t=999 through group 0's
    # engine differs from running it through group 2's.
    assert not np.array_equal(b.engine_for(0).predict(x, 999), b.predict(x, 999))
    fp = Bundle.open(api.fp_bundle(str(b.manifest["model"]["source"])))
    rel = np.linalg.norm(b.predict(x, 999) - fp.predict(x, 999)) / np.linalg.norm(fp.predict(x, 999))
    assert rel < 0.1


def test_shared_and_private_sessions_agree(tiny_bundle):
    a = DDIMSampler(Bundle.open(tiny_bundle, share_weights=True), steps=8).sample(3, seed=1)
    b = DDIMSampler(Bundle.open(tiny_bundle, share_weights=False), steps=8).sample(3, seed=1)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_build_is_deterministic(tiny_model_dir, tiny_bundle, tmp_path):
    again = api.build(str(tiny_model_dir), tmp_path / "again", BuildConfig(calibration=SMALL, eval_samples=4)).path
    m1 = json.loads((tiny_bundle / "manifest.json").read_text())
    m2 = json.loads((again / "manifest.json").read_text())
    assert m1["files"] == m2["files"]


def test_float_layers(tiny_model_dir, tmp_path):
    out = api.build(str(tiny_model_dir), tmp_path / "f",
                    BuildConfig(calibration=SMALL, eval_samples=0, float_layers=("last_conv", "time_embedding"))).path
    m = json.loads((out / "manifest.json").read_text())
    floats = [l for l in m["precision"]["layers"] if l["activation"] == "float"]
    assert {l["module"] for l in floats} == {"conv_out", "time_embedding.linear_1", "time_embedding.linear_2"}
    rep = fusion_report(out / "group_00.onnx")
    assert rep["float"] == {"Conv": 1, "Gemm": 2}
    with pytest.raises(ConfigError, match="matches no Conv/Gemm/MatMul layer"):
        api.build(str(tiny_model_dir), tmp_path / "g", BuildConfig(calibration=SMALL, float_layers=("nope",)))
    assert not (tmp_path / "g").exists()


def test_interrupted_build_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    import dmcompile.backends.onnxruntime as backend

    real = backend.save_group_models

    def interrupted(models, names, folder):
        real(models[:1], names[:1], folder)
        raise KeyboardInterrupt

    monkeypatch.setattr(backend, "save_group_models", interrupted)
    with pytest.raises(KeyboardInterrupt):
        api.build(str(tiny_model_dir), tmp_path / "out", BuildConfig(calibration=SMALL, eval_samples=0))
    assert list(tmp_path.iterdir()) == []


def test_cli_build_inspect_sample(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["build", str(tiny_model_dir), "-o", str(out), "--groups", "2", "--calib-size", "4",
                 "--calib-steps", "4", "--eval-samples", "0"]) == 0
    assert "100% of Conv/Gemm/MatMul on integer kernels" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("100.0% integer") == 2 and "groups: 2" in text
    assert main(["sample", str(out), "-n", "4", "--steps", "5", "-o", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()
    assert main(["build", str(tiny_model_dir), "-o", str(tmp_path / "x"), "--groups", "0"]) == 2
    assert "groups must be in [1, 1000]" in capsys.readouterr().err


def test_corrupt_group_engine_fails_clearly(tiny_bundle, tmp_path, capsys):
    b = shutil.copytree(tiny_bundle, tmp_path / "bad")
    data = (b / "group_01.onnx").read_bytes()
    (b / "group_01.onnx").write_bytes(data[: len(data) // 2])
    assert main(["sample", str(b), "-n", "2", "--steps", "3", "-o", str(tmp_path / "g.png")]) == 2
    assert "truncated" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits16", "ddpm-cifar10-32"])
def test_full_integer_fusion_on_shipped_models(name, tmp_path):
    cfg = BuildConfig(calibration=CalibrationConfig(size=2, steps=4, groups=2, batch_size=2), eval_samples=0)
    out = api.build(name, tmp_path / name, cfg).path
    for g in ("group_00.onnx", "group_01.onnx"):
        rep = fusion_report(out / g)
        assert rep["float"] == {} and rep["ratio"] == 1.0
        ops = json.loads((api.fp_bundle(name) / "manifest.json").read_text())["export"]["op_counts"]
        assert rep["integer"]["QLinearConv"] == ops["Conv"] and rep["integer"]["QGemm"] == ops["Gemm"]
