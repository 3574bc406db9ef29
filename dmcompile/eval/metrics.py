"""Image-set and paired-image metrics, numpy only."""

from __future__ import annotations

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of [N, D] features."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two [N, D] feature sets:
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2).

    The square root goes through symmetric eigendecompositions, which stay real and stable
    where scipy's sqrtm of the non-symmetric product can return complex noise.
    """
    mu_a, s_a = gaussian_stats(a)
    mu_b, s_b = gaussian_stats(b)
    ra = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(ra @ s_b @ ra)
    d = float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(cross))
    return max(d, 0.0)


def confident_rate(probs: np.ndarray, threshold: float = 0.9) -> float:
    """Share of rows whose largest class probability is >= threshold."""
    return float(np.mean(np.max(probs, axis=1) >= threshold))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> np.ndarray:
    """Per-image PSNR in dB of paired [N, C, H, W] images (range [-1, 1] by default).
    Identical images give +inf."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, axis=tuple(range(1, a.ndim)))
    with np.errstate(divide="ignore"):
        return 10 * np.log10(data_range**2 / mse)


def _gaussian_window(size: int = 7, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(img: np.ndarray, win: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering over the last two axes."""
    k = win.shape[0]
    h, w = img.shape[-2:]
    rows = sum(win[i] * img[..., i:h - k + 1 + i, :] for i in range(k))
    return sum(win[i] * rows[..., :, i:w - k + 1 + i] for i in range(k))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 2.0, win_size: int = 7, sigma: float = 1.5) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004) of paired [N, C, H, W] images, averaged over
    channels and positions. Gaussian window (7x7, sigma 1.5, 'valid' positions: small
    enough for 16x16 images), K1 = 0.01, K2 = 0.03."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim needs two [N, C, H, W] arrays of one shape, got {a.shape} and {b.shape}")
    win_size = min(win_size, a.shape[-1], a.shape[-2])
    win = _gaussian_window(win_size, sigma)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu_a, mu_b = _filter_valid(a, win), _filter_valid(b, win)
    s_aa = _filter_valid(a * a, win) - mu_a**2
    s_bb = _filter_valid(b * b, win) - mu_b**2
    s_ab = _filter_valid(a * b, win) - mu_a * mu_b
    m = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2))
    return m.mean(axis=(1, 2, 3))
