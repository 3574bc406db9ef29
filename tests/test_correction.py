"""PTQD noise correction: estimation recovers a known distortion, the runtime undoes it,
variance schedule calibration takes the residual out of the added noise."""

import json

import numpy as np
import pytest
from dmruntime import Bundle, BundleError, DDIMSampler, SamplerChoice, ddim_step
from dmruntime.correction import GroupCorrection, load_corrections

from dmcompile import api
from dmcompile.calibration.correction import estimate_correction
from dmcompile.config import BuildConfig, CalibrationConfig

SMALL = CalibrationConfig(size=4, steps=6, groups=3, batch_size=4)


class Distorted:
    """The fp32 export with eps_q = (1 + k) eps + bias_c + N(0, sd^2): a stand-in quantized model."""

    def __init__(self, fp, k, bias, sd):
        self.fp, self.k, self.bias, self.sd = fp, k, np.asarray(bias, np.float32), sd
        self.groups, self.sample_shape, self.schedule = fp.groups, fp.sample_shape, fp.schedule
        self.num_train_timesteps = fp.num_train_timesteps
        self.rng = np.random.default_rng(0)

    def predict(self, x, t):
        e = self.fp.predict(x, t)
        return ((1 + self.k) * e + self.bias.reshape(1, -1, 1, 1)
                + self.sd * self.rng.standard_normal(e.shape)).astype(np.float32)


def test_estimation_recovers_k_bias_and_variance(tiny_export):
    fp = Bundle.open(tiny_export)
    q = Distorted(fp, k=0.05, bias=[0.02, -0.03], sd=0.005)  # the tiny model's eps has std 0.015
    est = estimate_correction(q, fp, sampling=SamplerChoice("ddim", 10), size=16, seed=0)
    g = est["groups"][0]
    assert g["k"] == pytest.approx(0.05, abs=0.01)
    np.testing.assert_allclose(g["bias"], [0.02, -0.03], atol=0.01)
    np.testing.assert_allclose(g["var"], [2.5e-5, 2.5e-5], rtol=0.1)
    assert g["rms_error_corrected"] < g["rms_error"]


def test_a_correction_that_would_raise_the_error_is_left_off(tiny_export):
    """eps_q = 0.5 eps + noise as large as eps: the fit finds k = -0.5 and bias 0, and dividing by
    1 + k would double the noise; the group keeps eps_q (k 0, bias 0) and says so."""
    fp = Bundle.open(tiny_export)
    q = Distorted(fp, k=-0.5, bias=[0.0, 0.0], sd=0.015)  # the tiny model's eps has std 0.015
    g = estimate_correction(q, fp, sampling=SamplerChoice("ddim", 10), size=16, seed=0)["groups"][0]
    assert g["applied"] is False and g["k"] == 0.0 and g["bias"] == [0.0, 0.0]
    assert g["rms_error_corrected"] == g["rms_error"]
    np.testing.assert_allclose(g["var"], [0.25 * 0.015 ** 2 + 0.015 ** 2] * 2, rtol=0.35)  # d's own spread
    kept = estimate_correction(Distorted(fp, k=0.05, bias=[0.02, -0.03], sd=0.005), fp, sampling=SamplerChoice("ddim", 10), size=16, seed=0)
    assert all(g["applied"] for g in kept["groups"] if g["samples"])


def test_group_correction_and_manifest_validation():
    c = GroupCorrection(0.25, np.array([1.0, -1.0], np.float32), np.array([0.5, 0.5], np.float32))
    eps_q = np.ones((1, 2, 2, 2), np.float32)
    np.testing.assert_allclose(c.apply(eps_q)[0, :, 0, 0], [0.0, 1.6])
    np.testing.assert_allclose(c.residual_var(4).ravel(), [0.32, 0.32])
    good = {"groups": [{}], "correction": {"groups": [{"index": 0, "k": 0.1, "bias": [0, 0], "var": [1, 1]}]}}
    assert len(load_corrections(good, 2)) == 1
    bad = json.loads(json.dumps(good))
    bad["correction"]["groups"][0]["bias"] = [0]
    with pytest.raises(BundleError, match="malformed"):
        load_corrections(bad, 2)
    assert load_corrections({"groups": [{}]}, 2) is None


def test_variance_schedule_calibration(tiny_export):
    sched = Bundle.open(tiny_export).schedule
    x = np.random.default_rng(0).standard_normal((2, 2, 8, 8), dtype=np.float32)
    eps, noise = np.zeros_like(x), np.ones_like(x)
    plain = ddim_step(sched, eps, 500, 480, x, eta=1.0, noise=noise)
    same = ddim_step(sched, eps, 500, 480, x, eta=1.0, noise=noise, residual_var=np.zeros((1, 2, 1, 1), np.float32))
    np.testing.assert_array_equal(plain, same)
    none_added = ddim_step(sched, eps, 500, 480, x, eta=1.0, noise=np.zeros_like(x))
    swamped = ddim_step(sched, eps, 500, 480, x, eta=1.0, noise=noise, residual_var=np.full((1, 2, 1, 1), 1e6, np.float32))
    np.testing.assert_allclose(swamped, none_added, atol=1e-6)  # clamped at zero, not negative
    partial = ddim_step(sched, eps, 500, 480, x, eta=1.0, noise=noise, residual_var=np.full((1, 2, 1, 1), 0.01, np.float32))
    assert np.all(np.abs(partial - none_added) < np.abs(plain - none_added))


def test_bundle_carries_and_applies_correction(tiny_model_dir, tmp_path):
    out = api.build(str(tiny_model_dir), tmp_path / "c", BuildConfig(calibration=SMALL, eval_samples=0)).path
    m = json.loads((out / "manifest.json").read_text())
    assert m["correction"]["method"] == "ptqd" and len(m["correction"]["groups"]) == 3
    raw, corr = Bundle.open(out, correction=False), Bundle.open(out)
    x = np.random.default_rng(1).standard_normal((2, 2, 8, 8), dtype=np.float32)
    for t, g in ((10, 0), (500, 1), (990, 2)):
        c = m["correction"]["groups"][g]
        want = (raw.predict(x, t) - np.array(c["bias"], np.float32).reshape(1, -1, 1, 1)) / np.float32(1 + c["k"])
        np.testing.assert_allclose(corr.predict(x, t), want, rtol=1e-6, atol=1e-7)
    a = DDIMSampler(corr, steps=6, eta=1.0).sample(2, seed=0)
    b = DDIMSampler(raw, steps=6, eta=1.0).sample(2, seed=0)
    assert np.isfinite(a).all() and not np.array_equal(a, b)
    none = api.build(str(tiny_model_dir), tmp_path / "n", BuildConfig(calibration=SMALL, eval_samples=0,
                                                                      correction=False)).path
    assert "correction" not in json.loads((none / "manifest.json").read_text())
    assert Bundle.open(none).corrections is None


def test_step_aware_selection_reported(tiny_model_dir, tmp_path, capsys):
    from dmcompile.cli import main

    out = tmp_path / "sa"
    assert main(["build", str(tiny_model_dir), "-o", str(out), "--groups", "3", "--calib-size", "4",
                 "--calib-steps", "6", "--eval-samples", "0", "--step-aware", "--rd-samples", "2"]) == 0
    assert "step-aware activation bits per group" in capsys.readouterr().out
    sa = json.loads((out / "manifest.json").read_text())["step_aware_activation"]
    assert sa["applied"] is False and sa["deployable"] == [8] and len(sa["groups"]) == 3
    for g in sa["groups"]:
        snr = g["quantized_snr_db"]
        assert snr["8"] > snr["6"]  # more bits, less noise
        ok = [b for b in (6, 8) if snr[str(b)] >= g["schedule_snr_db"]]
        assert g["selected_bits"] == (ok[0] if ok else 8)
    # the schedule's SNR falls with t, so later groups never need more bits than earlier ones
    assert [g["schedule_snr_db"] for g in sa["groups"]] == sorted((g["schedule_snr_db"] for g in sa["groups"]), reverse=True)
    assert main(["inspect", str(out), "--no-fusion"]) == 0
    text = capsys.readouterr().out
    assert "PTQD correction per group" in text and "step-aware activation bits" in text


def test_variance_correction_matches_hand_computed_values():
    """DDIM eta = 1 from t = 500 to 480, no clipping. By hand (float64, from the DDIM update
    x_prev = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z with x0 = (x - sqrt(1 - a) eps) / sqrt(a)):
    eps carries a residual of variance v into x_prev with coefficient
    c = sqrt(1 - a' - s^2) - sqrt(a') sqrt(1 - a) / sqrt(a), so the added noise must shrink to
    sqrt(s^2 - c^2 v). Then the total variance of x_prev is s^2, as without quantization noise;
    a wrong sign would give s^2 + 2 c^2 v."""
    from dmruntime import NoiseSchedule

    from dmcompile.zoo.architectures import DDPM_LINEAR_SCHEDULER

    sched = NoiseSchedule.from_config({**DDPM_LINEAR_SCHEDULER, "clip_sample": False})
    a, ap = float(sched.alphas_cumprod[500]), float(sched.alphas_cumprod[480])
    s2 = (1 - ap) / (1 - a) * (1 - a / ap)
    c = np.sqrt(1 - ap - s2) - np.sqrt(ap) * np.sqrt(1 - a) / np.sqrt(a)
    v = 0.5 * s2 / c**2  # half the noise budget is already in eps
    # one element, noise 1, eps 0: the step adds exactly sqrt(s^2 - c^2 v)
    x = np.full((1, 1, 1, 1), 0.3, np.float32)
    got = ddim_step(sched, np.zeros_like(x), 500, 480, x, eta=1.0, noise=np.ones_like(x),
                    residual_var=np.full((1, 1, 1, 1), v, np.float32))
    want = np.sqrt(ap) * 0.3 / np.sqrt(a) + np.sqrt(s2 - c**2 * v)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # statistically: eps = r ~ N(0, v), z ~ N(0, 1): Var(x_prev) = s^2 with the correction
    rng = np.random.default_rng(0)
    n = 400_000
    x = np.zeros((n, 1, 1, 1), np.float32)
    r = (np.sqrt(v) * rng.standard_normal(x.shape)).astype(np.float32)
    z = rng.standard_normal(x.shape).astype(np.float32)
    corrected = ddim_step(sched, r, 500, 480, x, eta=1.0, noise=z, residual_var=np.full((1, 1, 1, 1), v, np.float32))
    plain = ddim_step(sched, r, 500, 480, x, eta=1.0, noise=z)
    assert np.var(corrected) == pytest.approx(s2, rel=0.01)
    assert np.var(plain) == pytest.approx(s2 + c**2 * v, rel=0.01)  # 1.5 s^2: what the correction removes
