"""Image grids and small figures as PNG files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from dmruntime import to_uint8
from dmruntime.png import grid, write_png

from ..artifacts import PNG_SOFTWARE


def save_grid(images: np.ndarray, path: Path, cols: int | None = None, scale: int | None = None,
              pad: int = 1) -> Path:
    """Write [N, C, H, W] images in [-1, 1] as one PNG grid: grey for C = 1 or 2 (channel 0),
    RGB from the first three channels for C >= 3 (the runtime's grid, so both look the same)."""
    write_png(Path(path), grid(to_uint8(np.asarray(images)), cols=cols, scale=scale, pad=pad))
    return Path(path)


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
