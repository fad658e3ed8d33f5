"""How a decoded video frame becomes the picture the model sees: the display-size tag our
mp4 files carry, and the stream's rotation.

h264/yuv420p needs an even width and height, so an odd-sized clip is written padded by one
row or column and its true size stored in the container metadata under `DISPLAY_SIZE_TAG`;
readers crop it back. A stream's rotation (from its display matrix, as PyAV reports it) is
applied after the crop.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

DISPLAY_SIZE_TAG = "cdt_display_size"  # "WIDTHxHEIGHT"


def display_size_tags(width: int, height: int) -> dict[str, str]:
    """The container metadata of a clip of this size: its size when a side is odd, else none."""
    return {DISPLAY_SIZE_TAG: f"{width}x{height}"} if width % 2 or height % 2 else {}


def display_size(metadata: Mapping[str, str], coded_width: int, coded_height: int) -> tuple[int, int]:
    """(width, height) of the picture before rotation: the tagged size when it fits in the
    coded frame, else the coded size. ValueError when the tag is malformed."""
    tag = metadata.get(DISPLAY_SIZE_TAG)
    if tag:
        try:
            width, height = (int(v) for v in tag.split("x"))
        except ValueError:
            raise ValueError(f"bad {DISPLAY_SIZE_TAG} tag {tag!r}") from None
        if 0 < width <= coded_width and 0 < height <= coded_height:
            return width, height
    return coded_width, coded_height


def displayed(rgb: np.ndarray, display: tuple[int, int], rotation: int) -> np.ndarray:
    """An (H,W,3) decoded frame cropped to its display size, then turned by the stream's
    rotation (counter-clockwise degrees, as np.rot90 turns for k > 0)."""
    rgb = rgb[: display[1], : display[0]]
    if rotation % 360:
        rgb = np.rot90(rgb, k=round(rotation / 90) % 4)
    return rgb
