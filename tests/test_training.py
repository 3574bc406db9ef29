"""The training scripts keep working: a few steps, a resume, a loadable output folder."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from dmcompile import api
from dmcompile.zoo.architectures import DIGITS16_UNET
from dmcompile.zoo.data import load_digits16, upsample2x_bilinear

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_train_reference_few_steps_and_resume(tmp_path):
    script = ROOT / "benchmarks" / "train_reference.py"
    common = ["--work", tmp_path / "work", "--out", tmp_path / "model", "--batch", "8", "--ckpt-every", "1",
              "--threads", "1"]
    out = _run(script, "--steps", "2", *common)
    assert "wall time" in out
    out = _run(script, "--steps", "3", *common)
    assert "resumed from" in out and "at step 2" in out
    model = api.load_model(str(tmp_path / "model"))
    for k, v in DIGITS16_UNET.items():
        assert model.unet_config[k] == v
    sched = json.loads((tmp_path / "model" / "scheduler_config.json").read_text())
    assert sched["num_train_timesteps"] == 1000 and sched["beta_schedule"] == "linear"


def test_train_classifier_runs(tmp_path):
    out = _run(ROOT / "benchmarks" / "train_classifier.py", "--epochs", "1", "--out", tmp_path)
    assert "held-out accuracy" in out
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["held_out"] + info["train"] == 1797


def test_digits_data():
    x, y = load_digits16()
    assert x.shape == (1797, 1, 16, 16) and x.dtype == np.float32
    assert x.min() == -1.0 and x.max() <= 1.0 and set(np.unique(y)) == set(range(10))
    # Matches torch's bilinear interpolation (align_corners=False).
    import torch

    img = np.random.default_rng(0).random((3, 8, 8))
    want = torch.nn.functional.interpolate(torch.from_numpy(img)[:, None], scale_factor=2, mode="bilinear",
                                           align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(upsample2x_bilinear(img), want, atol=1e-12)


def test_train_ldm_few_steps_and_resume(tmp_path):
    """digits-ldm's script: both stages, a resume, and a pipeline folder dmcompile loads (with
    its class table and null row)."""
    script = ROOT / "benchmarks" / "train_ldm.py"
    common = ["--work", tmp_path / "work", "--out", tmp_path / "model", "--batch", "8", "--ckpt-every", "1",
              "--threads", "1", "--vae-steps", "2"]
    out = _run(script, "--unet-steps", "2", *common)
    assert "wall time" in out and "scaling_factor" in out
    out = _run(script, "--unet-steps", "3", *common)
    assert "unet.pt at step 2" in out
    model = api.load_model(str(tmp_path / "model"))
    assert model.cls == "UNet2DConditionModel" and model.vae is not None and model.sample_shape == (4, 8, 8)
    conds = np.load(tmp_path / "model" / "conditions.npz")
    assert conds["class_table"].shape == (10, 1, 32) and conds["null_encoder_hidden_states"].shape == (1, 32)


def test_train_t2i_few_steps_and_resume(tmp_path):
    """digits-t2i's script: a few steps, a resume, and a StableDiffusionPipeline folder dmcompile
    loads with its tokenizer (vocab.json + merges.txt) and its calibration prompts."""
    from dmcompile.eval.prompts import training_prompts
    from dmcompile.zoo.architectures import DIGITS_T2I_TEXT

    script = ROOT / "benchmarks" / "train_t2i.py"
    common = ["--work", tmp_path / "work", "--out", tmp_path / "model", "--batch", "8", "--ckpt-every", "1",
              "--threads", "1"]
    out = _run(script, "--steps", "2", *common)
    assert "wall time" in out
    out = _run(script, "--steps", "3", *common)
    assert "t2i.pt at step 2" in out
    model = api.load_model(str(tmp_path / "model"))
    assert model.text[0].hidden_size == DIGITS_T2I_TEXT["hidden_size"] == model.unet_config["cross_attention_dim"]
    assert model.text[0].tokenizer_source == "vocab.json + merges.txt" and model.vae is not None
    prompts = (tmp_path / "model" / "calibration_prompts.txt").read_text().splitlines()
    assert prompts == [p for p, _ in training_prompts()]
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
