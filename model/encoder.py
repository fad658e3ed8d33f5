"""The causal video encoder and its KL head (4x8x8 compression, 16 latent channels), with
any temporal levels grown on top (8x, 16x: `TimeLevel`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import CDTConfig, Level
from .layers import (Block, Cache, CausalConv3d, Downsample, PointwiseConv3d, ResnetBlock, TimeDownsample,
                     full_precision)

LOGVAR_RANGE = (-30.0, 20.0)


@dataclass
class Posterior:
    """Diagonal Gaussian over latents."""

    mean: torch.Tensor
    logvar: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps, eps drawn by `generator` on its own device (a random op takes only a
        generator of its output's device), then moved to the mean's."""
        device = self.mean.device if generator is None else generator.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * eps.to(self.mean.device)

    def kl(self) -> torch.Tensor:
        """KL to N(0, I), summed over latent elements, per batch item."""
        kl = 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)
        return kl.flatten(1).sum(1)


class ResnetChain(nn.Module):
    """ResnetBlocks through a list of widths: widths[0] -> widths[1] -> ..."""

    def __init__(self, widths: tuple[int, ...], time_pad: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResnetBlock(a, b, time_pad=time_pad) for a, b in zip(widths, widths[1:]))

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, cache=cache)
        return x


class KLHead(nn.Module):
    """1x1 conv plus a ResnetBlock branch, summed, to mean and log-variance. Runs in fp32."""

    def __init__(self, cin: int, branch: tuple[int, ...], latent: int, time_pad: str) -> None:
        super().__init__()
        self.direct = PointwiseConv3d(cin, 2 * latent)
        self.branch = ResnetChain((cin, *branch), time_pad)
        self.branch_out = CausalConv3d(branch[-1], 2 * latent, (3, 3, 3), time_pad)

    def forward(self, x: torch.Tensor, cache: Cache = None) -> Posterior:
        with full_precision(x.device):
            x = x.float()
            moments = self.direct(x) + self.branch_out(self.branch(x, cache), cache)
        mean, logvar = moments.chunk(2, dim=1)
        return Posterior(mean, logvar.clamp(*LOGVAR_RANGE))


class TimeLevel(nn.Module):
    """2x more temporal compression on top of the level below's features F (the features
    its KL head would take), 1+2k frames -> 1+k.

    Cross-level mixing (../shared/docs/progressive-growing.md): F at the kept frames (the
    ones a 2x subsampled video keeps: every second latent frame, the first included) is
    concatenated with a causal stride-2 downsample of F at all frames (what the skipped
    frames add), and a 1x1 conv mixes them. The mix starts as the kept frames' features
    alone (when the widths agree), so a level grown on a trained model starts from what
    that model says of the subsampled video, and learns what it misses.

    Causality and streaming: a stream's chunks after its first hold an even number of
    F frames (whole groups), whose kept frames are the chunk's odd positions; the
    downsample keeps its one pending frame in the cache as in the base encoder."""

    def __init__(self, cin: int, level: Level, time_pad: str) -> None:
        super().__init__()
        self.down = TimeDownsample(cin, time_pad)
        self.mix = PointwiseConv3d(2 * cin, level.width)
        self.blocks = ResnetChain((level.width,) * (level.blocks + 1), time_pad)
        if level.width == cin:
            with torch.no_grad():
                self.mix.weight.zero_()
                self.mix.weight[:, :cin, 0, 0, 0] = torch.eye(cin)
                self.mix.bias.zero_()

    def forward(self, f: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        first = cache is None or not cache.started
        kept = f[:, :, 0::2] if first else f[:, :, 1::2]
        return self.blocks(self.mix(torch.cat([kept, self.down(f, cache)], dim=1)), cache)


class Encoder(nn.Module):
    def __init__(self, config: CDTConfig) -> None:
        super().__init__()
        pad = config.time_pad
        stages = config.encoder_stages
        self.stem = Block(3, stages[0].width, (3, 7, 7), pad)
        self.blocks = nn.ModuleList()
        self.space_down = nn.ModuleList()
        self.time_down = nn.ModuleList()
        cin = stages[0].width
        for stage in stages:
            self.blocks.append(ResnetBlock(cin, stage.width, time_pad=pad))
            self.space_down.append(Downsample(stage.width) if stage.space else nn.Identity())
            self.time_down.append(TimeDownsample(stage.width, pad) if stage.time else nn.Identity())
            cin = stage.width
        self.levels = nn.ModuleList()
        for level in config.levels:
            self.levels.append(TimeLevel(cin, level, pad))
            cin = level.width
        # The top level's head; a grown model's head keeps the base head's name, so it starts
        # from the base head's weights when the widths agree (model/growth.py).
        self.head = KLHead(cin, config.kl_branch, config.latent_channels, pad)

    def forward(self, x: torch.Tensor, cache: Cache = None) -> Posterior:
        h = self.stem(x, cache)
        for block, sdown, tdown in zip(self.blocks, self.space_down, self.time_down):
            h = sdown(block(h, cache=cache))
            h = tdown(h, cache) if isinstance(tdown, TimeDownsample) else h
        for level in self.levels:
            h = level(h, cache)
        return self.head(h, cache)
