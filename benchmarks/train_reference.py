"""Train the embedded default model digits16 on scikit-learn's bundled 8x8 digits.

    python benchmarks/train_reference.py --steps 6000 --out dmcompile/zoo/digits16

Seeded, shows a progress bar, writes a resumable checkpoint every --ckpt-every steps
(``--work DIR``; rerun the same command to continue) and prints its wall time. The
output folder is a diffusers UNet folder: config.json, diffusion_pytorch_model.safetensors
(EMA weights) and scheduler_config.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmcompile.zoo.architectures import DDPM_LINEAR_SCHEDULER, DIGITS16_UNET  # noqa: E402
from dmcompile.zoo.data import load_digits16  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6000, help="optimizer steps in total")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--work", type=Path, default=Path("runs/digits16"), help="checkpoint folder")
    p.add_argument("--out", type=Path, default=Path("runs/digits16/model"), help="output diffusers folder")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    return p.parse_args(argv)


def linear_alphas_cumprod(cfg: dict) -> torch.Tensor:
    betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"], dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0).float()


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    """EMA of the weights, with the usual warm-up: decay min(decay, (1 + step) / (10 + step))."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(d).add_(pm.detach(), alpha=1 - d)


def publish_folder(out: Path, write) -> None:
    """Write a folder atomically: ``write(tmp)`` fills a temporary sibling, which then replaces
    ``out`` (a training script's own earlier output)."""
    import shutil

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def save_model_folder(ema: torch.nn.Module, out: Path) -> None:
    """Write a diffusers folder atomically (temp folder, then rename)."""

    def write(tmp: Path) -> None:
        ema.save_pretrained(tmp, safe_serialization=True)
        (tmp / "scheduler_config.json").write_text(json.dumps(DDPM_LINEAR_SCHEDULER, indent=2) + "\n")

    publish_folder(out, write)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import UNet2DModel

    t_wall = time.time()
    torch.manual_seed(args.seed)
    model = UNet2DModel(**DIGITS16_UNET)
    ema = UNet2DModel(**DIGITS16_UNET)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    step = 0

    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = args.work / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)  # tensors only: no pickled objects
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step = int(state["step"])
        print(f"resumed from {ckpt} at step {step}")

    images, _ = load_digits16()
    data = torch.from_numpy(images)
    acp = linear_alphas_cumprod(DDPM_LINEAR_SCHEDULER)
    n_train = DDPM_LINEAR_SCHEDULER["num_train_timesteps"]

    model.train()
    bar = tqdm(total=args.steps, initial=step, desc="train digits16", unit="step")
    loss_avg = None
    while step < args.steps:
        idx = torch.randint(0, data.shape[0], (args.batch,), generator=gen)
        x0 = data[idx]
        t = torch.randint(0, n_train, (args.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(model(xt, t).sample, noise)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, step, args.ema)
        step += 1
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}")
        if step % args.ckpt_every == 0 or step == args.steps:
            state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                     "gen": gen.get_state(), "step": torch.tensor(step)}
            torch.save(state, args.work / "checkpoint.tmp")
            os.replace(args.work / "checkpoint.tmp", ckpt)
    bar.close()
    save_model_folder(ema, args.out)
    print(f"wrote {args.out}; final loss (EMA of batches) {loss_avg}; wall time {time.time() - t_wall:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
