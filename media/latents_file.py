"""Latents files: safetensors with one tensor `latents` (1,16,T',H'/8,W'/8) and string
metadata that says which model made them and how to crop the decode back exactly (the
format is `cdt_client.formats.files`, shared with the client).

The same bytes serve files on disk (`save_latents`/`load_latents`) and HTTP bodies
(`latents_to_bytes`/`latents_from_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from cdt_client.formats.files import LATENTS_TENSOR, LatentsMetadataError, latents_metadata, read_latents_metadata
from cdt_client.formats.tensors import safetensors_header, safetensors_metadata
from model import LATENT_CHANNELS, SPACE_FACTOR

from .padding import Padding
from .video import MAX_FPS


class LatentsFileError(ValueError):
    """Bytes that are not a valid latents file."""


class ModelMismatchError(LatentsFileError):
    """Latents made by another model than the one asked to decode them."""


@dataclass
class LatentsInfo:
    """What a latents file says about its latents: the model that made them and the clip
    they decode to."""

    model_name: str  # the name the model was served under ("" where none was given)
    model_hash: str
    preset: str
    model_kind: str
    time_factor: int  # pixel frames per latent frame past the first
    dtype: str  # compute dtype of the encode
    frames: int  # original clip, before padding
    height: int
    width: int
    fps: float
    padding: Padding

    @property
    def model_label(self) -> str:
        """The model as messages name it: its name, if any, and its short hash."""
        return f"{self.model_name} ({self.model_hash[:12]})" if self.model_name else self.model_hash[:12]

    def check_model(self, model_hash: str, force: bool = False, model_name: str = "") -> None:
        if self.model_hash != model_hash and not force:
            asked = f"{model_name} ({model_hash[:12]})" if model_name else model_hash[:12]
            raise ModelMismatchError(
                f"latents were made by model {self.model_label}, the model asked to decode them is {asked} "
                "(use the same model, or force to decode anyway)"
            )

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        return (
            1,
            LATENT_CHANNELS,
            1 + (self.frames + self.padding.frames - 1) // self.time_factor,
            (self.height + self.padding.height) // SPACE_FACTOR,
            (self.width + self.padding.width) // SPACE_FACTOR,
        )

    def metadata(self) -> dict[str, str]:
        """The file's string metadata."""
        return latents_metadata(model_name=self.model_name, model_hash=self.model_hash, preset=self.preset,
                                model_kind=self.model_kind, time_factor=self.time_factor, dtype=self.dtype,
                                frames=self.frames, height=self.height, width=self.width, fps=self.fps,
                                pad_frames=self.padding.frames, pad_height=self.padding.height,
                                pad_width=self.padding.width)

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str = "latents") -> "LatentsInfo":
        try:
            values = read_latents_metadata(meta)
        except LatentsMetadataError as exc:
            raise LatentsFileError(f"{source}: {exc}") from None
        padding = Padding(values.pop("pad_frames"), values.pop("pad_height"), values.pop("pad_width"))
        info = cls(padding=padding, **values)
        if not 0 < info.fps <= MAX_FPS:  # NaN fails too
            raise LatentsFileError(f"{source}: fps {info.fps} is not in (0, {MAX_FPS:g}]")
        if info.time_factor < 1:
            raise LatentsFileError(f"{source}: time_factor {info.time_factor} is not a positive integer")
        try:
            if info.padding != Padding.for_shape(info.frames, info.height, info.width, info.time_factor):
                raise ValueError(f"padding {info.padding} does not fit {info.frames} frames of "
                                 f"{info.height}x{info.width}")
        except ValueError as exc:
            raise LatentsFileError(f"{source}: {exc}") from None
        return info

    def check_latents(self, dtype_is_float: bool, shape: tuple[int, ...], source: str = "latents") -> None:
        if tuple(shape) != self.latent_shape or not dtype_is_float:
            raise LatentsFileError(f"{source}: latents {tuple(shape)} do not match the metadata (expected float "
                                   f"{self.latent_shape})")


@dataclass
class LatentsFile(LatentsInfo):
    latents: torch.Tensor  # (1, 16, T', H'/8, W'/8)

    @property
    def info(self) -> LatentsInfo:
        return LatentsInfo(**{f.name: getattr(self, f.name) for f in fields(LatentsInfo)})


def latents_to_bytes(item: LatentsFile) -> bytes:
    """The file's bytes: float32 latents under the header the service streams. The same
    latents and metadata always give the same bytes (safetensors' own writer orders the
    metadata differently from one process to the next), so data set shards can be compared
    byte for byte."""
    item.check_latents(item.latents.is_floating_point(), item.latents.shape)
    data = item.latents.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return safetensors_header(LATENTS_TENSOR, "F32", tuple(data.shape), item.metadata()) + data.tobytes()


def latents_from_bytes(data: bytes, model_hash: str | None = None, force: bool = False,
                       source: str = "latents") -> LatentsFile:
    """Parse and validate; with `model_hash`, refuse latents of another model unless `force`."""
    try:
        meta = safetensors_metadata(data)
        tensors = st_load(data)
    except Exception as exc:  # safetensors and the header parser raise several types
        raise LatentsFileError(f"{source}: not a safetensors file ({exc})") from None
    info = LatentsInfo.from_metadata(meta, source)
    if LATENTS_TENSOR not in tensors:
        raise LatentsFileError(f"{source}: no tensor named {LATENTS_TENSOR!r}")
    latents = tensors[LATENTS_TENSOR]
    info.check_latents(latents.is_floating_point(), latents.shape, source)
    if model_hash is not None:
        info.check_model(model_hash, force)
    return LatentsFile(latents=latents, **vars(info))


def save_latents(path: str | Path, item: LatentsFile) -> None:
    Path(path).write_bytes(latents_to_bytes(item))


def load_latents(path: str | Path, model_hash: str | None = None, force: bool = False) -> LatentsFile:
    path = Path(path)
    if not path.is_file():
        raise LatentsFileError(f"{path}: no such file")
    return latents_from_bytes(path.read_bytes(), model_hash, force, source=str(path))
