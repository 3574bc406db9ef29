"""Embedded models: the trained default ``digits16``, the conditional latent ``digits-ldm``
(a diffusers pipeline folder: vae/, unet/, scheduler/, conditions.npz), the text-to-image
``digits-t2i`` (a StableDiffusionPipeline folder: tokenizer/, text_encoder/, unet/, vae/,
scheduler/, calibration_prompts.txt), random-weight architecture presets and pipeline presets."""

from __future__ import annotations

from pathlib import Path

from .architectures import (DDPM_CIFAR10_32_UNET, DDPM_LINEAR_SCHEDULER, SD15_TEXT_ENCODER, SD15_UNET, SD15_VAE,
                            SD_SCALED_LINEAR_SCHEDULER, SDXL_SCHEDULER, SDXL_UNET, SDXL_UNET_HALF)

ZOO_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = "digits16"

# name -> folder with config.json + safetensors + scheduler_config.json (trained weights)
TRAINED = {"digits16": ZOO_DIR / "digits16", "digits-ldm": ZOO_DIR / "digits-ldm", "digits-t2i": ZOO_DIR / "digits-t2i"}
# name -> (UNet config, scheduler config); weights are random, seeded. sd15-unet (859.5 M parameters)
# and the SDXL UNets (2.57 B; half width 0.73 B) are for benchmarks, not CI.
PRESETS = {"ddpm-cifar10-32": (DDPM_CIFAR10_32_UNET, DDPM_LINEAR_SCHEDULER),
           "sd15-unet": (SD15_UNET, SD_SCALED_LINEAR_SCHEDULER),
           "sdxl-unet": (SDXL_UNET, SDXL_SCHEDULER),
           "sdxl-unet-half": (SDXL_UNET_HALF, SDXL_SCHEDULER)}
# name -> (text encoder, UNet, VAE, scheduler configs): whole text-to-image pipelines with seeded random
# weights, written once as a diffusers folder under the cache (benchmarks, not CI: sd15 is 4.3 GB)
PIPELINE_PRESETS = {"sd15": (SD15_TEXT_ENCODER, SD15_UNET, SD15_VAE, SD_SCALED_LINEAR_SCHEDULER)}
CLASSIFIER_DIR = ZOO_DIR / "classifier"
# text-to-image calibration prompts when neither --calib-prompts nor the pipeline folder gives any
DEFAULT_PROMPTS = ZOO_DIR / "calibration_prompts.txt"


def names() -> list[str]:
    return sorted([*TRAINED, *PRESETS, *PIPELINE_PRESETS])
