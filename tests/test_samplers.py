"""The runtime's samplers against diffusers' schedulers: the same model, a full run, the same x_0.

Each run feeds the PyTorch UNet of a tiny seeded model the sampler's own x_t, so both sides are
driven by the same network; x_0 must agree to 1e-4 (relative, float32) at 10, 20 and 50 steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import diffusers.schedulers.scheduling_ddpm as diffusers_ddpm
import diffusers.schedulers.scheduling_euler_ancestral_discrete as diffusers_euler_a
from conftest import D, L, embeddings
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler, UNet2DModel,
                       UniPCMultistepScheduler)
from dmruntime import NoiseSchedule, SamplingLoop, make_sampler
from dmruntime.errors import InputError

TOL = 1e-4


@pytest.fixture(scope="module")
def unet(tiny_model_dir):
    return UNet2DModel.from_pretrained(str(tiny_model_dir)).eval()


def run_ours(unet, config, name, steps, x, noises=None, **options):
    """A run of our sampler; the UNet gets the sampler's timestep as it is (fractional for Euler),
    as diffusers' pipelines give it."""
    sampler = make_sampler(name, NoiseSchedule.from_config(config), **options)
    sampler.set_timesteps(steps)
    x = x * np.float32(sampler.init_noise_sigma)
    for i, t in enumerate(sampler.timesteps):
        with torch.no_grad():
            out = unet(torch.from_numpy(sampler.scale_model_input(x, t)), torch.tensor(t)).sample.numpy()
        kw = {} if noises is None else {"noise": noises[i]}
        x = sampler.step(out, t, x, **kw)
    return x, sampler.timesteps


def run_diffusers(unet, scheduler, steps, x, noises=None):
    scheduler.set_timesteps(steps)
    xt = torch.from_numpy(x) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        with torch.no_grad():
            out = unet(scheduler.scale_model_input(xt, t), t).sample
        kw = {} if noises is None else {"variance_noise": torch.from_numpy(noises[i])}
        xt = scheduler.step(out, t, xt, **kw).prev_sample
    return xt.numpy(), scheduler.timesteps.numpy()


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-8))


BASE = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
DPM_CASES = [
    ("dpmpp-2m", {}, {}),
    ("dpmpp-3m", {}, {"solver_order": 3}),
    ("dpmpp-2m", {"prediction_type": "v_prediction"}, {}),
    ("dpmpp-2m", {"use_karras_sigmas": True, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "beta_end": 0.012}, {}),
    ("dpmpp-2m", {"timestep_spacing": "trailing", "solver_type": "heun"}, {}),
    ("dpmpp-3m", {"timestep_spacing": "leading", "steps_offset": 1, "lower_order_final": False}, {"solver_order": 3}),
    ("dpmpp-2m", {"final_sigmas_type": "sigma_min", "euler_at_final": True}, {}),
    ("dpmpp-2m-sde", {}, {"algorithm_type": "sde-dpmsolver++"}),
]


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("name,config,diffusers_extra", DPM_CASES,
                         ids=[f"{n}-{'-'.join(c) or 'default'}" for n, c, _ in DPM_CASES])
def test_dpm_solver_matches_diffusers(unet, name, config, diffusers_extra, steps):
    cfg = {**BASE, **config}
    x = np.random.default_rng(steps).standard_normal((2, 2, 8, 8)).astype(np.float32)
    noises = np.random.default_rng(1).standard_normal((steps, 2, 2, 8, 8)).astype(np.float32) \
        if "sde" in name else None
    ours, ts = run_ours(unet, cfg, name, steps, x, noises)
    theirs, dts = run_diffusers(unet, DPMSolverMultistepScheduler(**cfg, **diffusers_extra), steps, x, noises)
    np.testing.assert_array_equal(ts, dts)
    assert rel(ours, theirs) <= TOL, rel(ours, theirs)


def test_dpm_solver_runs_in_the_sampling_loop_and_resets_between_runs(unet):
    class Model:  # the PyTorch UNet behind the runtime's model interface
        sample_shape = (2, 8, 8)
        conditioning = None

        def predict(self, x, t, cond=None):
            with torch.no_grad():
                return unet(torch.from_numpy(x), int(t)).sample.numpy()

    sampler = make_sampler("dpmpp-2m", NoiseSchedule.from_config(BASE))
    sampler.set_timesteps(10)
    loop = SamplingLoop(Model(), sampler, batch_size=2)
    a, b = loop.sample(2, seed=3), loop.sample(2, seed=3)
    np.testing.assert_array_equal(a, b)  # the second run does not start from the first one's history
    x = np.random.default_rng(3).standard_normal((2, 2, 8, 8), dtype=np.float32)
    theirs, _ = run_diffusers(unet, DPMSolverMultistepScheduler(**BASE), 10, x)
    assert rel(a, theirs) <= TOL


def test_dpm_solver_refuses_what_it_does_not_implement():
    schedule = NoiseSchedule.from_config(BASE)
    for options, what in (({"use_exponential_sigmas": True}, "use_exponential_sigmas"),
                          ({"algorithm_type": "dpmsolver"}, "algorithm_type"), ({"solver_order": 4}, "solver_order"),
                          ({"karras": True}, "no option 'karras'")):
        with pytest.raises(InputError, match=what):
            make_sampler("dpmpp", schedule, **options)
    with pytest.raises(InputError, match="use_beta_sigmas"):
        make_sampler("dpmpp-2m", NoiseSchedule.from_config({**BASE, "use_beta_sigmas": True}))
    with pytest.raises(InputError, match="cosine"):
        make_sampler("dpmpp-2m", NoiseSchedule.from_config({**BASE, "beta_schedule": "squaredcos_cap_v2",
                                                             "use_karras_sigmas": True}))
    s = make_sampler("dpmpp-2m", schedule)
    with pytest.raises(InputError, match="steps must be an integer"):
        s.set_timesteps(0)
    s.set_timesteps(2)
    x = np.zeros((1, 2, 8, 8), np.float32)
    s.step(x, s.timesteps[0], x)
    s.step(x, s.timesteps[1], x)
    with pytest.raises(InputError, match="3 times for a 2-step run"):
        s.step(x, 0, x)
    with pytest.raises(InputError, match="needs a random generator"):
        sde = make_sampler("dpmpp-2m-sde", schedule)
        sde.set_timesteps(2)
        sde.step(x, sde.timesteps[0], x)


EULER_CASES = [{}, {"timestep_spacing": "leading", "steps_offset": 1}, {"timestep_spacing": "trailing"},
               {"prediction_type": "v_prediction"}, {"use_karras_sigmas": True}, {"final_sigmas_type": "sigma_min"}]


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("config", EULER_CASES, ids=["-".join(c) or "default" for c in EULER_CASES])
def test_euler_matches_diffusers(unet, config, steps):
    cfg = {**BASE, **config}
    x = np.random.default_rng(steps).standard_normal((2, 2, 8, 8)).astype(np.float32)
    ours, ts = run_ours(unet, cfg, "euler", steps, x)
    theirs, dts = run_diffusers(unet, EulerDiscreteScheduler(**cfg), steps, x)
    np.testing.assert_allclose(ts, dts, rtol=0, atol=1e-3)
    assert rel(ours, theirs) <= TOL, rel(ours, theirs)


def test_the_loop_feeds_engines_the_nearest_integer_timestep(unet):
    seen = []

    class Model:
        sample_shape = (2, 8, 8)
        conditioning = None

        def predict(self, x, t, cond=None):
            seen.append(t)
            with torch.no_grad():
                return unet(torch.from_numpy(x), t).sample.numpy()

    euler = make_sampler("euler", NoiseSchedule.from_config(BASE))
    euler.set_timesteps(7)
    assert any(t != np.rint(t) for t in euler.timesteps)  # linspace leaves them fractional
    out = SamplingLoop(Model(), euler, batch_size=2).sample(2, seed=0)
    assert seen == [int(np.rint(t)) for t in euler.timesteps] and all(isinstance(t, int) for t in seen)
    x = np.random.default_rng(0).standard_normal((2, 2, 8, 8), dtype=np.float32) * np.float32(euler.init_noise_sigma)
    euler.reset()
    for t in euler.timesteps:  # by hand: the rounded timestep to the UNet, the exact sigma in the step
        with torch.no_grad():
            eps = unet(torch.from_numpy(euler.scale_model_input(x, t)), int(np.rint(t))).sample.numpy()
        x = euler.step(eps, t, x)
    np.testing.assert_array_equal(out, x)


def test_euler_refuses_what_it_does_not_implement():
    schedule = NoiseSchedule.from_config(BASE)
    for options, what in (({"use_beta_sigmas": True}, "use_beta_sigmas"), ({"interpolation_type": "log_linear"},
                          "interpolation_type"), ({"timestep_type": "continuous"}, "timestep_type"),
                          ({"solver_order": 2}, "no option 'solver_order'")):
        with pytest.raises(InputError, match=what):
            make_sampler("euler", schedule, **options)


# (sampler, diffusers class, config): every sampler, epsilon and v-prediction, its options
CASES = [
    ("ddim", DDIMScheduler, {}), ("ddim", DDIMScheduler, {"prediction_type": "v_prediction", "steps_offset": 1}),
    ("euler-a", EulerAncestralDiscreteScheduler, {}),
    ("euler-a", EulerAncestralDiscreteScheduler, {"prediction_type": "v_prediction", "timestep_spacing": "leading",
                                                  "steps_offset": 1}),
    ("euler-a", EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}),
    ("ddpm", DDPMScheduler, {}), ("ddpm", DDPMScheduler, {"prediction_type": "v_prediction"}),
    ("ddpm", DDPMScheduler, {"variance_type": "fixed_large", "clip_sample": False, "timestep_spacing": "trailing"}),
    ("ddpm", DDPMScheduler, {"prediction_type": "sample", "variance_type": "fixed_small_log",
                             "timestep_spacing": "linspace"}),
    ("pndm", PNDMScheduler, {"skip_prk_steps": True, "steps_offset": 1}),
    ("pndm", PNDMScheduler, {"skip_prk_steps": True, "prediction_type": "v_prediction", "set_alpha_to_one": True}),
    ("pndm", PNDMScheduler, {}),  # the Runge-Kutta warm-up
    ("pndm", PNDMScheduler, {"skip_prk_steps": True, "timestep_spacing": "linspace"}),
    ("unipc", UniPCMultistepScheduler, {}), ("unipc", UniPCMultistepScheduler, {"prediction_type": "v_prediction"}),
    ("unipc", UniPCMultistepScheduler, {"solver_order": 3, "disable_corrector": [0, 3], "timestep_spacing": "trailing"}),
    ("unipc", UniPCMultistepScheduler, {"use_karras_sigmas": True, "beta_schedule": "scaled_linear",
                                        "beta_start": 0.00085, "beta_end": 0.012}),
    ("unipc", UniPCMultistepScheduler, {"solver_type": "bh1", "final_sigmas_type": "sigma_min", "solver_order": 3}),
    ("unipc", UniPCMultistepScheduler, {"predict_x0": False, "final_sigmas_type": "sigma_min",
                                        "timestep_spacing": "leading", "prediction_type": "sample"}),
]
NOISE_FROM_RANDN = {"euler-a": diffusers_euler_a, "ddpm": diffusers_ddpm}  # modules whose noise we hand in


def feed_noise(monkeypatch, name, noises):
    """diffusers' Euler ancestral and DDPM draw their noise with randn_tensor: hand them ours, in order."""
    if name in NOISE_FROM_RANDN:
        it = iter(noises)
        monkeypatch.setattr(NOISE_FROM_RANDN[name], "randn_tensor", lambda *a, **k: torch.from_numpy(next(it)))
    return noises if name in NOISE_FROM_RANDN else None


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("name,cls,config", CASES, ids=[f"{n}-{'-'.join(c) or 'default'}" for n, _, c in CASES])
def test_sampler_matches_diffusers(unet, monkeypatch, name, cls, config, steps):
    cfg = {**BASE, **config}
    x = np.random.default_rng(steps).standard_normal((2, 2, 8, 8)).astype(np.float32)
    noises = feed_noise(monkeypatch, name, np.random.default_rng(1).standard_normal((steps + 9, 2, 2, 8, 8),
                                                                                     dtype=np.float32))
    theirs, dts = run_diffusers(unet, cls(**cfg), steps, x)
    ours, ts = run_ours(unet, cfg, name, steps, x, noises)
    np.testing.assert_allclose(ts, dts, rtol=0, atol=1e-3)
    assert rel(ours, theirs) <= TOL, rel(ours, theirs)


GUIDED = [("ddim", DDIMScheduler, {}), ("dpmpp-2m", DPMSolverMultistepScheduler, {}),
          ("dpmpp-2m-sde", DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
          ("dpmpp-3m", DPMSolverMultistepScheduler, {"solver_order": 3}),
          ("euler", EulerDiscreteScheduler, {"timestep_spacing": "leading"}),
          ("euler-a", EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}),
          ("ddpm", DDPMScheduler, {}), ("pndm", PNDMScheduler, {"skip_prk_steps": True}),
          ("unipc", UniPCMultistepScheduler, {})]


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("name,cls,config", GUIDED, ids=[n for n, _, _ in GUIDED])
def test_guided_sampling_loop_matches_diffusers(tiny_cond_dir, monkeypatch, name, cls, config, steps):
    """The runtime's SamplingLoop with classifier-free guidance (scale 3) over the PyTorch
    cross-attention UNet, against diffusers' scheduler with the pipelines' guidance ([null; cond]
    in one batch). Integer timesteps (the configs' spacings give them), so the loop's rounding
    for engines is not in play."""
    from dmcompile import api
    from dmcompile.frontend.torch_model import TorchEpsModel

    loaded = api.load_model(str(tiny_cond_dir))
    cfg = {**{k: v for k, v in loaded.scheduler_config.items() if not k.startswith("_")}, **config}
    n, scale = 2, 3.0
    cond, null = embeddings(n, 1), np.zeros((1, L, D), np.float32)
    raw = np.random.default_rng(7).standard_normal((n, 4, 8, 8), dtype=np.float32)
    draws = np.random.default_rng(8).standard_normal((steps + 9, n, 4, 8, 8), dtype=np.float32)

    sched = cls.from_config(cfg)
    sched.set_timesteps(steps)
    feed_noise(monkeypatch, name, draws)
    x = torch.from_numpy(raw) * sched.init_noise_sigma
    both = torch.from_numpy(np.concatenate([np.repeat(null, n, 0), cond]))
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            inp = sched.scale_model_input(x, t)
            u, c = loaded.unet(torch.cat([inp, inp]), t, encoder_hidden_states=both).sample.chunk(2)
            kw = {"variance_noise": torch.from_numpy(draws[i])} if "sde" in name else {}
            x = sched.step(u + scale * (c - u), t, x, **kw).prev_sample
    theirs = x.numpy()

    class Draws:  # the loop's generator, handing out diffusers' draws
        def __init__(self):
            self.i = 0

        def standard_normal(self, shape, dtype=np.float32):
            self.i += 1
            return draws[self.i - 1]

    sampler = make_sampler(name, NoiseSchedule.from_config(cfg))
    sampler.set_timesteps(steps)
    assert np.array_equal(sampler.timesteps, np.rint(sampler.timesteps))
    model = TorchEpsModel(loaded, null={"encoder_hidden_states": null[0]})
    loop = SamplingLoop(model, sampler, batch_size=n, guidance_scale=scale)
    ours = loop.run(raw * np.float32(sampler.init_noise_sigma), Draws(), cond={"encoder_hidden_states": cond})
    assert rel(ours, theirs) <= TOL, rel(ours, theirs)


def test_new_samplers_refuse_what_they_do_not_implement():
    schedule = NoiseSchedule.from_config(BASE)
    cases = [("euler-a", {"use_karras_sigmas": True}, "use_karras_sigmas"),
             ("euler-a", {"prediction_type": "sample"}, "prediction_type 'sample'"),
             ("ddpm", {"variance_type": "learned_range"}, "learned_range"),
             ("ddpm", {"variance_type": "fixed_large_log"}, "fixed_large_log"),
             ("pndm", {"prediction_type": "sample"}, "epsilon or v_prediction"),
             ("unipc", {"solver_type": "bh3"}, "bh1 or bh2"), ("unipc", {"solver_order": 4}, "1, 2 or 3"),
             ("unipc", {"use_flow_sigmas": True}, "use_flow_sigmas"),
             ("unipc", {"solver_type": "bh1"}, "sigma_min"), ("unipc", {"predict_x0": False}, "sigma_min")]
    for name, options, what in cases:
        with pytest.raises(InputError, match=what):
            make_sampler(name, schedule, **options)
    pndm = make_sampler("pndm", schedule)  # the Runge-Kutta warm-up needs four steps
    with pytest.raises(InputError, match=r"in \[4, 1000\]"):
        pndm.set_timesteps(3)
    for name in ("ddpm", "pndm", "unipc", "euler-a"):
        with pytest.raises(InputError, match="must be an integer in|steps in"):
            make_sampler(name, schedule).set_timesteps(1001)
    x = np.zeros((1, 2, 8, 8), np.float32)
    for name in ("ddpm", "euler-a"):
        s = make_sampler(name, schedule)
        s.set_timesteps(4)
        with pytest.raises(InputError, match="needs a random generator"):
            s.step(x, s.timesteps[0], x)
