"""The digits data set shipped with scikit-learn, at the size digits16 uses.

No download: ``sklearn.datasets.load_digits`` reads a file bundled with scikit-learn.
"""

from __future__ import annotations

import numpy as np

IMAGE_SIZE = 16


def upsample2x_bilinear(images: np.ndarray) -> np.ndarray:
    """Bilinear 2x upsampling of [N, H, W] images (half-pixel centres, edge clamped).

    Same arithmetic as ``torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)`` for a factor of 2, written in numpy so the data does not
    depend on torch.
    """
    n, h, w = images.shape

    def coords(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = (np.arange(2 * size) + 0.5) / 2.0 - 0.5
        src = np.clip(src, 0.0, size - 1)
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, size - 1)
        return lo, hi, (src - lo).astype(np.float64)

    y0, y1, fy = coords(h)
    x0, x1, fx = coords(w)
    img = images.astype(np.float64)
    rows = img[:, y0, :] * (1 - fy)[None, :, None] + img[:, y1, :] * fy[None, :, None]
    out = rows[:, :, x0] * (1 - fx)[None, None, :] + rows[:, :, x1] * fx[None, None, :]
    return out


def load_digits16() -> tuple[np.ndarray, np.ndarray]:
    """Return (images, labels): images float32 [1797, 1, 16, 16] in [-1, 1], labels int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images / 16.0  # 0..16 -> 0..1
    up = upsample2x_bilinear(images)
    x = (up * 2.0 - 1.0).astype(np.float32)[:, None]
    return x, digits.target.astype(np.int64)
