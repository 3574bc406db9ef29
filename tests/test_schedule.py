"""dmruntime's schedule and DDIM update against diffusers' DDIMScheduler."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from dmcompile.zoo.architectures import DDPM_LINEAR_SCHEDULER
from dmruntime import InputError, NoiseSchedule, ddim_step, ddim_timesteps


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 50, 333, 1000])
def test_timesteps_match_diffusers(spacing, steps):
    cfg = {**DDPM_LINEAR_SCHEDULER, "timestep_spacing": spacing}
    ref = DDIMScheduler.from_config(cfg)
    ref.set_timesteps(steps)
    got = ddim_timesteps(NoiseSchedule.from_config(cfg), steps)
    np.testing.assert_array_equal(got, ref.timesteps.numpy())


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(beta_schedule):
    cfg = {**DDPM_LINEAR_SCHEDULER, "beta_schedule": beta_schedule}
    ref = DDIMScheduler.from_config(cfg)
    got = NoiseSchedule.from_config(cfg).alphas_cumprod
    np.testing.assert_allclose(got, ref.alphas_cumprod.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_step_matches_diffusers(eta, clip, prediction_type):
    cfg = {**DDPM_LINEAR_SCHEDULER, "clip_sample": clip, "prediction_type": prediction_type}
    ref = DDIMScheduler.from_config(cfg)
    ref.set_timesteps(20)
    sched = NoiseSchedule.from_config(cfg)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1, 4, 4)).astype(np.float32)
    for t in ref.timesteps[:: 5].tolist() + [ref.timesteps[-1].item()]:
        out = (rng.standard_normal(x.shape) * 1.5).astype(np.float32)
        noise = rng.standard_normal(x.shape).astype(np.float32)
        want = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), eta=eta,
                        variance_noise=torch.from_numpy(noise)).prev_sample.numpy()
        got = ddim_step(sched, out, t, t - 1000 // 20, x, eta=eta, noise=noise)
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)


def test_bad_schedule_inputs():
    sched = NoiseSchedule.from_config(DDPM_LINEAR_SCHEDULER)
    with pytest.raises(InputError, match="steps must be an integer"):
        ddim_timesteps(sched, 0)
    with pytest.raises(InputError, match="steps must be an integer"):
        ddim_timesteps(sched, 1001)
    with pytest.raises(InputError, match="beta_schedule"):
        NoiseSchedule.from_config({**DDPM_LINEAR_SCHEDULER, "beta_schedule": "sigmoid"})
    with pytest.raises(InputError, match="needs a noise"):
        ddim_step(sched, np.zeros((1, 1, 2, 2), np.float32), 500, 480, np.zeros((1, 1, 2, 2), np.float32), eta=1.0)
