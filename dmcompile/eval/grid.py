"""Image grids and small figures as PNG files."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from dmruntime import to_uint8

from ..artifacts import PNG_SOFTWARE


def save_grid(images: np.ndarray, path: Path, cols: int | None = None, scale: int | None = None,
              pad: int = 1) -> Path:
    """Write [N, C, H, W] images in [-1, 1] as one PNG grid: grey for C = 1 or 2 (channel 0),
    RGB from the first three channels for C >= 3."""
    from PIL import Image, PngImagePlugin

    imgs = to_uint8(np.asarray(images))
    imgs = imgs[:, :3] if imgs.shape[1] >= 3 else imgs[:, :1]
    n, c, h, w = imgs.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y:y + h, x:x + w] = imgs[i].transpose(1, 2, 0)
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    scale = scale or max(1, round(512 / img.width))  # small images: enlarge to about 512 px
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", PNG_SOFTWARE)  # marks the file as ours: a later run may replace it
    img.save(tmp, pnginfo=info)
    os.replace(tmp, path)
    return path


def save_fd_figure(values: dict[str, float], path: Path, title: str) -> Path:
    """Bar chart of Frechet distances (e.g. model vs real, FP vs real, noise floor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    names = list(values)
    bars = ax.bar(names, [values[k] for k in names], color=["#3b6ea5", "#7a9cc6", "#bbbbbb", "#999999"][:len(names)])
    ax.bar_label(bars, fmt="%.3g")
    ax.set_ylabel("Frechet distance (classifier features)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, metadata={"Software": PNG_SOFTWARE})
    plt.close(fig)
    os.replace(tmp, path)
    return path
