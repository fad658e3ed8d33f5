"""Streams over the network: chunked encode/decode with an explicit state (`streams`),
the positions a stream stands at (`positions`), and how far back its state reaches
(`receptive_field`).

This unit sits above the network modules (layers, encoder, decoder, diffusion,
tokenizer), which import none of it; the checkpoint loader and `model`'s exports sit
above it.
"""

from .positions import (decode_chunk_latents, group_size, inputs_for, outputs_for, resume_position,
                        settled_inputs)
from .receptive_field import ReceptiveField, measure, measure_receptive_field
from .streams import CacheMismatchError, StreamingDecoder, StreamingEncoder, pad_frames, push_together

__all__ = [
    "CacheMismatchError",
    "ReceptiveField",
    "StreamingDecoder",
    "StreamingEncoder",
    "decode_chunk_latents",
    "group_size",
    "inputs_for",
    "measure",
    "measure_receptive_field",
    "outputs_for",
    "pad_frames",
    "push_together",
    "resume_position",
    "settled_inputs",
]
