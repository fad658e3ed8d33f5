"""Reconstruction metrics on uint8 (T,H,W,3) RGB clips, computed in [0,1] float64.

PSNR: 10*log10(1/MSE) with the MSE over every pixel and channel of the clip (a clip
score, not a mean of per-frame scores); identical clips score PSNR_CAP.
SSIM: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1=0.01, K2=0.03,
data range 1, over the valid region (no padding), per frame and channel, then averaged.
"""

from __future__ import annotations

import numpy as np
import torch

from .video import check_frames

PSNR_CAP = 100.0  # dB: MSE floor 1e-10 keeps identical clips finite and JSON-safe
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
_FRAMES_PER_BATCH = 8  # bounds the float64 working set for long clips


def _unit(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(frames)).to(torch.float64).div_(255.0)


def _check_pair(reference: np.ndarray, test: np.ndarray) -> None:
    check_frames(reference)
    check_frames(test)
    if reference.shape != test.shape:
        raise ValueError(f"clips differ in shape: {reference.shape} vs {test.shape}")


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    _check_pair(reference, test)
    mse = sum(float(((_unit(reference[i : i + _FRAMES_PER_BATCH]) - _unit(test[i : i + _FRAMES_PER_BATCH])) ** 2).sum())
              for i in range(0, len(reference), _FRAMES_PER_BATCH)) / reference.size
    return min(PSNR_CAP, 10.0 * np.log10(1.0 / max(mse, 1e-10)))


def _gaussian_taps() -> torch.Tensor:
    x = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()


def _blur(z: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """The 2-D Gaussian window over the valid region of (N, C, H, W), separably: weighted sums
    of shifted views along H, then W. Equal to the window's convolution to float64 rounding,
    and far faster on the CPU than a depthwise float64 conv2d, which has no fast kernel there."""
    def along(z: torch.Tensor, dim: int) -> torch.Tensor:
        size = z.shape[dim] - len(taps) + 1
        out = z.narrow(dim, 0, size) * taps[0]
        for k in range(1, len(taps)):
            out.add_(z.narrow(dim, k, size), alpha=float(taps[k]))
        return out
    return along(along(z, 2), 3)


def ssim(reference: np.ndarray, test: np.ndarray) -> float:
    _check_pair(reference, test)
    if min(reference.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {reference.shape[1:3]}")
    window = _gaussian_taps()
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    total = 0.0
    for i in range(0, len(reference), _FRAMES_PER_BATCH):
        x = _unit(reference[i : i + _FRAMES_PER_BATCH]).permute(0, 3, 1, 2)
        y = _unit(test[i : i + _FRAMES_PER_BATCH]).permute(0, 3, 1, 2)
        mx, my = _blur(x, window), _blur(y, window)
        vx, vy = _blur(x * x, window) - mx**2, _blur(y * y, window) - my**2
        cxy = _blur(x * y, window) - mx * my
        ssim_map = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        total += float(ssim_map.mean(dim=(1, 2, 3)).sum())
    return total / len(reference)
