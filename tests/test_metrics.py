"""Fidelity metrics against closed forms and direct implementations."""

import numpy as np
import pytest

from dmcompile.eval.metrics import confident_rate, frechet_distance, psnr, ssim


def test_fd_closed_form():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 4))
    b = rng.standard_normal((20000, 4)) * 2.0 + np.array([1.0, 0, 0, 0])
    # N(0, I) vs N(mu, 4I): |mu|^2 + tr(I + 4I - 2*2I) = 1 + 4
    assert frechet_distance(a, b) == pytest.approx(5.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)


def test_psnr_known_mse():
    a = np.zeros((2, 1, 4, 4))
    b = a + np.array([0.1, 0.2])[:, None, None, None]
    np.testing.assert_allclose(psnr(a, b), 10 * np.log10(4 / np.array([0.01, 0.04])))
    assert np.isinf(psnr(a, a)).all()


def _ssim_direct(x, y, win, c1, c2):
    """Loop-based SSIM over every valid window position of one channel."""
    k = len(win)
    w2 = np.outer(win, win)
    vals = []
    for i in range(x.shape[0] - k + 1):
        for j in range(x.shape[1] - k + 1):
            p, q = x[i:i + k, j:j + k], y[i:i + k, j:j + k]
            mx, my = (w2 * p).sum(), (w2 * q).sum()
            vx, vy = (w2 * p * p).sum() - mx**2, (w2 * q * q).sum() - my**2
            cxy = (w2 * p * q).sum() - mx * my
            vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return np.mean(vals)


def test_ssim_matches_direct_and_orders_noise():
    rng = np.random.default_rng(1)
    a = np.tanh(rng.standard_normal((3, 1, 16, 16)))
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), -1, 1)
    x = np.arange(7) - 3
    win = np.exp(-x**2 / (2 * 1.5**2))
    win /= win.sum()
    want = [_ssim_direct(a[i, 0], b[i, 0], win, (0.01 * 2) ** 2, (0.03 * 2) ** 2) for i in range(3)]
    np.testing.assert_allclose(ssim(a, b), want, rtol=1e-10)
    np.testing.assert_allclose(ssim(a, a), 1.0)
    c = np.clip(a + 0.5 * rng.standard_normal(a.shape), -1, 1)
    assert (ssim(a, c) < ssim(a, b)).all()


def test_confident_rate():
    p = np.array([[0.95, 0.05], [0.6, 0.4], [0.1, 0.9]])
    assert confident_rate(p, 0.9) == pytest.approx(2 / 3)
