"""Padding a clip to the model's grid, and the record that crops it back exactly.

Time: 1+tk frames, t the model's temporal factor (`CDTConfig.time_factor`: 4 for a 4x model,
8 for an 8x one), by repeating the last frame, the rule `StreamingEncoder.finish` also
applies, so whole-clip and streamed encodes agree.

Space: height and width to multiples of 8, on the bottom and right edges, in
`replicate` mode. Zeros would put a hard black edge into the picture, which costs the
encoder latent capacity and bleeds into the real border pixels on decode; `reflect`
mirrors content (inventing detail at the edge) and fails when the pad is as large as
the frame (a 4-pixel-high clip). Replicate continues the edge smoothly at any size.
Padding only bottom/right keeps the crop a plain slice and the latent grid aligned
with the picture's top-left corner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import SPACE_FACTOR

SPATIAL_PAD_MODE = "replicate"


@dataclass(frozen=True)
class Padding:
    """Frames appended at the end, rows at the bottom, columns at the right."""

    frames: int
    height: int
    width: int

    @classmethod
    def for_shape(cls, frames: int, height: int, width: int, time_factor: int) -> "Padding":
        """The padding of a clip for a model of `time_factor` pixel frames per latent frame."""
        if min(frames, height, width) < 1:
            raise ValueError(f"cannot pad an empty clip of {frames} frames, {height}x{width}")
        return cls((-(frames - 1)) % time_factor, (-height) % SPACE_FACTOR, (-width) % SPACE_FACTOR)


def pad_spatial(video: torch.Tensor) -> torch.Tensor:
    """Pad (B,C,T,H,W) so H and W are multiples of 8 (frame by frame, so chunks agree)."""
    pad_h, pad_w = (-video.shape[3]) % SPACE_FACTOR, (-video.shape[4]) % SPACE_FACTOR
    if pad_h == 0 and pad_w == 0:
        return video
    return F.pad(video, (0, pad_w, 0, pad_h, 0, 0), mode=SPATIAL_PAD_MODE)


def pad_video(video: torch.Tensor, time_factor: int) -> tuple[torch.Tensor, Padding]:
    """Pad (B,C,T,H,W) to 1+tk frames (t = `time_factor`) and H, W multiples of 8; return the
    padding used."""
    padding = Padding.for_shape(*video.shape[2:], time_factor)
    video = pad_spatial(video)
    if padding.frames:
        video = torch.cat([video, video[:, :, -1:].expand(-1, -1, padding.frames, -1, -1)], dim=2)
    return video, padding
