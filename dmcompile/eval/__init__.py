"""Fidelity measurement: digit classifier features, Frechet distance, confident-class rate,
paired PSNR / SSIM, and image grids.

    from dmcompile.eval import frechet_distance, psnr, ssim, DigitClassifier
"""

from .metrics import confident_rate, frechet_distance, gaussian_stats, psnr, ssim

__all__ = ["confident_rate", "frechet_distance", "gaussian_stats", "psnr", "ssim"]
