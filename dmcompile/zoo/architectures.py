"""UNet architecture configs for the embedded model and the presets.

Each is the keyword set for ``diffusers.UNet2DModel``; values are plain JSON types so
they can be written to a diffusers ``config.json`` unchanged.
"""

from __future__ import annotations

DIGITS16_UNET = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 2,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 16,
    "attention_head_dim": 32,
}

# Exact architecture of google/ddpm-cifar10-32 (its config.json), 35.7 M parameters.
DDPM_CIFAR10_32_UNET = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "act_fn": "silu",
    "attention_head_dim": None,
    "center_input_sample": False,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "time_embedding_type": "positional",
}

# The DDPM linear schedule of Ho et al. (2020), as google/ddpm-cifar10-32 ships it.
DDPM_LINEAR_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": True,
    "prediction_type": "epsilon",
    "variance_type": "fixed_small",
}

# Exact UNet of Stable Diffusion 1.5 (its unet/config.json), 859.5 M parameters: 3.4 GB of
# fp32 weights, past protobuf's 2 GB limit, so it travels as ONNX external data.
SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# Stable Diffusion 1.x's schedule (its scheduler_config.json; sampled here with DDIM).
SD_SCALED_LINEAR_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

# Stable Diffusion XL 1.0 base's UNet (its unet/config.json; 2.57 B parameters): text_time added
# conditions (the 1280-wide pooled projection + 6 time ids x 256), cross-attention width 2048 (768 +
# 1280: both text encoders), transformer depths 1 / 2 / 10, no attention at the first level.
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
# The same blocks, depths, head counts and inputs at half width: with 32 norm groups and 5 / 10 / 20
# heads the first width must be a multiple of 160, so 160 and SDXL's 320 are the only widths of this
# structure; 320 does not build in 24 GB (benchmarks/README.md, "SDXL").
SDXL_UNET_HALF = {**SDXL_UNET, "block_out_channels": [160, 320, 640]}

# SDXL's scheduler_config.json: SD's schedule, sampled with Euler on "leading" timesteps
SDXL_SCHEDULER = {**SD_SCALED_LINEAR_SCHEDULER, "_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear",
                  "sample_max_value": 1.0, "timestep_spacing": "leading", "use_karras_sigmas": False}

# digits-ldm: Stable Diffusion in miniature (benchmarks/train_ldm.py). The autoencoder maps
# 1x16x16 digits to 4x8x8 latents; the UNet's cross-attention reads a learned class embedding.
DIGITS_LDM_VAE = {
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": 16,
}
DIGITS_LDM_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [48, 96],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "norm_num_groups": 16,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}

# digits-t2i: Stable Diffusion's structure in miniature. A CLIP text encoder over the first 8192
# tokens of CLIP's own BPE vocabulary (every digit word is one token there), a cross-attention
# UNet reading its 77 hidden states, digits-ldm's VAE, SD's scaled-linear PNDM schedule.
DIGITS_T2I_VOCAB = 8192
DIGITS_T2I_TEXT = {
    "vocab_size": DIGITS_T2I_VOCAB,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": DIGITS_T2I_VOCAB - 2,
    "eos_token_id": DIGITS_T2I_VOCAB - 1,
    "pad_token_id": 1,
}
DIGITS_T2I_UNET = {**DIGITS_LDM_UNET, "cross_attention_dim": 64}

# Stable Diffusion 1.5's text encoder (CLIP ViT-L/14's text tower: its text_encoder/config.json) and
# VAE (vae/config.json); with SD15_UNET and SD_SCALED_LINEAR_SCHEDULER the whole sd15 pipeline.
SD15_TEXT_ENCODER = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
