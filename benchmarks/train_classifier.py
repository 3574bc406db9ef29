"""Train the digit classifier used for Frechet distance and class rates on digits models.

    python benchmarks/train_classifier.py --out dmcompile/zoo/classifier

Seeded 80/20 stratified split of scikit-learn's digits (16x16, [-1, 1]); trains on 80%
with +-1 pixel shifts, reports held-out accuracy, writes safetensors + info.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmcompile.eval.classifier import INFO, WEIGHTS, make_classifier  # noqa: E402
from dmcompile.zoo.data import load_digits16  # noqa: E402


def split(labels: np.ndarray, seed: int, held_out: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * held_out))
        test.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(train), np.sort(test)


def shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random +-1 pixel translation per image, background (-1) filled."""
    out = torch.full_like(x, -1.0)
    dy, dx = torch.randint(-1, 2, (2,), generator=gen).tolist()
    h, w = x.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/classifier"))
    args = p.parse_args(argv)
    t0 = time.time()
    images, labels = load_digits16()
    tr, te = split(labels, args.seed)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        net = make_classifier()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    for _ in tqdm(range(args.epochs), desc="train classifier", unit="epoch"):
        net.train()
        perm = torch.from_numpy(tr)[torch.randperm(len(tr), generator=gen)]
        for s in range(0, len(perm), 64):
            idx = perm[s:s + 64]
            with torch.random.fork_rng(devices=[]):  # dropout draws from a seeded stream
                torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
                loss = torch.nn.functional.cross_entropy(net(shift(x[idx], gen)), y[idx])
                opt.zero_grad()
                loss.backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(x[te]).argmax(1) == y[te]).float().mean())
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out / (WEIGHTS + ".tmp")))
    os.replace(args.out / (WEIGHTS + ".tmp"), args.out / WEIGHTS)
    info = {"schema_version": 1, "held_out_accuracy": acc, "held_out": int(len(te)), "train": int(len(tr)),
            "epochs": args.epochs, "seed": args.seed}
    (args.out / INFO).write_text(json.dumps(info, indent=2) + "\n")
    print(f"held-out accuracy {acc:.4f} on {len(te)} images; wall time {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
