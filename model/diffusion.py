"""Diffusion math, kept apart from the network: cosine schedule, training quantities,
DDIM timesteps and updates, and chunking-independent initial noise."""

from __future__ import annotations

import math

import torch

COSINE_S = 0.008
MAX_BETA = 0.999


def cosine_alpha_bar(t: torch.Tensor | float, num_timesteps: int, s: float = COSINE_S):
    """f(t)/f(0) with f(t) = cos^2(((t/T)+s)/(1+s) * pi/2) (Nichol & Dhariwal)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    f = torch.cos(((t / num_timesteps) + s) / (1 + s) * math.pi / 2) ** 2
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return f / f0


class CosineSchedule:
    """Discrete cosine schedule over T steps; index t in [0, T) is the noise level after
    t+1 forward steps. Tables are float64 on the CPU; lookups return float32."""

    def __init__(self, num_timesteps: int = 8192) -> None:
        self.num_timesteps = num_timesteps
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64)
        abar = cosine_alpha_bar(steps, num_timesteps)
        betas = (1 - abar[1:] / abar[:-1]).clamp(max=MAX_BETA)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod[t.long().cpu()].float().to(t.device)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        abar = self.alpha_bar(t)
        return abar / (1 - abar)

    def loss_weight(self, t: torch.Tensor, snr_min: float, snr_max: float) -> torch.Tensor:
        """clamp(SNR, snr_min, snr_max): the x0-prediction weight (Eq. 10, min(SNR, snr_max)),
        bounded below so that the levels near T-1, where 1-step decoding runs, keep a weight."""
        return self.snr(t).clamp(snr_min, snr_max)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        abar = self.alpha_bar(t).to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def ddim_timesteps(self, steps: int) -> list[int]:
        """`linspace(0, T-1, S)` taken from the top: S=1 gives [T-1]."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if steps > self.num_timesteps:
            raise ValueError(f"steps must be <= {self.num_timesteps}, got {steps}")
        # Descending linspace, so that a single step lands on T-1 (not on 0). Plain Python
        # (round half to even, like torch.round): no tensor, so it also runs under fake tensors.
        top = self.num_timesteps - 1
        if steps == 1:
            return [top]
        return [round(top - i * top / (steps - 1)) for i in range(steps)]

    def ddim_step(self, x_t: torch.Tensor, x0: torch.Tensor, t: int, t_next: int) -> torch.Tensor:
        """Deterministic (eta=0) DDIM move from level t to level t_next given x0."""
        abar_t = float(self.alphas_cumprod[t])
        abar_next = float(self.alphas_cumprod[t_next])
        eps = (x_t - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)
        return math.sqrt(abar_next) * x0 + math.sqrt(1 - abar_next) * eps


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: decorrelates consecutive (seed, frame) pairs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def frame_noise(seed: int, start: int, count: int, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Gaussian noise for output frames [start, start+count), shape (B, C, count, H, W).

    Frame j's noise depends only on (seed, j), so any chunking of a video draws the
    same noise. Drawn on the CPU in float32, so it is the same on every device.
    """
    b, c, h, w = shape
    out = torch.empty(b, c, count, h, w)
    gen = torch.Generator()
    for i in range(count):
        gen.manual_seed(_mix64(_mix64(seed & _MASK64) ^ (start + i)) & ((1 << 63) - 1))
        out[:, :, i] = torch.randn(b, c, h, w, generator=gen)
    return out
