"""Pictures of an analysis and a plan: RD curves and the bits-per-layer-and-group heat map."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifacts import PNG_SOFTWARE


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_rd_curves(curves, path: Path, n: int = 4) -> Path:
    """Distortion vs weight bits of the ``n`` most and least sensitive layers (mean over the
    groups, band: min to max over groups). Sensitivity: mean distortion at 4 bits or the
    narrowest width above it."""
    plt = _plt()
    bits = np.array(curves.weight_bits)
    ref = int(np.argmin(np.abs(bits - 4)))
    sens = curves.weight[:, :, ref].mean(0)
    order = np.argsort(sens)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, idx, title in ((axes[0], order[::-1][:n], "most sensitive"), (axes[1], order[:n], "least sensitive")):
        for li in idx:
            d = np.maximum(curves.weight[:, li], 1e-12)
            line, = ax.plot(bits, d.mean(0), marker="o", label=curves.layers[li][-48:])
            ax.fill_between(bits, d.min(0), d.max(0), color=line.get_color(), alpha=0.15)
        ax.set_yscale("log")
        ax.set_xlabel("weight bits")
        ax.set_title(f"{title} layers (band: min-max over {curves.weight.shape[0]} groups)")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"output distortion ({curves.config.get('analysis', {}).get('distortion', '')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": PNG_SOFTWARE})
    plt.close(fig)
    return Path(path)


def save_bits_heatmap(layers: list[str], bits: np.ndarray, groups: list, path: Path) -> Path:
    """Weight bits per layer (rows) and timestep group (columns)."""
    plt = _plt()
    bits = np.asarray(bits).T  # [L, G]
    fig, ax = plt.subplots(figsize=(2.5 + 0.45 * bits.shape[1], 2 + 0.13 * bits.shape[0]))
    im = ax.imshow(bits, aspect="auto", cmap="viridis", vmin=2, vmax=8, interpolation="nearest")
    ax.set_yticks(range(len(layers)), [l[-40:] for l in layers], fontsize=5)
    ax.set_xticks(range(len(groups)), [f"[{a},{b})" for a, b in groups], rotation=90, fontsize=6)
    ax.set_xlabel("timestep group")
    fig.colorbar(im, ax=ax, label="weight bits")
    ax.set_title("weight bits per layer and group")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": PNG_SOFTWARE})
    plt.close(fig)
    return Path(path)
