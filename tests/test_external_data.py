"""Models past protobuf's 2 GB limit (the SD UNet's fp32 weights are 3.4 GB): ONNX external data
through export, calibration, RD probing, lowering, the bundle and the runtime. CI cannot hold a
3.4 GB model, so these tests lower the limit instead: every ONNX file then takes the big-model
path, and its results must equal the ordinary path's."""

import json

import numpy as np
import pytest
from conftest import run_without_torch
from dmruntime import Bundle, DDIMSampler
from onnx import TensorProto, helper, numpy_helper

from dmcompile import api, onnxio
from dmcompile.config import BuildConfig, CalibrationConfig


@pytest.fixture
def nothing_fits(monkeypatch, tmp_path):
    """Every model counts as past the limit; a fresh cache so the export is redone that way."""
    monkeypatch.setattr(onnxio, "HEADROOM", onnxio.PROTOBUF_LIMIT)
    monkeypatch.setenv("DMCOMPILE_CACHE", str(tmp_path / "cache-big"))


def _matmul_model(w):
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, w.shape[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, w.shape[1]])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_onnxio_saves_loads_and_opens_big_models(nothing_fits, tmp_path):
    w = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    m = _matmul_model(w)
    assert onnxio.save(m, tmp_path / "a.onnx") == ["a.onnx", "a.onnx.data"]
    assert len(m.graph.initializer[0].raw_data) == w.nbytes  # the caller's model keeps its bytes
    moved = _matmul_model(w)
    assert onnxio.save(moved, tmp_path / "b.onnx", keep=False) == ["b.onnx", "b.onnx.data"]
    assert onnxio.data_bytes(moved) == 0  # no second copy: the bytes went to disk
    assert onnxio.files_of(tmp_path / "a.onnx") == ["a.onnx", "a.onnx.data"]
    lean = onnxio.load(tmp_path / "a.onnx", weights=False)
    assert onnxio.external_files(lean) == ["a.onnx.data"] and onnxio.data_bytes(lean) == 0
    np.testing.assert_array_equal(onnxio.array(lean.graph.initializer[0], tmp_path), w)
    x = np.ones((2, 32), np.float32)
    for source in (m, tmp_path / "a.onnx"):
        np.testing.assert_allclose(onnxio.session(source).run(["y"], {"x": x})[0], x @ w, rtol=1e-5)
    np.testing.assert_allclose(onnxio.session(lean, base_dir=tmp_path).run(["y"], {"x": x})[0], x @ w, rtol=1e-5)
    with pytest.raises(ValueError, match="base_dir"):
        onnxio.session(lean)
    onnxio.load_data(lean, tmp_path)
    assert not onnxio.external_files(lean) and onnxio.data_bytes(lean) == w.nbytes


def _build(model_dir, out):
    cal = CalibrationConfig(size=3, steps=6, groups=2, batch_size=4, guidance_scale=2.0)
    return api.build(str(model_dir), out, BuildConfig(calibration=cal, eval_samples=0, null_class=4)).path


def test_big_model_path_gives_the_same_bundle_and_samples(tiny_class_dir, tmp_path, request):
    small = _build(tiny_class_dir, tmp_path / "small")
    request.getfixturevalue("nothing_fits")
    big = _build(tiny_class_dir, tmp_path / "big")
    fp = api.fp_bundle(str(tiny_class_dir))
    assert (fp / "model.onnx.data").is_file() and "model.onnx.data" in json.loads((fp / "manifest.json").read_text())["files"]
    files = json.loads((big / "manifest.json").read_text())["files"]
    assert "unet.onnx.data" in files and (big / "unet.onnx.data").is_file()
    assert onnxio.external_files(onnxio.load(big / "unet.onnx", weights=False)) == ["unet.onnx.data"]
    mb, ms = (json.loads((p / "manifest.json").read_text()) for p in (big, small))
    assert mb["build"]["fusion"] == ms["build"]["fusion"] and ms["build"]["fusion"]["ratio"] == 1.0
    cond = {"class_labels": np.array([0, 1, 2])}
    a = DDIMSampler(Bundle.open(small), steps=5, guidance_scale=2.0).sample(3, seed=0, cond=cond)
    b = DDIMSampler(Bundle.open(big), steps=5, guidance_scale=2.0).sample(3, seed=0, cond=cond)
    np.testing.assert_array_equal(a, b)
    # the torch-free runtime opens the external-data bundle too
    run_without_torch(f"""
        import numpy as np
        from dmruntime import Bundle, DDIMSampler
        b = Bundle.open({str(big)!r}, verify=True)
        x = DDIMSampler(b, steps=3, guidance_scale=2.0).sample(2, cond={{"class_labels": np.array([1, 3])}})
        assert x.shape == (2, *b.sample_shape) and np.isfinite(x).all()
    """, tmp_path)


def test_rd_probe_reads_external_weights(tiny_model_dir, nothing_fits):
    """The RD probe's weight sweeps read fp32 weights from external data."""
    from dmcompile import stages
    from dmcompile.config import AnalysisConfig
    from dmcompile.targets import ORT_CPU

    cal = CalibrationConfig(size=2, steps=4, groups=2)
    fp = api.fp_bundle(str(tiny_model_dir))
    assert (fp / "model.onnx.data").is_file()
    calib = stages.cached_calibration(fp, cal, moments="pooled")  # GPTQ rounds the probe's weights
    probe, X, T, C, bundle = stages.probe_inputs(fp, ORT_CPU.layer_input_tensors, calib,
                                                 AnalysisConfig(samples_per_group=2))
    layer = probe.layers[0]
    assert np.abs(probe.weights[layer.weight]).sum() > 0 and C is None
    out = probe.run(X[0], T[0], weights=probe.weight_feed(layer, 4))
    ref = np.concatenate([bundle.predict(X[0][i:i + 1], int(T[0][i])) for i in range(len(X[0]))])
    assert out.shape == ref.shape and 0 < np.abs(out - ref).max() < 1.0
