"""Where a stream stands in its inputs and outputs, counted in frames from the video's start.

An encode stream takes pixel frames and emits latent frames: the video's first frame is a
group of its own, then every TIME_FACTOR (4) frames complete a group and emit one latent
frame. Frames past the last complete group wait in the stream's state, pending, until
more arrive or `finish` pads them. A decode stream takes latent frames and emits pixel
frames: 1 for the video's first latent frame, 4 for each one after it.

The streams (model/streaming/streams.py) keep to these rules and the receptive field
(model/streaming/receptive_field.py) is counted in their units; code that logs a stream's
inputs to rebuild it later asks here where a rebuilt stream stands.
"""

from __future__ import annotations

from ..config import TIME_FACTOR
from ..tokenizer import pixel_frames

KINDS = ("encode", "decode")


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be 'encode' or 'decode', got {kind!r}")


def group_size(kind: str) -> int:
    """Inputs per output group after a stream's first input: 4 pixel frames per latent
    frame for encode; each latent frame for decode."""
    check_kind(kind)
    return TIME_FACTOR if kind == "encode" else 1


def outputs_for(kind: str, inputs: int) -> int:
    """The outputs a stream has emitted once `inputs` inputs are in its state (an encode
    stream's inputs past its last group boundary emit nothing yet)."""
    check_kind(kind)
    if inputs < 1:
        return 0
    return 1 + (inputs - 1) // TIME_FACTOR if kind == "encode" else pixel_frames(inputs, first_chunk=True)


def inputs_for(kind: str, outputs: int) -> int:
    """The fewest inputs after which a stream has emitted `outputs` outputs."""
    check_kind(kind)
    if outputs < 1:
        return 0
    return pixel_frames(outputs, first_chunk=True) if kind == "encode" else 1 + -(-(outputs - 1) // TIME_FACTOR)


def settled_inputs(kind: str, end: int) -> int:
    """The inputs a stream's state has consumed once it has taken `end` inputs: an encode
    stream keeps the frames past its last group boundary pending, outside its state."""
    return end if group_size(kind) == 1 else inputs_for(kind, outputs_for(kind, end))


def resume_position(kind: str, start: int) -> int:
    """Where a stream rebuilt from input `start` with no history resumes
    (`StreamingEncoder.resume`, `StreamingDecoder.resume`): an encode stream on a group
    boundary (1+4k), the first at or after `start`; a decode stream at `start`."""
    group = group_size(kind)
    return start if group == 1 or start == 0 else settled_inputs(kind, start + group - 1)


def decode_chunk_latents(frames: int) -> int:
    """The latent frames of a decode chunk that yields at most `frames` pixel frames past a
    stream's first chunk (at least one latent frame, which yields 4)."""
    return max(1, frames // TIME_FACTOR)
