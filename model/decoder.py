"""The conditional diffusion decoder: a condition adapter turns latents into 4 context
maps, which a 3D causal U-Net in pixel space takes by channel concatenation at its
first 4 down stages while it predicts the clean video x0 from a noisy one."""

from __future__ import annotations

import torch
from torch import nn

from .config import CDTConfig, Stage
from .encoder import ResnetChain
from .layers import (
    Cache,
    CausalConv3d,
    ChannelLayerNorm,
    Downsample,
    LinearAttention,
    PointwiseConv3d,
    ResnetBlock,
    TimeDownsample,
    TimeUpsample,
    Upsample,
    full_precision,
)


class TimeEmbedding(nn.Module):
    """t/T in [0,1) -> Linear(1,256) -> GELU -> Linear(256,64). Always fp32."""

    def __init__(self, hidden: int, dim: int, num_timesteps: int) -> None:
        super().__init__()
        self.num_timesteps = num_timesteps
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        with full_precision(t.device):
            return self.net((t.float() / self.num_timesteps)[:, None])


class Lift(nn.Module):
    """z -> top width: 1x1 conv plus (conv, ResnetBlocks) branch, summed."""

    def __init__(self, latent: int, widths: tuple[int, ...], time_pad: str) -> None:
        super().__init__()
        self.direct = PointwiseConv3d(latent, widths[-1])
        self.branch_in = CausalConv3d(latent, widths[0], (3, 3, 3), time_pad)
        self.branch = ResnetChain(widths, time_pad)

    def forward(self, z: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        return self.direct(z) + self.branch(self.branch_in(z, cache), cache)


class UpStage(nn.Module):
    """ResnetBlock to `width`, then the stage's spatial/temporal upsampling."""

    def __init__(self, cin: int, stage: Stage, mode: str, time_pad: str, attention: bool = False,
                 temb_dim: int = 0, upsample_kernel: int = 5, space_out: int | None = None) -> None:
        super().__init__()
        self.block = ResnetBlock(cin, stage.width, temb_dim, time_pad)
        self.attn = LinearAttention(stage.width) if attention else None
        out = stage.width if space_out is None else space_out
        self.space_up = Upsample(stage.width, out, mode, upsample_kernel) if stage.space else None
        self.time_up = TimeUpsample(out) if stage.time else None

    def forward(self, x, temb=None, cache: Cache = None, size=None) -> torch.Tensor:
        x = self.block(x, temb, cache)
        if self.attn is not None:
            x = self.attn(x)
        if self.space_up is not None:
            x = self.space_up(x, size)
        if self.time_up is not None:
            x = self.time_up(x, cache)
        return x


class ConditionAdapter(nn.Module):
    """Latents -> 4 context maps, finest first, shaped like the inputs of U-Net stages 0-3.

    A grown model (`config.levels`) first brings its latents back to the 4x rate with one
    TimeUpsample per level, the top level's first; the rest is the 4x adapter."""

    def __init__(self, config: CDTConfig) -> None:
        super().__init__()
        pad = config.time_pad
        # Indexed by level, so a model grown further keeps the names of the levels below.
        self.time_up = nn.ModuleList(TimeUpsample(config.latent_channels) for _ in config.levels)
        self.lift = Lift(config.latent_channels, config.lift_branch, pad)
        self.stages = nn.ModuleList()
        cin = config.lift_branch[-1]
        last = len(config.adapter_stages) - 1
        for i, stage in enumerate(config.adapter_stages):
            if i == last and config.context0_head == "upsample":
                # The finest map comes straight out of the spatial upsample.
                stage = Stage(stage.width, True, stage.time)
                self.stages.append(UpStage(cin, stage, config.spatial_upsample, pad,
                                           space_out=config.context0_channels))
            else:
                self.stages.append(UpStage(cin, stage, config.spatial_upsample, pad))
            cin = stage.width
        self.head = (
            ResnetBlock(cin, config.context0_channels, time_pad=pad)
            if config.context0_head == "resnet"
            else None
        )

    def forward(self, z: torch.Tensor, cache: Cache = None) -> list[torch.Tensor]:
        for up in reversed(self.time_up):
            z = up(z, cache)
        h = self.lift(z, cache)
        maps = []
        for stage in self.stages:
            h = stage(h, cache=cache)
            maps.append(h)
        if self.head is not None:
            maps[-1] = self.head(h, cache=cache)
        return maps[::-1]


class UNet(nn.Module):
    """3D causal U-Net in pixel space predicting x0 from (x_t, t, context maps)."""

    def __init__(self, config: CDTConfig, context_channels: list[int]) -> None:
        super().__init__()
        pad = config.time_pad
        temb = config.time_embed_dim
        self.time_embed = TimeEmbedding(config.time_embed_hidden, temb, config.num_timesteps)
        stages = config.unet_stages
        self.down = nn.ModuleList()
        cin = 3
        for i, stage in enumerate(stages):
            ctx = context_channels[i] if i < len(context_channels) else 0
            blocks = nn.ModuleList()
            for j in range(config.unet_blocks):
                first_kernel = (3, 7, 7) if i == 0 and j == 0 else (3, 3, 3)
                blocks.append(ResnetBlock(cin + ctx if j == 0 else stage.width, stage.width, temb, pad, first_kernel))
            self.down.append(
                nn.ModuleDict(
                    {
                        "blocks": blocks,
                        "attn": LinearAttention(stage.width),
                        "space": Downsample(stage.width) if stage.space else nn.Identity(),
                        "time": TimeDownsample(stage.width, pad) if stage.time else nn.Identity(),
                    }
                )
            )
            cin = stage.width
        self.mid1 = ResnetBlock(cin, cin, temb, pad)
        self.mid_attn = LinearAttention(cin)
        self.mid2 = ResnetBlock(cin, cin, temb, pad)
        # Up path: stage i takes the skip of down stage i (except stage 0), then
        # upsamples as down stage i-1 downsampled.
        self.up = nn.ModuleList()
        for i in reversed(range(len(stages))):
            skip = stages[i].width if i > 0 else 0
            resample = stages[i - 1] if i > 0 else Stage(stages[i].width)
            stage = Stage(stages[i].width, resample.space, resample.time)
            self.up.append(UpStage(cin + skip, stage, config.unet_upsample, pad, attention=True,
                                   temb_dim=temb, upsample_kernel=config.unet_upsample_kernel))
            cin = stages[i].width
        self.out_norm = ChannelLayerNorm(cin)
        self.out_conv = CausalConv3d(cin, 3, (3, 7, 7), pad)

    def forward(self, x: torch.Tensor, t: torch.Tensor, contexts: list[torch.Tensor], cache: Cache = None):
        temb = self.time_embed(t)
        h = x
        skips, sizes = [], []
        for i, stage in enumerate(self.down):
            if i < len(contexts):
                h = torch.cat([h, contexts[i].to(h.dtype)], dim=1)
            for block in stage["blocks"]:
                h = block(h, temb, cache)
            h = stage["attn"](h)
            skips.append(h)
            sizes.append(h.shape[-2:])
            h = stage["space"](h)
            h = stage["time"](h, cache) if isinstance(stage["time"], TimeDownsample) else h
        h = self.mid2(self.mid_attn(self.mid1(h, temb, cache)), temb, cache)
        n = len(self.down)
        for k, up in enumerate(self.up):
            i = n - 1 - k
            if i > 0:
                h = torch.cat([h, skips[i]], dim=1)
            h = up(h, temb, cache, size=sizes[i - 1] if i > 0 else None)
        return self.out_conv(self.out_norm(h), cache)
