"""Latents files and frames files: safetensors with one named tensor and string metadata.

A latents file holds `latents` (1,16,T',H'/8,W'/8) and says which model made them and how
to crop the decode back exactly; /v1/encode answers with one, /v1/decode takes one, and
the client assembles one from an encode session's chunks. A frames file holds uint8
(T,H,W,3) `frames` and, optionally, their rate.
"""

from __future__ import annotations

from typing import Any

LATENTS_FORMAT = "cdt-latents"
LATENTS_FORMAT_VERSION = "1"  # a metadata value, so text
LATENTS_TENSOR = "latents"
# A latents file's metadata past `format` and `format_version`, and the type each value reads
# as: the model (hash, preset, kind, compute dtype of the encode), the clip before padding,
# and the padding added to fit the model's strides.
LATENTS_FIELDS: dict[str, type] = {
    "model_hash": str, "preset": str, "model_kind": str, "dtype": str,
    "frames": int, "height": int, "width": int, "fps": float,
    "pad_frames": int, "pad_height": int, "pad_width": int,
}

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
    if meta.get("format_version") != LATENTS_FORMAT_VERSION:
        raise LatentsMetadataError(f"unsupported format version {meta.get('format_version')!r}")
    try:
        return {key: kind(meta[key]) for key, kind in LATENTS_FIELDS.items()}
    except (KeyError, ValueError) as exc:
        raise LatentsMetadataError(f"bad metadata ({exc})") from None


def frames_metadata(fps: float | None) -> dict[str, str]:
    """A frames file's string metadata; the rate only when it is known."""
    return {"format": FRAMES_FORMAT, **({"fps": repr(float(fps))} if fps else {})}
