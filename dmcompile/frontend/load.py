"""Load a model argument (zoo name or local diffusers folder) into a :class:`LoadedModel`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dmruntime.errors import InputError
from dmruntime.schedule import NoiseSchedule

from .. import scratch, zoo
from ..artifacts import cache_dir
from ..errors import ModelError
from .family import ModelFamily, ModelInput, get_family
from .text import load_text_parts, write_clip_tokenizer

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PROMPTS_FILE = "calibration_prompts.txt"  # a pipeline folder's own calibration prompts (dmcompile's convention)


@dataclass(frozen=True)
class LoadedModel:
    """A UNet ready to trace: the torch module (eval mode), its configs, and where it came from."""

    id: str
    source: str  # "zoo", "preset" or a folder path
    unet: object = field(repr=False)
    unet_config: dict = field(repr=False)
    scheduler_config: dict = field(repr=False)
    seed: int | None = None  # the random-weight seed of a preset; None for trained weights
    cls: str = "UNet2DModel"
    vae: object = field(default=None, repr=False)  # latent models: the autoencoder whose decoder makes images
    vae_config: dict | None = field(default=None, repr=False)
    default_conditions: Path | None = None  # a pipeline's conditions.npz (null condition, class table)
    text: tuple = field(default=(), repr=False)  # text-to-image pipelines: (tokenizer, text encoder) parts
    default_prompts: Path | None = None  # a pipeline's calibration_prompts.txt
    pipeline: dict = field(default_factory=dict, repr=False)  # the pipeline folder's model_index.json

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """SDXL pipelines: no negative prompt means zero conditions (diffusers' default True)."""
        return bool(self.family.pooled_input) and bool(self.pipeline.get("force_zeros_for_empty_prompt", True))

    @property
    def scaling_factor(self) -> float | None:
        """Latents are the VAE's latents times this (decode divides by it); None without a VAE."""
        return float(self.vae_config.get("scaling_factor", 0.18215)) if self.vae_config else None

    @property
    def family(self) -> ModelFamily:
        """What dmcompile knows of this model class: inputs, conditioning, default float layers."""
        return get_family(self.cls, config=self.unet_config)

    @property
    def num_classes(self) -> int | None:
        """Class labels the model embeds (``num_class_embeds``), or None."""
        return self.family.num_classes(self.unet_config)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.family.sample_shape(self.unet_config)

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel: the VAE's downsampling, 8 (SD's) without a VAE."""
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1) if self.vae_config else 8

    @property
    def condition_defaults(self) -> dict[str, list]:
        """Conditioning inputs the pipeline derives (SDXL's time_ids): name -> one row."""
        return self.family.condition_defaults(self.unet_config, self.vae_scale_factor)

    @property
    def inputs(self) -> tuple[ModelInput, ...]:
        """The graph's inputs: sample, timestep, then the conditioning inputs."""
        return self.family.inputs(self.unet_config)

    @property
    def condition_inputs(self) -> tuple[ModelInput, ...]:
        """Conditioning inputs in the order the engine takes them."""
        return self.family.condition_inputs(self.unet_config)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())

    def describe(self) -> dict:
        """JSON-able description for manifests."""
        return {"id": self.id, "source": self.source, "seed": self.seed, "class": self.cls,
                "vae": (self.vae_config or {}).get("_class_name") if self.vae is not None else None,
                "parameters": self.num_parameters(), "sample_shape": list(self.sample_shape),
                **({"text_encoders": [p.slot for p in self.text]} if self.text else {}),
                "inputs": [{"name": i.name, "dtype": i.dtype, "shape": list(i.shape)} for i in self.inputs],
                "unet_config": self.unet_config}


def _json_config(cfg) -> dict:
    """A diffusers config as plain JSON values. diffusers builds ``_use_default_values`` from a
    set, so its order changes with the interpreter's hash seed: sorted here, or cache keys and
    manifests would differ from one process to the next."""
    out = {}
    for k, v in dict(cfg).items():
        if isinstance(v, tuple):
            v = list(v)
        if k == "_use_default_values" and isinstance(v, list):
            v = sorted(v)
        out[k] = v
    return out


def check_supported(cls: str, config: dict, what: str) -> None:
    """Raise ModelError for a model class or feature the frontend cannot export."""
    get_family(cls, what, config).check(config, what)


def _build_unet(config: dict, what: str, cls: str = "UNet2DModel"):
    import diffusers

    check_supported(cls, config, what)
    try:
        return getattr(diffusers, cls).from_config({k: v for k, v in config.items()})
    except Exception as e:
        raise ModelError(f"{what}: config.json does not describe a valid {cls} ({e}); fix the config") from e


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{what}: {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{what}: {path} must hold a JSON object")
    return data


def _find_scheduler_config(folder: Path) -> Path | None:
    for p in (folder / "scheduler_config.json", folder.parent / "scheduler" / "scheduler_config.json"):
        if p.is_file():
            return p
    return None


def load_folder(folder: Path, model_id: str | None = None, source: str | None = None) -> LoadedModel:
    """Load a local diffusers UNet folder (or a pipeline folder with unet/ and scheduler/)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    what = f"model folder {folder}"
    if not folder.is_dir():
        raise ModelError(f"{what} does not exist. Pass a zoo name ({', '.join(zoo.names())}) "
                         "or a diffusers UNet folder with config.json, safetensors weights and scheduler_config.json")
    root = None
    if (folder / "unet").is_dir() and not (folder / "config.json").exists():
        root, folder = folder, folder / "unet"
        what = f"model folder {folder}"
    config = _read_json(folder / "config.json", what)
    cls = config.get("_class_name", "UNet2DModel")
    check_supported(cls, config, what)
    weights = next((folder / w for w in WEIGHT_FILES if (folder / w).is_file()), None)
    if weights is None:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
        hint = (f" It has {pickled}: dmcompile never loads pickled weights; convert them with "
                "safetensors (save_pretrained(..., safe_serialization=True)).") if pickled else ""
        raise ModelError(f"{what} has no {WEIGHT_FILES[0]}.{hint}")
    sched_path = _find_scheduler_config(folder)
    if sched_path is None:
        raise ModelError(f"{what} has no scheduler_config.json (looked in the folder and in ../scheduler/); "
                         "copy the scheduler config of the pipeline the UNet was trained with")
    scheduler = _read_json(sched_path, what)
    try:  # the runtime's checks, before minutes of export and calibration
        NoiseSchedule.from_config(scheduler)
    except InputError as e:
        raise ModelError(f"{sched_path}: {e}") from None
    unet = _build_unet(config, what, cls)
    try:
        state = load_file(str(weights))
    except Exception as e:
        raise ModelError(f"{what}: cannot read {weights.name} ({e}); the file is corrupt") from e
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{what}: weights do not match config.json ({str(e).splitlines()[0]})") from e
    bad = next((k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()), None)
    if bad is not None:
        raise ModelError(f"{what}: weight {bad} in {weights.name} holds NaN or inf values; the checkpoint is corrupt "
                         "or its training diverged: use another checkpoint")
    unet.eval().requires_grad_(False)
    unet_config = _json_config(unet.config)
    vae, vae_config = load_vae(root / "vae", unet_config) if root and (root / "vae").is_dir() else (None, None)
    conds = root / "conditions.npz" if root and (root / "conditions.npz").is_file() else None
    family = get_family(cls, what, config)
    pipeline = _pipeline_config(root) if root else {}
    text = load_text_parts(root, unet_config, family.pooled_input, family.pooled_width(unet_config)) if root else ()
    if text and vae is None:
        raise ModelError(f"pipeline folder {root} has a text encoder but no vae/: dmcompile needs the VAE to turn "
                         "the UNet's latents into images")
    prompts = root / PROMPTS_FILE if root and (root / PROMPTS_FILE).is_file() else None
    return LoadedModel(model_id or (root or folder).name, source or str(root or folder), unet, unet_config,
                       scheduler, cls=cls, vae=vae, vae_config=vae_config, default_conditions=conds, text=text,
                       default_prompts=prompts, pipeline=pipeline)


def _pipeline_config(root: Path) -> dict:
    """The pipeline folder's model_index.json ({} without one); ModelError for a pipeline whose
    conditioning dmcompile does not build (SDXL's refiner: an aesthetic score in its time ids)."""
    path = root / "model_index.json"
    config = _read_json(path, f"pipeline folder {root}") if path.is_file() else {}
    if config.get("requires_aesthetics_score"):
        raise ModelError(f"pipeline folder {root}: {config.get('_class_name', 'this pipeline')} conditions on an "
                         "aesthetic score (requires_aesthetics_score: SDXL's refiner, 5 time ids), which dmcompile does "
                         "not support; use the SDXL base pipeline")
    return config


VAE_CLASSES = ("AutoencoderKL", "VQModel")


def load_vae(folder: Path, unet_config: dict):
    """The pipeline's autoencoder (AutoencoderKL or VQModel) from ``folder``; ModelError when
    it cannot be read or its latents do not fit the UNet."""
    import diffusers
    from safetensors.torch import load_file

    what = f"VAE folder {folder}"
    config = _read_json(folder / "config.json", what)
    cls = config.get("_class_name", "AutoencoderKL")
    if cls not in VAE_CLASSES:
        raise ModelError(f"{what}: autoencoder class {cls!r} is not supported; dmcompile handles {VAE_CLASSES}")
    weights = next((folder / w for w in WEIGHT_FILES if (folder / w).is_file()), None)
    if weights is None:
        raise ModelError(f"{what} has no {WEIGHT_FILES[0]} (dmcompile reads safetensors only)")
    try:
        vae = getattr(diffusers, cls).from_config(config)
        vae.load_state_dict(load_file(str(weights)), strict=True)
    except Exception as e:
        raise ModelError(f"{what}: cannot load the {cls} ({str(e).splitlines()[0]}); fix its config or weights") from e
    latent = int(vae.config.latent_channels)
    if latent != int(unet_config["in_channels"]) or latent != int(unet_config["out_channels"]):
        raise ModelError(f"the pipeline's parts disagree: the VAE has {latent} latent channels, the UNet takes "
                         f"{unet_config['in_channels']} and predicts {unet_config['out_channels']}; use a VAE and "
                         "UNet trained together")
    vae.eval().requires_grad_(False)
    return vae, _json_config(vae.config)


def build_preset(name: str, seed: int = 0) -> LoadedModel:
    """An architecture preset with seeded random weights (the global torch RNG is left untouched)."""
    import torch

    unet_cfg, sched_cfg = zoo.PRESETS[name]
    cls = unet_cfg.get("_class_name", "UNet2DModel")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _build_unet({k: v for k, v in unet_cfg.items() if k != "_class_name"}, f"preset {name}", cls)
    unet.eval().requires_grad_(False)
    return LoadedModel(name, "preset", unet, _json_config(unet.config), dict(sched_cfg), seed=seed, cls=cls)


def build_pipeline_preset(name: str, seed: int = 0) -> Path:
    """The diffusers folder of a pipeline preset (text encoder, UNet, VAE, scheduler, CLIP's
    tokenizer as vocab.json + merges.txt) with weights seeded by ``seed``, written once under
    ``cache_dir()/presets`` (a temporary sibling, then a rename) and reused."""
    import os
    import shutil
    import sys

    import diffusers  # heavy: only when a preset is first written
    import torch
    import transformers

    folder = cache_dir() / "presets" / f"{name}-seed{seed}"
    if (folder / "model_index.json").is_file():
        return folder
    text_cfg, unet_cfg, vae_cfg, sched_cfg = zoo.PIPELINE_PRESETS[name]
    print(f"writing the {name} preset (seeded random weights) to {folder} once", file=sys.stderr, flush=True)
    tmp = scratch.temp_dir(folder.parent, folder.name)  # locked: `dmcompile cache --clean` leaves it while we run
    try:
        with torch.random.fork_rng(devices=[]):
            for i, (sub, make) in enumerate((
                    ("text_encoder", lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_cfg))),
                    ("unet", lambda: diffusers.UNet2DConditionModel(**unet_cfg)),
                    ("vae", lambda: diffusers.AutoencoderKL(**vae_cfg)))):
                torch.manual_seed(seed + i)
                part = make()
                part.save_pretrained(str(tmp / sub), safe_serialization=True)
                del part
        write_clip_tokenizer(tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched_cfg, indent=2))
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", sched_cfg["_class_name"]],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "safety_checker": [None, None], "feature_extractor": [None, None]}, indent=2))
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        scratch.release(tmp)
    return folder


def load_model(spec: str | Path | None = None, seed: int = 0) -> LoadedModel:
    """Load a model: a zoo name (``digits16``, ``ddpm-cifar10-32``), a local folder, or None
    for the default. ``seed`` sets a preset's random weights."""
    spec = zoo.DEFAULT_MODEL if spec is None else spec
    name = str(spec)
    if name in zoo.TRAINED:
        return load_folder(zoo.TRAINED[name], model_id=name, source="zoo")
    if name in zoo.PRESETS:
        return build_preset(name, seed=seed)
    if name in zoo.PIPELINE_PRESETS:
        import dataclasses

        return dataclasses.replace(load_folder(build_pipeline_preset(name, seed), model_id=name, source="preset"),
                                   seed=seed)
    path = Path(name)
    if not path.exists() and "/" not in name and "\\" not in name:
        raise ModelError(f"unknown model {name!r}: not a zoo name ({', '.join(zoo.names())}) "
                         "and no such folder. Pass a zoo name or a local diffusers UNet folder")
    return load_folder(path)
