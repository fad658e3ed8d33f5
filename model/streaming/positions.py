"""Where a stream stands in its inputs and outputs, counted in frames from the video's start.

An encode stream takes pixel frames and emits latent frames: the video's first frame is a
group of its own, then every `time_factor` frames (the model's `config.time_factor`: 4, or
8 and 16 for grown levels) complete a group and emit one latent frame. Frames past the
last complete group wait in the stream's state, pending, until more arrive or `finish`
pads them. A decode stream takes latent frames and emits pixel frames: 1 for the video's
first latent frame, `time_factor` for each one after it.

Every function takes the model's factor; its default is the base 4x model's
(`TIME_FACTOR`), for callers that serve that model alone.

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


def group_size(kind: str, time_factor: int = TIME_FACTOR) -> int:
    """Inputs per output group after a stream's first input: `time_factor` pixel frames
    per latent frame for encode; each latent frame for decode."""
    check_kind(kind)
    return time_factor if kind == "encode" else 1


def outputs_for(kind: str, inputs: int, time_factor: int = TIME_FACTOR) -> int:
    """The outputs a stream has emitted once `inputs` inputs are in its state (an encode
    stream's inputs past its last group boundary emit nothing yet)."""
    check_kind(kind)
    if inputs < 1:
        return 0
    if kind == "encode":
        return 1 + (inputs - 1) // time_factor
    return pixel_frames(inputs, first_chunk=True, time_factor=time_factor)


def inputs_for(kind: str, outputs: int, time_factor: int = TIME_FACTOR) -> int:
    """The fewest inputs after which a stream has emitted `outputs` outputs."""
    check_kind(kind)
    if outputs < 1:
        return 0
    if kind == "encode":
        return pixel_frames(outputs, first_chunk=True, time_factor=time_factor)
    return 1 + -(-(outputs - 1) // time_factor)


def settled_inputs(kind: str, end: int, time_factor: int = TIME_FACTOR) -> int:
    """The inputs a stream's state has consumed once it has taken `end` inputs: an encode
    stream keeps the frames past its last group boundary pending, outside its state."""
    if group_size(kind, time_factor) == 1:
        return end
    return inputs_for(kind, outputs_for(kind, end, time_factor), time_factor)


def resume_position(kind: str, start: int, time_factor: int = TIME_FACTOR) -> int:
    """Where a stream rebuilt from input `start` with no history resumes
    (`StreamingEncoder.resume`, `StreamingDecoder.resume`): an encode stream on a group
    boundary (1+fk), the first at or after `start`; a decode stream at `start`."""
    group = group_size(kind, time_factor)
    return start if group == 1 or start == 0 else settled_inputs(kind, start + group - 1, time_factor)


def decode_chunk_latents(frames: int, time_factor: int = TIME_FACTOR) -> int:
    """The latent frames of a decode chunk that yields at most `frames` pixel frames past a
    stream's first chunk (at least one latent frame, which yields `time_factor`)."""
    return max(1, frames // time_factor)
