"""Tiny seeded Stable Diffusion pipeline folders (the real CLIP vocabulary, random weights) for
the text-to-image tests: SD 1.x style (CLIP tokenizer padding with <|endoftext|>, quick_gelu) or
SD 2.x style (OpenCLIP: padding with "!", gelu, v-prediction), saved as diffusers saves them."""

from __future__ import annotations

import shutil
from pathlib import Path

from dmcompile.frontend.text import write_clip_tokenizer


def make_pipeline(folder: Path, *, sd2: bool = False, tokenizer_form: str = "vocab", seed: int = 0,
                  scheduler: str = "PNDMScheduler", hidden: int = 32, sample_size: int = 8,
                  vocab_size: int = 49408) -> Path:
    """A StableDiffusionPipeline folder. tokenizer_form: "vocab" (vocab.json + merges.txt, as older
    folders and SD 1.5's own) or "json" (tokenizer.json, as transformers 5 saves it)."""
    import diffusers
    import torch
    import transformers

    folder = Path(folder)
    torch.manual_seed(seed)
    text_cfg = transformers.CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                           num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                           hidden_act="gelu" if sd2 else "quick_gelu",
                                           pad_token_id=0 if sd2 else 1, bos_token_id=49406, eos_token_id=49407)
    text_encoder = transformers.CLIPTextModel(text_cfg).eval()
    unet = diffusers.UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden, attention_head_dim=4 if sd2 else 8, norm_num_groups=8,
        use_linear_projection=sd2).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  latent_channels=4, norm_num_groups=8, sample_size=2 * sample_size).eval()
    sched_cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                     steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False,
                     prediction_type="v_prediction" if sd2 else "epsilon")
    sched = getattr(diffusers, scheduler).from_config(sched_cfg)
    tmp_tok = folder.parent / f".{folder.name}-tok"
    write_clip_tokenizer(tmp_tok, size=vocab_size, pad_token="!" if sd2 else "<|endoftext|>")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tmp_tok))
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    if tokenizer_form == "vocab":  # what older diffusers folders hold: no tokenizer.json
        shutil.rmtree(folder / "tokenizer")
        shutil.copytree(tmp_tok, folder / "tokenizer")
    shutil.rmtree(tmp_tok)
    return folder


def make_sdxl_pipeline(folder: Path, *, seed: int = 0, tokenizer_form: str = "vocab", hidden: tuple = (32, 48),
                       projection: int = 40, time_dim: int = 8, force_zeros: bool = True, sample_size: int = 8,
                       scheduler: str = "EulerDiscreteScheduler") -> Path:
    """A StableDiffusionXLPipeline folder with SDXL's structure at toy width: CLIPTextModel +
    CLIPTextModelWithProjection (pads <|endoftext|> and "!"), a text_time UNet whose
    cross-attention width is the two encoders' together, add_embedding fed the second encoder's
    pooled projection and 6 time ids, SDXL's scheduler settings."""
    import diffusers
    import torch
    import transformers

    folder = Path(folder)
    torch.manual_seed(seed)

    def text_config(width, **kw):
        return transformers.CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width,
                                           num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77,
                                           bos_token_id=49406, eos_token_id=49407, **kw)

    text_encoder = transformers.CLIPTextModel(text_config(hidden[0], hidden_act="quick_gelu", pad_token_id=1)).eval()
    text_encoder_2 = transformers.CLIPTextModelWithProjection(
        text_config(hidden[1], hidden_act="gelu", pad_token_id=0, projection_dim=projection)).eval()
    unet = diffusers.UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=sum(hidden), attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=projection + 6 * time_dim).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  latent_channels=4, norm_num_groups=8, sample_size=2 * sample_size,
                                  scaling_factor=0.13025).eval()
    sched_cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                     steps_offset=1, timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon",
                     use_karras_sigmas=False, clip_sample=False, set_alpha_to_one=False)
    sched = getattr(diffusers, scheduler).from_config(sched_cfg)
    toks = []
    for i, pad in enumerate(("<|endoftext|>", "!")):
        tmp = folder.parent / f".{folder.name}-tok{i}"
        write_clip_tokenizer(tmp, pad_token=pad)
        toks.append((tmp, transformers.CLIPTokenizer.from_pretrained(str(tmp))))
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                               tokenizer=toks[0][1], tokenizer_2=toks[1][1], unet=unet, scheduler=sched,
                                               force_zeros_for_empty_prompt=force_zeros)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for (tmp, _), sub in zip(toks, ("tokenizer", "tokenizer_2")):
        if tokenizer_form == "vocab":
            shutil.rmtree(folder / sub)
            shutil.copytree(tmp, folder / sub)
        shutil.rmtree(tmp)
    return folder
