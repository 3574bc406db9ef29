"""The shipped models: digits16 and its classifier load offline and do their job."""

import numpy as np
import pytest

from dmcompile import api, zoo
from dmcompile.eval.classifier import DigitScorer
from dmcompile.zoo.data import load_digits16


def test_digits16_architecture():
    m = api.load_model("digits16")
    assert 1_000_000 <= m.num_parameters() <= 2_000_000
    assert m.sample_shape == (1, 16, 16)
    kinds = {type(mod).__name__ for mod in m.unet.modules()}
    assert {"ResnetBlock2D", "GroupNorm", "SiLU", "Attention"} <= kinds
    s = m.scheduler_config
    assert (s["num_train_timesteps"], s["beta_schedule"], s["beta_start"], s["beta_end"]) == (1000, "linear", 1e-4, 0.02)
    assert (zoo.TRAINED["digits16"] / "diffusion_pytorch_model.safetensors").is_file()


def test_classifier_held_out_accuracy():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "train_classifier", Path(__file__).resolve().parents[1] / "benchmarks" / "train_classifier.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x, y = load_digits16()
    scorer = DigitScorer()
    _, test = mod.split(y, scorer.info["seed"])
    _, probs = scorer(x[test])
    acc = float((probs.argmax(1) == y[test]).mean())
    assert acc >= 0.97
    assert acc == pytest.approx(scorer.info["held_out_accuracy"], abs=1e-6)


def test_digits16_samples_are_digits():
    """64 DDIM-50 samples of the shipped model, through dmruntime: mostly confident digits."""
    images = api.sample("digits16", api.SampleConfig(n=64, steps=50, seed=0), fp=True)
    assert images.shape == (64, 1, 16, 16)
    scores = api.digit_scores(images)
    assert scores["confident_rate"] >= 0.85
    assert sum(1 for c in scores["class_histogram"] if c > 0) >= 8  # not collapsed onto a few classes


def test_eval_report_on_digits16_export():
    res = api.evaluate(api.fp_bundle("digits16"), api.EvalConfig(sample=api.SampleConfig(n=48, steps=10)))
    r = res.report
    assert res.images.shape == (48, 1, 16, 16)
    assert r["paired_vs_fp"]["psnr_db_median"] > 60  # the fp32 export follows PyTorch's trajectories
    d = r["digits"]
    for key in ("fd_to_real", "fp_fd_to_real", "noise_floor_fd", "fd_to_fp", "real_halves_fd"):
        assert np.isfinite(d[key]) and d[key] >= 0
    assert d["fd_to_real"] == pytest.approx(d["fp_fd_to_real"], rel=1e-3)
    assert d["real_halves_fd"] < d["noise_floor_fd"]
    assert sum(d["class_histogram"]) == 48


def test_digits_ldm_draws_the_requested_digits():
    """The shipped conditional latent model works: guided samples of each class are that digit."""
    from dmruntime import Bundle, DDIMSampler

    m = api.load_model("digits-ldm")
    assert m.cls == "UNet2DConditionModel" and m.vae is not None and m.sample_shape == (4, 8, 8)
    assert m.default_conditions is not None
    b = Bundle.open(api.fp_bundle("digits-ldm"))
    assert b.conditioning.embedded_classes and b.conditioning.null is not None
    labels = np.arange(50) % 10
    z = DDIMSampler(b, steps=25, guidance_scale=2.0).sample(50, seed=0, cond={"class_labels": labels})
    images = b.decode(z)
    assert images.shape == (50, 1, 16, 16)
    assert api.class_accuracy(images, labels) >= 0.8


def test_sampling_a_class_reports_class_accuracy(tmp_path, capsys):
    from dmcompile.cli import main

    out = tmp_path / "b"
    assert main(["build", "digits-ldm", "-o", str(out), "--groups", "2", "--calib-size", "4", "--calib-steps", "10",
                 "--guidance", "2", "--eval-samples", "0", "--no-correction"]) == 0
    capsys.readouterr()
    assert main(["sample", str(out), "--class", "3", "-n", "10", "--steps", "20", "-o", str(tmp_path / "g.png")]) == 0
    text = capsys.readouterr().out
    assert "class accuracy" in text and "FD to real" not in text and "guidance 2" in text
