"""Latent pipelines: the VAE decoder exported next to the UNet, shipped in the bundle with its
scaling factor, and used by dmruntime to turn sampled latents into images."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_without_torch
from dmruntime import Bundle

from dmcompile import api
from dmcompile.cli import main
from dmcompile.config import BuildConfig, CalibrationConfig
from dmcompile.errors import ModelError

ROOT = Path(__file__).resolve().parents[1]
COND = {"encoder_hidden_states": np.random.default_rng(0).standard_normal((1, 5, 12)).astype(np.float32)}


def test_pipeline_folder_loads_the_vae(tiny_latent_dir):
    m = api.load_model(str(tiny_latent_dir))
    assert m.vae is not None and m.scaling_factor == pytest.approx(0.18215) and m.sample_shape == (4, 8, 8)
    assert m.source == str(tiny_latent_dir)  # the reference model reloads the whole pipeline


def test_decoder_in_export_and_bundle(tiny_latent_dir, latent_bundle, tmp_path):
    exp = api.export(str(tiny_latent_dir), tmp_path / "e").path
    dec = json.loads((exp / "manifest.json").read_text())["decoder"]
    assert dec["parity_max_abs_err"] <= 1e-4 and dec["image_shape"] == [3, 16, 16] and dec["class"] == "AutoencoderKL"
    m = json.loads((latent_bundle / "manifest.json").read_text())
    assert m["decoder"]["file"] == "decoder.onnx" and "decoder.onnx" in m["files"]
    # the runtime's decode is the VAE's decode of latents / scaling_factor
    b = Bundle.open(latent_bundle)
    z = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    vae = api.load_model(str(tiny_latent_dir)).vae
    with torch.no_grad():
        want = vae.decode(torch.from_numpy(z) / 0.18215).sample.numpy()
    np.testing.assert_allclose(b.decode(z), want, atol=1e-4)


def test_decoder_parity_is_checked_relative_to_pixel_size(tiny_latent_dir, tmp_path, monkeypatch):
    """The decoder's parity is numpy.allclose's form: an error of tol * (1 + |pixel|) passes, more fails."""
    import onnxruntime as ort

    from dmcompile.config import ExportConfig
    from dmcompile.errors import ExportError

    tol, real_session = 1e-3, ort.InferenceSession

    class Off:  # ONNX Runtime's decoder output, moved by `scale` * tol * (1 + |value|)
        scale = 0.9

        def __init__(self, *a, **k):
            self.s = real_session(*a, **k)

        def run(self, names, feeds, *a):
            out = self.s.run(names, feeds, *a)
            if "latents" in feeds:
                out[0] = out[0] + np.float32(Off.scale * tol) * (1 + np.abs(out[0]))
            return out

        def __getattr__(self, name):  # the rest of the session as it is
            return getattr(self.s, name)

    monkeypatch.setattr(ort, "InferenceSession", Off)
    res = api.export(str(tiny_latent_dir), tmp_path / "ok", ExportConfig(parity_tol=tol))
    dec = json.loads((res.path / "manifest.json").read_text())["decoder"]
    assert dec["parity_max_abs_err"] > tol  # over tol in absolute terms, within it relative to 1 + |v|
    Off.scale = 1.2
    with pytest.raises(ExportError, match="decoder"):
        api.export(str(tiny_latent_dir), tmp_path / "bad", ExportConfig(parity_tol=tol))
    assert not (tmp_path / "bad").exists()


def test_sample_and_eval_decode_images(latent_bundle, tmp_path, capsys):
    np.savez(tmp_path / "c.npz", **COND)
    images = api.sample(latent_bundle, api.SampleConfig(n=2, steps=3), cond=COND)
    assert images.shape == (2, 3, 16, 16)
    assert main(["eval", str(latent_bundle), "-n", "2", "--steps", "3", "--conditions", str(tmp_path / "c.npz"),
                 "--json"]) == 0
    assert '"psnr_db_mean"' in capsys.readouterr().out


def test_runtime_decodes_without_torch(latent_bundle, tmp_path):
    run_without_torch(f"""
        import numpy as np
        from dmruntime import Bundle, DDIMSampler
        b = Bundle.open({str(latent_bundle)!r})
        e = np.random.default_rng(0).standard_normal((1, 5, 12)).astype(np.float32)
        z = DDIMSampler(b, steps=4).sample(2, seed=0, cond={{"encoder_hidden_states": e}})
        img = b.decode(z)
        assert img.shape == (2, 3, 16, 16) and np.isfinite(img).all()
    """, tmp_path)


def test_disagreeing_pipeline_parts_are_an_error(tmp_path, capsys):
    from conftest import TINY_COND_UNET, TINY_VAE, make_pipeline_folder

    pipe = make_pipeline_folder(tmp_path / "p", TINY_COND_UNET, {**TINY_VAE, "latent_channels": 3})
    with pytest.raises(ModelError, match="the VAE has 3 latent channels, the UNet takes 4"):
        api.load_model(str(pipe))
    assert main(["build", str(pipe), "-o", str(tmp_path / "o")]) == 2
    assert "parts disagree" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_pipeline_class_table_serves_class_labels(tmp_path, capsys):
    """A cross-attention pipeline shipping conditions.npz (a class table and the null row) is
    sampled by class: class k means the table's embedding k, guided against the null row."""
    from conftest import make_pipeline_folder

    pipe = make_pipeline_folder(tmp_path / "p")
    table = np.random.default_rng(3).standard_normal((3, 1, 12)).astype(np.float32)
    np.savez(pipe / "conditions.npz", class_table=table, null_encoder_hidden_states=np.zeros((1, 12), np.float32))
    out = tmp_path / "b"
    assert main(["build", str(pipe), "-o", str(out), "--groups", "2", "--calib-size", "3", "--calib-steps", "4",
                 "--guidance", "2", "--eval-samples", "0"]) == 0
    b = Bundle.open(out)
    assert b.conditioning.embedded_classes and len(b.conditioning.class_table) == 3
    z = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(b.predict(z, 500, {"class_labels": np.array([2, 0])}),
                                  b.predict(z, 500, {"encoder_hidden_states": table[[2, 0]]}))
    capsys.readouterr()
    assert main(["sample", str(out), "--class", "1", "-n", "2", "--steps", "3", "-o", str(tmp_path / "g.png")]) == 0
    assert "guidance 2" in capsys.readouterr().out
    assert main(["sample", str(out), "--class", "3", "-n", "2", "--steps", "3", "-o", str(tmp_path / "h.png")]) == 2
    assert "class labels must be in [0, 3)" in capsys.readouterr().err


def test_w8a8_decoder_is_integer_and_tracks_fp32(tiny_latent_dir, latent_bundle, tmp_path):
    """--decoder w8a8: the decoder's Conv/MatMul run as integer kernels, its manifest record
    says how far it is from fp32 (measured on latents it was not calibrated on), and the runtime
    decodes with it close to the fp32 decoder."""
    from dmcompile.backends.onnxruntime import ort_fusion_report

    cfg = BuildConfig(calibration=CalibrationConfig(size=2, steps=6, groups=2, batch_size=2), eval_samples=0,
                      correction=False, decoder="w8a8", decoder_calib_size=4)
    path = api.build(str(tiny_latent_dir), tmp_path / "q", cfg).path
    m = json.loads((path / "manifest.json").read_text())
    dec = m["decoder"]
    assert dec["precision"] == "w8a8" and dec["w8a8"]["layers"] > 0
    assert dec["w8a8"]["fusion"]["ratio"] == 1.0 and ort_fusion_report(path / "decoder.onnx")["ratio"] == 1.0
    assert 20 < dec["w8a8"]["psnr_db_vs_fp32"] < 200
    z = np.random.default_rng(2).standard_normal((3, 4, 8, 8)).astype(np.float32) * 0.2
    fp, q = Bundle.open(latent_bundle).decode(z), Bundle.open(path).decode(z)
    err = np.abs(fp - q).max()
    assert 0 < err < 0.25 * np.abs(fp).max()
    # the UNet engines are the fp32-decoder build's: only the decoder changed
    base = json.loads((latent_bundle / "manifest.json").read_text())
    assert m["files"]["unet.onnx"]["sha256"] == base["files"]["unet.onnx"]["sha256"]
    assert m["files"]["decoder.onnx"]["sha256"] != base["files"]["decoder.onnx"]["sha256"]


def test_w8a8_decoder_needs_a_latent_model(tiny_model_dir, tmp_path, capsys):
    assert main(["build", str(tiny_model_dir), "-o", str(tmp_path / "b"), "--decoder", "w8a8", "--groups", "2",
                 "--calib-size", "2", "--calib-steps", "3", "--eval-samples", "0"]) == 2
    assert "applies to latent models" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_eval_decodes_the_reference_with_the_pytorch_vae(tiny_latent_dir, latent_bundle, monkeypatch):
    """A bundle's decoder may be int8: the FP reference's latents must go through the fp32
    (PyTorch) VAE, not through the bundle's decoder, or the decoder's error would cancel out."""
    from dmcompile.config import EvalConfig, SampleConfig
    from dmcompile.frontend.torch_model import TorchEpsModel

    calls = []
    real = TorchEpsModel.decode

    def spy(self, latents, batch_size=64):
        calls.append(len(latents))
        return real(self, latents, batch_size)

    monkeypatch.setattr(TorchEpsModel, "decode", spy)
    api.evaluate(latent_bundle, EvalConfig(sample=SampleConfig(n=2, steps=3)), cond=COND)
    assert calls == [2]
    z = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    vae = api.load_model(str(tiny_latent_dir)).vae
    with torch.no_grad():
        want = vae.decode(torch.from_numpy(z) / 0.18215).sample.numpy()
    np.testing.assert_allclose(real(TorchEpsModel(api.load_model(str(tiny_latent_dir))), z), want, atol=1e-6)
