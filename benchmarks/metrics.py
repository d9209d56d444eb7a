"""Image-similarity metrics for the fidelity benchmark (numpy only).

Images are float arrays in [0, 1], shaped (B, H, W, C); every function
returns one value per image so callers can average or keep the spread.
"""

from __future__ import annotations

import numpy as np

PSNR_CAP_DB = 100.0  # identical images have MSE 0 (infinite PSNR); report this cap instead
SSIM_WINDOW = 7      # Wang et al. use 11x11; a 16x16 image leaves too few valid positions for that
SSIM_SIGMA = 1.5     # Wang et al.'s sigma, kept so only the truncation differs
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _batch(x) -> np.ndarray:
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    return x[None] if x.ndim == 3 else x


def psnr(a, b, cap: float = PSNR_CAP_DB) -> np.ndarray:
    """Per-image PSNR in dB for peak 1.0, clamped inputs, capped at ``cap`` (MSE 0 -> cap)."""
    a, b = _batch(a), _batch(b)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        db = 10.0 * np.log10(1.0 / mse)
    return np.minimum(db, cap)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 2-D Gaussian kernel (size x size)."""
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    k = np.outer(g, g)
    return k / k.sum()


def _filter(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """'valid' weighted mean of every k-sized patch of (B, H, W, C) images."""
    patches = np.lib.stride_tricks.sliding_window_view(x, k.shape, axis=(1, 2))
    return np.einsum("bhwcij,ij->bhwc", patches, k)


def ssim(a, b, size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Per-image mean SSIM (Wang et al. 2004) with a Gaussian window, dynamic range 1.

    Only 'valid' window positions are used (no padding), as in the reference
    implementation; for 16x16 images and a 7x7 window that is a 10x10 map per
    channel, averaged over positions and channels.
    """
    a, b = _batch(a), _batch(b)
    k = gaussian_window(size, sigma)
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mu_a, mu_b = _filter(a, k), _filter(b, k)
    var_a = _filter(a * a, k) - mu_a**2
    var_b = _filter(b * b, k) - mu_b**2
    cov = _filter(a * b, k) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).reshape(len(a), -1).mean(axis=1)
