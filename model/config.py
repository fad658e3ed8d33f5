"""Model configuration: the single source of truth for every shape in the network.

A config fully rebuilds a model; it is stored as `config.json` beside the weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

LATENT_CHANNELS = 16
TIME_FACTOR = 4
SPACE_FACTOR = 8
# Diffusion levels of every preset, hence the most DDIM steps a decode can take.
NUM_TIMESTEPS = 8192


@dataclass(frozen=True)
class Stage:
    """One resolution stage: output width and the resampling applied after it."""

    width: int
    space: bool = False
    time: bool = False

    @staticmethod
    def parse(spec: Any) -> "Stage":
        if isinstance(spec, Stage):
            return spec
        if isinstance(spec, dict):
            return Stage(**spec)
        width, space, time = spec
        return Stage(int(width), bool(space), bool(time))


def _stages(*specs: tuple[int, int, int]) -> tuple[Stage, ...]:
    return tuple(Stage.parse(s) for s in specs)


@dataclass(frozen=True)
class CDTConfig:
    preset: str
    # Encoder: stem width, then one ResnetBlock per stage.
    encoder_stages: tuple[Stage, ...]
    kl_branch: tuple[int, ...]  # ResnetBlock widths of the KL head's branch
    # Decoder side.
    lift_branch: tuple[int, ...]  # conv z->first, then ResnetBlocks through the rest
    adapter_stages: tuple[Stage, ...]  # 4 stages; context maps are taken after each
    context0_head: str  # "upsample": spatial upsample to context0; "resnet": ResnetBlock
    context0_channels: int
    unet_stages: tuple[Stage, ...]
    unet_blocks: int = 2  # ResnetBlocks per down stage (the up path uses one)
    spatial_upsample: str = "transposed"  # "transposed" | "nearest" (adapter)
    unet_upsample: str = "nearest"  # spatial upsample on the U-Net's up path
    unet_upsample_kernel: int = 5
    time_embed_hidden: int = 256
    time_embed_dim: int = 64
    time_pad: str = "zeros"  # causal left padding of the first chunk: "zeros" | "replicate"
    # Diffusion.
    num_timesteps: int = NUM_TIMESTEPS
    noise_scale: float = 0.8
    # Deterministic baseline decoder widths (mirror of the encoder, coarse to fine).
    vae_decoder_stages: tuple[Stage, ...] = field(default_factory=tuple)
    latent_channels: int = LATENT_CHANNELS

    def __post_init__(self) -> None:
        for name in ("encoder_stages", "adapter_stages", "unet_stages", "vae_decoder_stages"):
            object.__setattr__(self, name, tuple(Stage.parse(s) for s in getattr(self, name)))
        for name in ("kl_branch", "lift_branch"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        def count(stages, attr):
            return sum(getattr(s, attr) for s in stages)

        if count(self.encoder_stages, "space") != 3 or count(self.encoder_stages, "time") != 2:
            raise ValueError("encoder must downsample space 3 times and time 2 times (4x8x8)")
        if len(self.adapter_stages) != 4:
            raise ValueError("the condition adapter has exactly 4 stages (4 context maps)")
        if len(self.unet_stages) < 4:
            raise ValueError("the U-Net needs at least 4 down stages to take 4 context maps")
        if self.time_pad not in ("zeros", "replicate"):
            raise ValueError(f"time_pad must be 'zeros' or 'replicate', got {self.time_pad!r}")
        if self.context0_head not in ("upsample", "resnet"):
            raise ValueError(f"context0_head must be 'upsample' or 'resnet', got {self.context0_head!r}")
        for name in ("spatial_upsample", "unet_upsample"):
            if getattr(self, name) not in ("transposed", "nearest"):
                raise ValueError(f"{name} must be 'transposed' or 'nearest'")

    @property
    def time_factor(self) -> int:
        """Pixel frames per latent frame after the first (the frames rule is 1 + time_factor*k)."""
        return TIME_FACTOR

    # --- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CDTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "CDTConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "CDTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


# CDT-S: the reference small model (cdt-method.md section 4 table).
SMALL = CDTConfig(
    preset="small",
    encoder_stages=_stages((64, 1, 0), (128, 1, 0), (192, 1, 1), (256, 0, 1)),
    kl_branch=(192, 128, 64),
    lift_branch=(64, 128, 192, 256),
    adapter_stages=_stages((192, 0, 1), (128, 1, 1), (64, 1, 0), (64, 0, 0)),
    context0_head="upsample",
    context0_channels=3,
    unet_stages=_stages((64, 1, 0), (128, 1, 0), (192, 1, 1), (256, 0, 1), (320, 1, 0), (384, 0, 0)),
    spatial_upsample="transposed",
    vae_decoder_stages=_stages((832, 0, 1), (640, 1, 1), (512, 1, 0), (320, 1, 0), (192, 0, 0)),
)

# CDT-B: the reference base model.
BASE = CDTConfig(
    preset="base",
    encoder_stages=_stages((128, 0, 0), (256, 1, 0), (384, 1, 1), (512, 1, 1)),
    kl_branch=(384, 256, 128),
    lift_branch=(128, 256, 384, 512),
    adapter_stages=_stages((384, 1, 1), (256, 1, 1), (128, 1, 0), (128, 0, 0)),
    context0_head="resnet",
    context0_channels=16,
    unet_stages=_stages((64, 0, 0), (128, 1, 0), (192, 1, 1), (256, 1, 1), (320, 1, 0), (384, 0, 0)),
    spatial_upsample="nearest",
    vae_decoder_stages=_stages((960, 1, 1), (704, 1, 1), (512, 1, 0), (320, 0, 0), (192, 0, 0)),
)

# tiny: the CPU-trainable preset. The structure is CDT-S's (same resampling positions,
# same injection points), with widths cut so that the full-resolution stages, which
# dominate CPU time, run at 16-32 channels. See README "Presets".
TINY = CDTConfig(
    preset="tiny",
    encoder_stages=_stages((32, 1, 0), (48, 1, 0), (64, 1, 1), (96, 0, 1)),
    kl_branch=(64, 32),
    lift_branch=(32, 64, 96),
    adapter_stages=_stages((64, 0, 1), (48, 1, 1), (32, 1, 0), (16, 0, 0)),
    context0_head="upsample",
    context0_channels=3,
    unet_stages=_stages((16, 1, 0), (32, 1, 0), (48, 1, 1), (64, 0, 1), (96, 1, 0), (96, 0, 0)),
    unet_blocks=1,
    unet_upsample_kernel=3,
    spatial_upsample="transposed",
    vae_decoder_stages=_stages((208, 0, 1), (160, 1, 1), (112, 1, 0), (64, 1, 0), (32, 0, 0)),
)

PRESETS: dict[str, CDTConfig] = {c.preset: c for c in (TINY, SMALL, BASE)}
