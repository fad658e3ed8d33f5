"""The training objective of both tokenizers (cdt-paper Eq. 11):

    L = w(t) * ||x0 - x0_hat||^2  +  lambda * KL  +  eta * LPIPS(x0, x0_hat)

CDT: x0_hat is the U-Net's x0 estimate from x_t at a random level t, weighted by
w(t) = clamp(SNR(t), snr_min, snr_max). Pure min(SNR, 5) gives w ~ 0 at t = T-1, yet
1-step decoding evaluates the network exactly there (on x_T = 0.8*eps), so the lower
bound (1 by default) keeps that point trained. A `terminal_fraction` of batch items is
moreover trained exactly as 1-step inference runs: t = T-1 on x_T = noise_scale*eps
(q_sample at T-1 would give ~1.0*eps, a different input scale from inference).

VAE baseline: x0_hat is the deterministic decoder's output, weight 1; same KL and LPIPS.

Each tokenizer builds its own (x0_hat, x0, weight) in `Tokenizer.training_example`.

KL is the posterior's per-item sum divided by the item's pixel elements, so with a
per-element MSE, lambda keeps the balance of the usual summed-loss convention
(lambda = 1e-6 as in latent-diffusion autoencoders).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import LossSection


class Objective(nn.Module):
    """Wraps the tokenizer so that DistributedDataParallel sees one forward per step."""

    def __init__(self, model: nn.Module, loss: LossSection, lpips=None) -> None:
        super().__init__()
        self.model = model
        self.cfg = loss
        self.lpips = lpips

    def forward(self, video: torch.Tensor, gen: torch.Generator, lpips_weight: float = 0.0):
        post = self.model.posterior(video)
        z = post.sample(gen)
        example = self.model.training_example(video, z, gen, terminal_fraction=self.cfg.terminal_fraction,
                                              snr_min=self.cfg.snr_min, snr_max=self.cfg.snr_max)
        prediction, target = example.prediction, example.target
        mse = (prediction - target).pow(2).flatten(1).mean(1)
        kl = post.kl() / video[0].numel()
        loss = (example.weight * mse).mean() + self.cfg.kl_weight * kl.mean()
        stats = {"mse": mse.mean().item(), "kl": kl.mean().item()}
        if example.terminal.any():
            stats["mse_terminal"] = mse[example.terminal].mean().item()
        if lpips_weight > 0:
            if self.lpips is None:
                raise ValueError("lpips_weight > 0 but no LPIPS network was built (set loss.lpips_weights)")
            perceptual = self.lpips.distance(frames_as_images(prediction), frames_as_images(target)).mean()
            loss = loss + lpips_weight * perceptual
            stats["lpips"] = perceptual.item()
        stats["loss"] = loss.item()
        return loss, stats


def frames_as_images(video: torch.Tensor) -> torch.Tensor:
    """(B,3,T,H,W) -> (B*T,3,H,W): LPIPS is an image metric, applied per frame."""
    b, c, t, h, w = video.shape
    return video.transpose(1, 2).reshape(b * t, c, h, w)


def build_lpips(weights: str | list[str] | None):
    """LPIPS from local weights (`media.lpips`: backbone file, optionally the linear
    heads); None, i.e. LPIPS off, without a path. Nothing is downloaded."""
    if not weights:
        return None
    from media.lpips import load_lpips

    return load_lpips(*([weights] if isinstance(weights, str) else weights))
