"""Train the embedded text-to-image model digits-t2i on scikit-learn's bundled digits.

    python benchmarks/train_t2i.py --out dmcompile/zoo/digits-t2i

Stable Diffusion in miniature: a CLIP text encoder (CLIP's BPE vocabulary, first 8192 tokens) and
a cross-attention UNet trained together on prompts about the digits ("a handwritten seven", "the
number 7", "7", "seven, written thin", ...; dmcompile.eval.prompts), 10% of them dropped to the
empty prompt for classifier-free guidance, in the latent space of digits-ldm's VAE (reused: it
was trained on the same images), with SD's scaled-linear schedule. Seeded, progress bar,
resumable (a checkpoint every --ckpt-every steps in --work; rerun the same command to continue),
wall time printed. The output is a StableDiffusionPipeline folder: model_index.json, tokenizer/
(vocab.json + merges.txt, as SD 1.5's), text_encoder/, unet/, vae/, scheduler/, and
calibration_prompts.txt (the training phrasings, dmcompile's default calibration prompts for it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmcompile.eval.prompts import training_prompts  # noqa: E402
from dmcompile.frontend.text import read_tokenizer, write_clip_tokenizer  # noqa: E402
from dmcompile.zoo import TRAINED  # noqa: E402
from dmcompile.zoo.architectures import (DIGITS_T2I_TEXT, DIGITS_T2I_UNET, DIGITS_T2I_VOCAB,  # noqa: E402
                                         SD_SCALED_LINEAR_SCHEDULER)
from dmcompile.zoo.data import load_digits16  # noqa: E402
from train_ldm import _load, _save, cosine_lr  # noqa: E402  (this folder: the same recipe)
from train_reference import ema_update, publish_folder  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--drop", type=float, default=0.1, help="share of prompts replaced by the empty prompt")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--work", type=Path, default=Path("runs/digits-t2i"))
    p.add_argument("--out", type=Path, default=Path("runs/digits-t2i/model"))
    p.add_argument("--threads", type=int, default=0)
    return p.parse_args(argv)


def scaled_linear_alphas_cumprod(cfg: dict) -> torch.Tensor:
    betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, cfg["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0).float()


def vae_latents(data: torch.Tensor):
    """digits-ldm's VAE and the scaled latent means of every image."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(TRAINED["digits-ldm"] / "vae")).eval().requires_grad_(False)
    with torch.no_grad():
        mean = torch.cat([vae.encode(data[i:i + 256]).latent_dist.mean for i in range(0, len(data), 256)])
    return vae, mean * vae.config.scaling_factor


def token_table(tok_dir: Path) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Token ids [P + 1, 77] of every training prompt (row P: the empty prompt), the prompts and
    their digits."""
    tok, _, _, _ = read_tokenizer(tok_dir, "digits-t2i")
    pairs = training_prompts()
    prompts = [p for p, _ in pairs] + [""]
    ids = torch.tensor([e.ids for e in tok.encode_batch(prompts)], dtype=torch.int64)
    return ids, prompts, torch.tensor([d for _, d in pairs])


def train(args, latents: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, digits: torch.Tensor):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(args.seed)
    text_cfg = CLIPTextConfig(**DIGITS_T2I_TEXT)
    text_cfg._attn_implementation = "eager"
    text, unet = CLIPTextModel(text_cfg), UNet2DConditionModel(**DIGITS_T2I_UNET)
    ema_text, ema_unet = CLIPTextModel(text_cfg), UNet2DConditionModel(**DIGITS_T2I_UNET)
    ema_text.load_state_dict(text.state_dict())
    ema_unet.load_state_dict(unet.state_dict())
    ema_text.requires_grad_(False)
    ema_unet.requires_grad_(False)
    params = list(text.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    ckpt = args.work / "t2i.pt"
    objs = {"text": text, "unet": unet, "ema_text": ema_text, "ema_unet": ema_unet, "opt": opt}
    step = _load(ckpt, objs, gen)
    acp = scaled_linear_alphas_cumprod(SD_SCALED_LINEAR_SCHEDULER)
    by_digit = [torch.nonzero(digits == d).flatten() for d in range(10)]
    empty = len(ids) - 1
    bar = tqdm(total=args.steps, initial=step, desc="train text encoder + unet", unit="step")
    avg = None
    text.train()
    unet.train()
    while step < args.steps:
        idx = torch.randint(0, len(latents), (args.batch,), generator=gen)
        z0, y = latents[idx], labels[idx]
        # a training phrasing of each image's digit, or the empty prompt
        pick = torch.stack([by_digit[int(d)][torch.randint(0, len(by_digit[int(d)]), (1,), generator=gen)][0]
                            for d in y])
        pick[torch.rand(args.batch, generator=gen) < args.drop] = empty
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        ehs = text(ids[pick]).last_hidden_state
        loss = torch.nn.functional.mse_loss(unet(zt, t, encoder_hidden_states=ehs).sample, noise)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.steps, args.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_text, text, step, args.ema)
        ema_update(ema_unet, unet, step, args.ema)
        step += 1
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{avg:.4f}")
        if step % args.ckpt_every == 0 or step == args.steps:
            _save(ckpt, objs, gen, step)
    bar.close()
    print(f"text encoder + unet: final loss (EMA of batches) {'resumed complete' if avg is None else f'{avg:.5f}'}")
    return ema_text, ema_unet


def write_pipeline(out: Path, tok_dir: Path, vae, text, unet, prompts: list[str]) -> None:
    """The StableDiffusionPipeline folder, written to a temporary sibling and renamed."""

    def write(tmp: Path) -> None:
        shutil.copytree(tok_dir, tmp / "tokenizer")
        text.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SCALED_LINEAR_SCHEDULER, indent=2) + "\n")
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None], "safety_checker": [None, None],
            "requires_safety_checker": False, "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}, indent=2) + "\n")
        (tmp / "calibration_prompts.txt").write_text("\n".join(p for p in prompts if p) + "\n")

    publish_folder(out, write)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    tok_dir = args.work / "tokenizer"
    if not (tok_dir / "merges.txt").is_file():
        write_clip_tokenizer(tok_dir, size=DIGITS_T2I_VOCAB)
    images, labels = load_digits16()
    data = torch.from_numpy(images)
    vae, latents = vae_latents(data)
    ids, prompts, digits = token_table(tok_dir)
    text, unet = train(args, latents, torch.from_numpy(labels), ids, digits)
    write_pipeline(args.out, tok_dir, vae, text, unet, prompts)
    print(f"wrote {args.out}; wall time {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
