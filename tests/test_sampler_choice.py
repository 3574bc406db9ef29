"""Which sampler a run takes: the model's scheduler class by default, --sampler / --steps /
--karras on every command, the calibration along the chosen sampler, the manifest's record of it
and sampling's default to it; PTQD's residual variance in the stochastic samplers' steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import build_for
from dmruntime import (Bundle, BundleError, InputError, NoiseSchedule, SamplerChoice, SamplingLoop, default_sampler,
                       make_sampler, sampler_for)
from dmruntime.cli import main as runtime_main

from dmcompile import api
from dmcompile.calibration import trajectory
from dmcompile.cli import main as compiler_main
from dmcompile.config import CalibrationConfig, SampleConfig
from dmcompile.errors import ConfigError

FIXTURE = Path(__file__).resolve().parents[1] / "runtimes" / "python" / "tests" / "data" / "tiny-w8a8"
BASE = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}


def test_the_scheduler_config_picks_the_default_sampler():
    def default(cls):
        return default_sampler(NoiseSchedule.from_config({**BASE, **({"_class_name": cls} if cls else {})}))

    assert default("PNDMScheduler") == "pndm" and default("EulerDiscreteScheduler") == "euler"
    assert default("DPMSolverMultistepScheduler") == "dpmpp" and default("UniPCMultistepScheduler") == "unipc"
    assert default("EulerAncestralDiscreteScheduler") == "euler-a" and default("DDIMScheduler") == "ddim"
    assert default("DDPMScheduler") == "ddim" and default(None) == "ddim"  # training schedules sample with DDIM
    with pytest.raises(InputError, match="LMSDiscreteScheduler, which dmruntime does not implement"):
        default("LMSDiscreteScheduler")
    # diffusers' class names work wherever a sampler name does
    schedule = NoiseSchedule.from_config(BASE)
    a = sampler_for(schedule, "DPMSolverMultistepScheduler", 20, karras=True)
    b = sampler_for(schedule, "dpmpp", 20, karras=True)
    np.testing.assert_array_equal(a.timesteps, b.timesteps)
    assert SamplerChoice("UniPCMultistepScheduler", 20).name == "unipc"


def test_sampler_options_a_sampler_cannot_honour_are_refused():
    schedule = NoiseSchedule.from_config(BASE)
    for kw, what in (({"name": "ddim", "karras": True}, "ddim has no Karras sigmas"),
                     ({"name": "euler-a", "karras": True}, "euler-a has no Karras sigmas"),
                     ({"name": "euler", "eta": 0.5}, "eta is DDIM's option"),
                     ({"name": "nope"}, "unknown sampler 'nope'")):
        with pytest.raises(InputError, match=what):
            SamplerChoice(**kw)
    with pytest.raises(ConfigError, match="unknown sampler"):
        CalibrationConfig(sampler="nope")
    with pytest.raises(ConfigError, match="no Karras sigmas"):
        SampleConfig(sampler="pndm", karras=True)
    with pytest.raises(InputError, match=r"in \[4, 1000\]"):
        sampler_for(schedule, "pndm", 3)
    with pytest.raises(InputError, match=r"must be an integer in \[1, 1000\]"):
        sampler_for(schedule, "unipc", 1001)


def test_the_python_api_takes_a_sampler_by_name_or_object(tiny_export):
    bundle = Bundle.open(tiny_export)
    by_name = SamplingLoop(bundle, "dpmpp-2m", steps=12, batch_size=4).sample(4, seed=1)
    obj = make_sampler("dpmpp-2m", bundle.schedule)
    obj.set_timesteps(12)
    by_object = SamplingLoop(bundle, obj, batch_size=4).sample(4, seed=1)
    by_choice = SamplingLoop(bundle, SamplerChoice("DPMSolverMultistepScheduler", 12), batch_size=4).sample(4, seed=1)
    np.testing.assert_array_equal(by_name, by_object)
    np.testing.assert_array_equal(by_name, by_choice)
    ddim = SamplingLoop(bundle, "ddim", steps=12, batch_size=4).sample(4, seed=1)
    assert not np.allclose(ddim, by_name)  # another sampler, another result


def test_build_calibrates_along_the_chosen_sampler_and_sampling_defaults_to_it(tiny_model_dir, tmp_path, monkeypatch,
                                                                               capsys):
    """build --sampler dpmpp-2m --steps 6: the calibration's model calls are that run's timesteps,
    the manifest records it, PTQD pairs and the fidelity check take it, and both command lines
    sample with it unless told otherwise."""
    seen = []
    real = trajectory.record_chunk

    def spy(run, *a, **k):
        return real(lambda x, t, c: (seen.append(t), run(x, t, c))[1], *a, **k)

    monkeypatch.setattr(trajectory, "record_chunk", spy)
    monkeypatch.setenv("DMCOMPILE_CACHE", str(tmp_path / "cache"))  # a calibration of its own, not a cached one
    out = tmp_path / "b"
    build_for("ort-cpu", tiny_model_dir, out, calibration=CalibrationConfig(size=4, steps=6, groups=2, sampler="dpmpp-2m",
                                                                            seed=3), eval_samples=2, correction=True)
    bundle = Bundle.open(out)
    want = SamplerChoice("dpmpp-2m", 6).model_timesteps(bundle.schedule)
    assert sorted(set(seen)) == sorted(set(want.tolist())) and len(seen) == len(want)  # one shard of 4
    m = json.loads((out / "manifest.json").read_text())
    assert m["sampler"] == {"name": "dpmpp-2m", "steps": 6, "karras": False}
    assert m["correction"]["sampler"] == "dpmpp-2m" and m["fidelity"]["sampler"] == "dpmpp-2m"
    assert bundle.sampling == SamplerChoice("dpmpp-2m", 6)
    assert api.sampling_config(out, SampleConfig(n=2)).sampler == "dpmpp-2m"
    assert api.sampling_config(out, SampleConfig(n=2, sampler="euler")).steps == 6  # steps stay the bundle's

    # both command lines: the bundle's sampler by default, --sampler overrides; same samples
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert compiler_main(["sample", str(out), "-n", "2", "-o", str(a)]) == 0
    assert "dpmpp-2m 6 steps" in capsys.readouterr().out
    assert runtime_main([str(out), "-n", "2", "-o", str(b)]) == 0
    assert "dpmpp-2m 6 steps" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(a), np.load(b))
    np.testing.assert_array_equal(np.load(a), SamplingLoop(Bundle.open(out), "dpmpp-2m", steps=6).sample(2, seed=0))
    c = tmp_path / "c.npy"
    assert compiler_main(["sample", str(out), "-n", "2", "--sampler", "UniPCMultistepScheduler", "--steps", "8",
                          "-o", str(c)]) == 0
    assert "unipc 8 steps" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(c), SamplingLoop(Bundle.open(out), "unipc", steps=8).sample(2, seed=0))

    # eval samples the bundle and its fp32 reference with the same sampler
    res = api.evaluate(out, api.EvalConfig(sample=SampleConfig(n=2)), progress=None)
    assert res.report["config"]["sample"]["sampler"] == "dpmpp-2m" and res.report["config"]["sample"]["steps"] == 6


def test_bundles_without_a_sampler_entry_sample_with_ddim_at_their_calibration_steps(tmp_path):
    old = tmp_path / "old"
    shutil.copytree(FIXTURE, old)  # built before the manifest recorded a sampler
    m = json.loads((old / "manifest.json").read_text())
    m.pop("sampler", None)
    (old / "manifest.json").write_text(json.dumps(m))
    assert Bundle.open(old).sampling == SamplerChoice("ddim", m["calibration"]["steps"])
    m["sampler"] = {"name": "lms", "steps": 20}
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="unknown sampler 'lms'"):
        Bundle.open(old)


def test_a_sampler_that_cannot_take_the_steps_is_refused_before_calibration(tiny_model_dir, tmp_path, monkeypatch,
                                                                            capsys):
    from dmcompile import stages

    monkeypatch.setattr(stages, "cached_calibration", lambda *a, **k: pytest.fail("calibrated"))
    out = tmp_path / "b"
    for argv, what in ((["--sampler", "pndm", "--steps", "3"], "PNDM takes an integer number of steps in [4, 1000]"),
                       (["--sampler", "nope"], "unknown sampler 'nope'"),
                       (["--sampler", "ddim", "--karras"], "ddim has no Karras sigmas")):
        assert compiler_main(["build", str(tiny_model_dir), "-o", str(out), *argv]) == 2
        assert what in capsys.readouterr().err
        assert not out.exists()


def _one_step(name, options, t_index, eps, x, noise, residual_var):
    s = make_sampler(name, NoiseSchedule.from_config(BASE), **options)
    s.set_timesteps(10)
    if hasattr(s, "_index"):  # Euler ancestral keeps only its place in the run
        s._index = t_index
    t = s.timesteps[t_index]
    return s.step(eps, t, x, noise=noise, residual_var=residual_var), s, t


@pytest.mark.parametrize("name", ["euler-a", "ddpm"])
def test_stochastic_samplers_take_the_residual_variance_out_of_their_noise(name):
    """Hand-computed (float64) against the sampler's step: the noise added shrinks from s^2 to
    s^2 - c^2 var, c the weight of eps in the step's mean, and stops at zero."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    eps = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    z = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    var = np.array([0.01, 5.0], np.float32).reshape(1, 2, 1, 1)  # channel 1: more than the noise holds
    with_var, s, t = _one_step(name, {"clip_sample": False} if name == "ddpm" else {}, 3, eps, x, z, var)
    without, _, _ = _one_step(name, {"clip_sample": False} if name == "ddpm" else {}, 3, eps, x, np.zeros_like(z), None)
    acp = NoiseSchedule.from_config(BASE).alphas_cumprod.astype(np.float64)
    if name == "euler-a":
        sig = ((1 - acp) / acp) ** 0.5
        s_from, s_to = np.interp(t, np.arange(1000), sig), np.interp(s.timesteps[4], np.arange(1000), sig)
        std2 = s_to**2 * (s_from**2 - s_to**2) / s_from**2
        c = np.sqrt(s_to**2 - std2) - s_from  # eps's weight: (sigma_down - sigma)
    else:
        a_t, a_prev = acp[int(t)], acp[int(s.timesteps[4])]
        beta = 1 - a_t / a_prev
        std2 = (1 - a_prev) / (1 - a_t) * beta
        c = np.sqrt(a_prev) * beta / (1 - a_t) * np.sqrt(1 - a_t) / np.sqrt(a_t)
    want = np.sqrt(np.maximum(std2 - c**2 * var.astype(np.float64), 0)) * z
    np.testing.assert_allclose(with_var - without, want, rtol=1e-4, atol=1e-6)
    assert np.all(with_var[:, 1] == without[:, 1])  # the variance outgrew the noise: none added
