"""Train the embedded conditional latent model digits-ldm on scikit-learn's bundled digits.

    python benchmarks/train_ldm.py --out dmcompile/zoo/digits-ldm

Stable Diffusion in miniature: an AutoencoderKL (1x16x16 images <-> 4x8x8 latents), then a
UNet2DConditionModel in its latent space whose cross-attention reads a learned per-class
embedding (a [1, 32] row per digit, plus a null row for classifier-free guidance, trained
with 10% condition dropout). Seeded, progress bars, resumable (a checkpoint per stage every
--ckpt-every steps in --work; rerun the same command to continue), wall time printed. The
output is a diffusers pipeline folder: model_index.json, vae/, unet/, scheduler/ and
conditions.npz (class_table [10, 1, 32], null_encoder_hidden_states [1, 32]).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmcompile.zoo.architectures import DDPM_LINEAR_SCHEDULER, DIGITS_LDM_UNET, DIGITS_LDM_VAE  # noqa: E402
from dmcompile.zoo.data import load_digits16  # noqa: E402
from train_reference import ema_update, linear_alphas_cumprod, publish_folder  # noqa: E402  (this folder: the same recipe)

NULL = 10  # index of the null (unconditional) row of the class table
SEQ, DIM = 1, DIGITS_LDM_UNET["cross_attention_dim"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--unet-steps", type=int, default=5000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl", type=float, default=1e-5, help="weight of the VAE's KL term")
    p.add_argument("--drop", type=float, default=0.1, help="condition dropout (the null row) of the UNet")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--work", type=Path, default=Path("runs/digits-ldm"))
    p.add_argument("--out", type=Path, default=Path("runs/digits-ldm/model"))
    p.add_argument("--threads", type=int, default=0)
    return p.parse_args(argv)


def cosine_lr(step: int, total: int, lr: float, warmup: int = 100) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _load(path: Path, objs: dict, gen: torch.Generator) -> int:
    if not path.exists():
        return 0
    state = torch.load(path, weights_only=True)  # tensors only: no pickled objects
    for k, o in objs.items():
        o.load_state_dict(state[k])
    gen.set_state(state["gen"])
    print(f"resumed from {path} at step {int(state['step'])}")
    return int(state["step"])


def _save(path: Path, objs: dict, gen: torch.Generator, step: int) -> None:
    state = {k: o.state_dict() for k, o in objs.items()} | {"gen": gen.get_state(), "step": torch.tensor(step)}
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def train_vae(args, data: torch.Tensor):
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**DIGITS_LDM_VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    ckpt = args.work / "vae.pt"
    step = _load(ckpt, {"vae": vae, "opt": opt}, gen)
    bar = tqdm(total=args.vae_steps, initial=step, desc="train vae", unit="step")
    avg = None
    vae.train()
    while step < args.vae_steps:
        x = data[torch.randint(0, len(data), (args.batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(rec, x) + args.kl * post.kl().mean()
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.vae_steps, args.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{avg:.4f}")
        if step % args.ckpt_every == 0 or step == args.vae_steps:
            _save(ckpt, {"vae": vae, "opt": opt}, gen, step)
    bar.close()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        mean = torch.cat([vae.encode(data[i:i + 256]).latent_dist.mean for i in range(0, len(data), 256)])
        rec = torch.cat([vae.decode(mean[i:i + 256]).sample for i in range(0, len(mean), 256)])
    scale = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    loss_txt = "resumed complete" if avg is None else f"{avg:.5f}"
    print(f"vae: final loss {loss_txt}; reconstruction mse {torch.mean((rec - data) ** 2).item():.5f}; "
          f"latent std {mean.std().item():.4f} -> scaling_factor {scale:.4f}")
    return vae, mean * scale


def train_unet(args, latents: torch.Tensor, labels: torch.Tensor):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(args.seed + 1)
    unet = UNet2DConditionModel(**DIGITS_LDM_UNET)
    ema = UNet2DConditionModel(**DIGITS_LDM_UNET)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    table = torch.nn.Embedding(NULL + 1, SEQ * DIM)
    torch.nn.init.normal_(table.weight, std=1.0)
    params = list(unet.parameters()) + list(table.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    ckpt = args.work / "unet.pt"
    step = _load(ckpt, {"unet": unet, "ema": ema, "table": table, "opt": opt}, gen)
    acp = linear_alphas_cumprod(DDPM_LINEAR_SCHEDULER)
    bar = tqdm(total=args.unet_steps, initial=step, desc="train unet", unit="step")
    avg = None
    unet.train()
    while step < args.unet_steps:
        idx = torch.randint(0, len(latents), (args.batch,), generator=gen)
        z0, y = latents[idx], labels[idx].clone()
        y[torch.rand(args.batch, generator=gen) < args.drop] = NULL
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        ehs = table(y).view(-1, SEQ, DIM)
        loss = torch.nn.functional.mse_loss(unet(zt, t, encoder_hidden_states=ehs).sample, noise)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.unet_steps, args.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema, unet, step, args.ema)
        step += 1
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{avg:.4f}")
        if step % args.ckpt_every == 0 or step == args.unet_steps:
            _save(ckpt, {"unet": unet, "ema": ema, "table": table, "opt": opt}, gen, step)
    bar.close()
    print(f"unet: final loss (EMA of batches) {'resumed complete' if avg is None else f'{avg:.5f}'}")
    return ema, table.weight.detach().view(NULL + 1, SEQ, DIM).numpy().astype(np.float32)


def write_pipeline(out: Path, vae, unet, table: np.ndarray) -> None:
    """The diffusers pipeline folder, written to a temporary sibling and renamed."""

    def write(tmp: Path) -> None:
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        (tmp / "scheduler").mkdir()
        # latents are not in [-1, 1]: DDIM must not clip its x0 estimate (the pixel models' default)
        sched = {**DDPM_LINEAR_SCHEDULER, "clip_sample": False}
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
        (tmp / "model_index.json").write_text(json.dumps({"_class_name": "LDMTextToImagePipeline",
                                                          "unet": ["diffusers", "UNet2DConditionModel"],
                                                          "vae": ["diffusers", "AutoencoderKL"],
                                                          "scheduler": ["diffusers", "DDPMScheduler"]}, indent=2) + "\n")
        np.savez(tmp / "conditions.npz", class_table=table[:NULL], null_encoder_hidden_states=table[NULL])

    publish_folder(out, write)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits16()
    data = torch.from_numpy(images)
    vae, latents = train_vae(args, data)
    unet, table = train_unet(args, latents, torch.from_numpy(labels))
    write_pipeline(args.out, vae, unet, table)
    print(f"wrote {args.out}; wall time {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
