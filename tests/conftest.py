"""Shared fixtures: a tiny seeded UNet folder and its export, built once per session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A small UNet2DModel with everything digits16 has (ResNet blocks, GroupNorm, SiLU, attention).
TINY_UNET = {
    "sample_size": 8,
    "in_channels": 2,
    "out_channels": 2,
    "layers_per_block": 1,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
    "attention_head_dim": 8,
}


def pytest_configure(config):
    # Cached fp32 exports go to a per-run folder, never to the user's cache.
    os.environ.setdefault("DMCOMPILE_CACHE", str(Path(config.rootpath) / ".pytest_cache" / "dmcompile"))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # two workers on two cores: PyTorch's own thread pool per worker spins against the other
        # worker (a tiny UNet's 50-step run took 40x longer); one thread each
        import torch

        torch.set_num_threads(1)


def make_unet_folder(path: Path, unet_config: dict = TINY_UNET, seed: int = 0) -> Path:
    """A seeded UNet2DModel folder (see make_model_folder)."""
    return make_model_folder(path, unet_config, seed)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_unet_folder(tmp_path_factory.mktemp("tiny") / "unet")


@pytest.fixture(scope="session")
def tiny_export(tiny_model_dir, tmp_path_factory) -> Path:
    from dmcompile import api

    out = tmp_path_factory.mktemp("export") / "tiny-fp"
    api.export(str(tiny_model_dir), out)
    return out


# A tiny Stable-Diffusion-shaped UNet: cross-attention (dim 12) in the down and up blocks.
TINY_COND_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [8, 16],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "norm_num_groups": 4,
    "cross_attention_dim": 12,
    "attention_head_dim": 4,
}
# A tiny class-conditional UNet2DModel: 5 class embeddings (class 4 serves as the null class).
TINY_CLASS_UNET = {**TINY_UNET, "num_class_embeds": 5}


def make_model_folder(path: Path, config: dict, seed: int = 0) -> Path:
    """A seeded diffusers UNet folder of any supported class, with a DDPM scheduler config."""
    import diffusers
    import torch

    from dmcompile.zoo.architectures import DDPM_LINEAR_SCHEDULER

    cfg = dict(config)
    cls = getattr(diffusers, cfg.pop("_class_name", "UNet2DModel"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = cls(**cfg)
        # A random UNet's eps is large and erratic, so 50 DDIM steps amplify float32 rounding
        # differences chaotically (0.2 apart after 50 steps between two PyTorch runs with
        # reordered arithmetic). A small output layer makes it contract like a trained denoiser.
        with torch.no_grad():
            unet.conv_out.weight.mul_(0.05)
            unet.conv_out.bias.mul_(0.05)
    unet.save_pretrained(path, safe_serialization=True)
    (path / "scheduler_config.json").write_text(json.dumps(DDPM_LINEAR_SCHEDULER))
    return path


@pytest.fixture(scope="session")
def tiny_cond_dir(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("tinycond") / "unet", TINY_COND_UNET)


@pytest.fixture(scope="session")
def tiny_class_dir(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("tinyclass") / "unet", TINY_CLASS_UNET)


TINY_VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "block_out_channels": [8, 8],
    "latent_channels": 4, "norm_num_groups": 4, "sample_size": 16,
}


def make_pipeline_folder(root: Path, unet_config: dict = TINY_COND_UNET, vae_config: dict = TINY_VAE,
                         seed: int = 0) -> Path:
    """A latent pipeline folder: model_index.json, unet/, scheduler/, vae/ (seeded weights)."""
    import diffusers
    import torch

    make_model_folder(root / "unet", unet_config, seed)
    (root / "scheduler").mkdir(parents=True)
    (root / "unet" / "scheduler_config.json").rename(root / "scheduler" / "scheduler_config.json")
    cfg = dict(vae_config)
    cls = cfg.pop("_class_name")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        getattr(diffusers, cls)(**cfg).save_pretrained(root / "vae", safe_serialization=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "LDMTextToImagePipeline",
                                                       "unet": ["diffusers", unet_config["_class_name"]],
                                                       "vae": ["diffusers", cls]}))
    return root


@pytest.fixture(scope="session")
def tiny_latent_dir(tmp_path_factory) -> Path:
    return make_pipeline_folder(tmp_path_factory.mktemp("latent") / "pipe")


def run_without_torch(body: str, cwd: Path) -> None:
    """Run ``body`` (Python, dedented) in a fresh interpreter that sees only dmruntime and where
    importing torch or diffusers fails; afterwards neither they nor dmcompile may be loaded."""
    import os
    import subprocess
    import sys
    import textwrap

    script = "\n".join([
        "import sys",
        "class Block:",
        "    def find_spec(self, name, path=None, target=None):",
        "        if name.split('.')[0] in ('torch', 'diffusers'):",
        "            raise ImportError('blocked: ' + name)",
        "sys.meta_path.insert(0, Block())",
        textwrap.dedent(body),
        "try:",
        "    import torch",
        "except ImportError:",
        "    pass",
        "else:",
        "    raise SystemExit('torch import was not blocked')",
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'dmcompile')]",
        "assert not bad, bad",
        "print('ok')",
    ])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "runtimes" / "python")}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")


def build_for(profile: str, model, out, **kw):
    """A quick build for a target profile: 8 calibration trajectories x 10 steps, 4 groups, no
    fidelity run and no PTQD statistics unless asked (the target tests' common settings)."""
    from dmcompile import api
    from dmcompile.config import BuildConfig, CalibrationConfig

    kw.setdefault("calibration", CalibrationConfig(size=8, steps=10, groups=4))
    kw.setdefault("eval_samples", 0)
    kw.setdefault("correction", False)
    return api.build(str(model), out, BuildConfig(profile=profile, **kw))


# Bundles of every kind, built once per session (the target tests and the manifest fuzz share them).
L, D = 5, 12  # sequence length and width of the tiny cross-attention model's embeddings


def embeddings(n, seed=0):
    import numpy as np

    return np.random.default_rng(seed).standard_normal((n, L, D)).astype(np.float32)


@pytest.fixture(scope="session")
def ov_bundle(tiny_model_dir, tmp_path_factory) -> Path:
    """openvino-cpu's default: one engine per group, its scales compiled in."""
    return build_for("openvino-cpu", tiny_model_dir, tmp_path_factory.mktemp("ov") / "b", eval_samples=4).path


@pytest.fixture(scope="session")
def ov_shared_bundle(tiny_model_dir, tmp_path_factory) -> Path:
    """openvino-cpu with --shared-engine: one engine for every group, fed each group's scalars."""
    return build_for("openvino-cpu", tiny_model_dir, tmp_path_factory.mktemp("ovs") / "b", eval_samples=4,
                     shared_engine=True).path


@pytest.fixture(scope="session")
def trt_bundle(tiny_model_dir, tmp_path_factory) -> Path:
    return build_for("tensorrt", tiny_model_dir, tmp_path_factory.mktemp("trt") / "w8", eval_samples=4).path


@pytest.fixture(scope="session")
def latent_bundle(tiny_latent_dir, tmp_path_factory) -> Path:
    from dmcompile import api
    from dmcompile.config import BuildConfig, CalibrationConfig

    return api.build(str(tiny_latent_dir), tmp_path_factory.mktemp("lb") / "b",
                     BuildConfig(calibration=CalibrationConfig(size=2, steps=6, groups=2, batch_size=2),
                                 eval_samples=2)).path


@pytest.fixture(scope="session")
def cond_file(tmp_path_factory) -> Path:
    import numpy as np

    path = tmp_path_factory.mktemp("cond") / "c.npz"
    np.savez(path, encoder_hidden_states=embeddings(4), null_encoder_hidden_states=np.zeros((L, D), np.float32))
    return path


@pytest.fixture(scope="session")
def cond_bundle(tiny_cond_dir, cond_file, tmp_path_factory) -> Path:
    from dmcompile import api
    from dmcompile.config import BuildConfig, CalibrationConfig

    cal = CalibrationConfig(size=4, steps=6, groups=3, batch_size=4, guidance_scale=3.0, conditions=str(cond_file))
    return api.build(str(tiny_cond_dir), tmp_path_factory.mktemp("cb") / "b",
                     BuildConfig(calibration=cal, eval_samples=2)).path


@pytest.fixture(scope="session")
def class_bundle(tiny_class_dir, tmp_path_factory) -> Path:
    from dmcompile import api
    from dmcompile.config import BuildConfig, CalibrationConfig

    cal = CalibrationConfig(size=4, steps=6, groups=3, batch_size=4, guidance_scale=2.0)
    return api.build(str(tiny_class_dir), tmp_path_factory.mktemp("kb") / "b",
                     BuildConfig(calibration=cal, eval_samples=2, null_class=4)).path


def cli_fails(argv, capsys, *needles) -> str:
    """``dmcompile argv`` exits 2 with every needle in its error output; returns that output."""
    from dmcompile import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    return err


def calibration_arrays(result, groups: int = 0) -> dict:
    """A calibration's histogram states and second moments (pooled, and per group for the first
    ``groups`` groups) as named arrays: what two passes must share bit for bit."""
    from dmcompile.calibration.hessian import Moments
    from dmcompile.calibration.trajectory import _observer_arrays

    out = _observer_arrays(result.observers, result.tensors)
    if result.moments is not None:
        m = Moments(result.moments)
        for node in m.files:
            out[f"H:{node}"] = m.matrix(node)
            out.update({f"H:{node}:{g}": m.matrix(node, (g,)) for g in range(groups)})
    return out
