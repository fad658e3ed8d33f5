"""Latents files and frames files: safetensors with one named tensor and string metadata.

A latents file holds `latents` (1,16,T',H'/8,W'/8) and says which model made them and how
to crop the decode back exactly; /v1/encode answers with one, /v1/decode takes one, and
the client assembles one from an encode session's chunks. A frames file holds uint8
(T,H,W,3) `frames` and, optionally, their rate.
"""

from __future__ import annotations

from typing import Any

LATENTS_FORMAT = "cdt-latents"
LATENTS_FORMAT_VERSION = "2"  # a metadata value, so text
LATENTS_TENSOR = "latents"
# A latents file's metadata past `format` and `format_version`, and the type each value reads
# as: the model (the name it was served under, hash, preset, kind, pixel frames per latent
# frame, compute dtype of the encode), the clip before padding, and the padding added to fit
# the model's strides.
LATENTS_FIELDS: dict[str, type] = {
    "model_name": str, "model_hash": str, "preset": str, "model_kind": str, "time_factor": int, "dtype": str,
    "frames": int, "height": int, "width": int, "fps": float,
    "pad_frames": int, "pad_height": int, "pad_width": int,
}
# Version 1 files predate several models per service: every model then was 4x in time, and
# the file named its model by hash only.
VERSION_1_DEFAULTS = {"model_name": "", "time_factor": "4"}

FRAMES_FORMAT = "cdt-frames"
FRAMES_TENSOR = "frames"


class LatentsMetadataError(ValueError):
    """Metadata that is not a latents file's of this version."""


def latents_metadata(**fields: Any) -> dict[str, str]:
    """A latents file's string metadata from every one of `LATENTS_FIELDS` (floats as repr,
    which reads back exactly)."""
    if fields.keys() != LATENTS_FIELDS.keys():
        raise ValueError(f"latents metadata needs the fields {sorted(LATENTS_FIELDS)}, got {sorted(fields)}")
    typed = {key: kind(fields[key]) for key, kind in LATENTS_FIELDS.items()}
    return {"format": LATENTS_FORMAT, "format_version": LATENTS_FORMAT_VERSION,
            **{key: repr(value) if isinstance(value, float) else str(value) for key, value in typed.items()}}


def read_latents_metadata(meta: dict[str, str]) -> dict[str, Any]:
    """The typed `LATENTS_FIELDS` of a latents file's metadata."""
    if meta.get("format") != LATENTS_FORMAT:
        raise LatentsMetadataError(f"not a {LATENTS_FORMAT} file (format={meta.get('format')!r})")
    if meta.get("format_version") == "1":
        meta = {**VERSION_1_DEFAULTS, **meta}
    elif meta.get("format_version") != LATENTS_FORMAT_VERSION:
        raise LatentsMetadataError(f"unsupported format version {meta.get('format_version')!r}")
    try:
        return {key: kind(meta[key]) for key, kind in LATENTS_FIELDS.items()}
    except (KeyError, ValueError) as exc:
        raise LatentsMetadataError(f"bad metadata ({exc})") from None


def frames_metadata(fps: float | None) -> dict[str, str]:
    """A frames file's string metadata; the rate only when it is known."""
    return {"format": FRAMES_FORMAT, **({"fps": repr(float(fps))} if fps else {})}
