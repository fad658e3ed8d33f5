"""Encode and decode sessions: what differs between the two kinds, behind one interface.

An encode session takes frames, any number per chunk, and answers the latents of the
complete frame groups (`time_factor` frames of its model) so far; its finish flushes the
frames still pending. A decode session takes latents and answers their frames; its finish
only closes it. `KINDS[name]` gives a session's behaviour, so the session service never asks
which kind it serves.
"""

from __future__ import annotations

import io
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from cdt_client.formats.api import CHUNK_FORMAT, CHUNK_METADATA_KEY, NPY, SAFETENSORS
from cdt_client.formats.files import LATENTS_TENSOR
from safetensors.torch import save as st_save

from media import Padding, pad_spatial, quantise
from model import SPACE_FACTOR, StreamingDecoder, StreamingEncoder, Tokenizer

from ..bodies import Body, ClipOptions, Limits, parse_latent_chunk, read_clip
from ..domain_errors import BadParameter, InvalidInput, TooLarge
from ..ops import check_decode_steps
from ..responses import render_frames
from .protocol import ChunkResult
from .record import Counters, SessionRecord

Stream = StreamingEncoder | StreamingDecoder


@dataclass
class Applied:
    """A computed chunk, not yet committed: its answer, the record that succeeds the stored
    one, and the stream to keep hot (None once the session is finished)."""

    result: ChunkResult
    record: SessionRecord
    stream: Stream | None


class SessionKind(ABC):
    name: str  # the record's `kind`, and the model's name for the stream

    @abstractmethod
    def output_format(self, fmt: str | None) -> str:
        """The answer's format: `fmt` (BadParameter if this kind cannot answer in it) or the default."""

    @abstractmethod
    def inputs(self, counters: Counters) -> int:
        """Inputs received so far, in the log's unit (pixel frames or latent frames)."""

    @abstractmethod
    def steps(self, record: SessionRecord) -> int:
        """DDIM steps a chunk runs: what its receptive field and memory depend on."""

    def check_steps(self, model: Tokenizer, steps: int) -> None:
        """Refuse, at creation, steps the model would refuse at the first chunk."""

    @abstractmethod
    def parse(self, body: Body, limits: Limits) -> torch.Tensor:
        """A chunk body's frames (float (1,3,n,H,W), unpadded) or latents (in their arrival dtype)."""

    @abstractmethod
    def model_input(self, chunk: torch.Tensor) -> torch.Tensor:
        """What the stream takes for a parsed chunk."""

    @abstractmethod
    def open(self, model: Tokenizer, record: SessionRecord, position: int) -> Stream:
        """A stream of the session that has taken `position` inputs and remembers none."""

    @abstractmethod
    def restore(self, model: Tokenizer, record: SessionRecord, state: bytes) -> Stream:
        """A stream from a snapshot of its state."""

    @abstractmethod
    def check(self, record: SessionRecord, chunk: torch.Tensor, limits: Limits, time_factor: int) -> None:
        """Validate a parsed chunk against the session (whose model has `time_factor` pixel frames
        per latent frame), and record in it the sizes the chunk fixes."""

    @abstractmethod
    def finish(self, record: SessionRecord) -> ChunkResult | None:
        """Check a finish; its answer when it runs no model job, else None (the stream flushes)."""

    @abstractmethod
    def job_shape(self, record: SessionRecord, chunk: torch.Tensor | None, time_factor: int) -> tuple[int, int, int]:
        """(frames, height, width) of the pixels a chunk's model job holds (None: a finish's flush),
        which its memory estimate is of, for a model of `time_factor`."""

    @abstractmethod
    def to_host(self, output: torch.Tensor) -> torch.Tensor:
        """A stream's output as the chunk's answer is made from, copied to the host (inside the
        model job, so the job's time includes the device's)."""

    @abstractmethod
    def applied(self, record: SessionRecord, stream: Stream, chunk: torch.Tensor | None, output: torch.Tensor,
                fmt: str) -> Applied:
        """Count a computed chunk (None: the flush of a finish) into `record` and make its answer
        (host work: rendering, serialising)."""


class EncodeKind(SessionKind):
    name = "encode"

    def output_format(self, fmt: str | None) -> str:
        if fmt == "mp4":
            raise BadParameter("encode sessions return latents: use format=safetensors or npy")
        return fmt or "safetensors"

    def inputs(self, counters: Counters) -> int:
        return counters.frames_in

    def steps(self, record: SessionRecord) -> int:
        return 1

    def parse(self, body: Body, limits: Limits) -> torch.Tensor:
        return read_clip(body, ClipOptions(), limits)[0]

    def model_input(self, chunk: torch.Tensor) -> torch.Tensor:
        return pad_spatial(chunk)  # to multiples of 8, as a whole clip is

    def open(self, model: Tokenizer, record: SessionRecord, position: int) -> Stream:
        if position:
            return StreamingEncoder.resume(model, record.model_hash, position)
        return StreamingEncoder(model, record.model_hash)

    def restore(self, model: Tokenizer, record: SessionRecord, state: bytes) -> Stream:
        return StreamingEncoder.from_state(model, record.model_hash, state)

    def check(self, record: SessionRecord, chunk: torch.Tensor, limits: Limits, time_factor: int) -> None:
        h, w = chunk.shape[3:]
        record.height, record.width = record.height or h, record.width or w
        if (h, w) != (record.height, record.width):
            raise InvalidInput(f"chunk frames are {h}x{w}, the session is {record.height}x{record.width}",
                               code="chunk_shape_mismatch")

    def finish(self, record: SessionRecord) -> ChunkResult | None:
        if record.counters.frames_in == 0:
            raise InvalidInput("nothing to finish: the session received no frames", code="empty_session")
        return None

    def job_shape(self, record: SessionRecord, chunk: torch.Tensor | None, time_factor: int) -> tuple[int, int, int]:
        """The chunk's frames plus up to a group less one pending from earlier chunks; a finish
        flushes the last group."""
        if chunk is None:
            return time_factor, record.height, record.width
        return chunk.shape[2] + time_factor - 1, *chunk.shape[3:]

    def to_host(self, output: torch.Tensor) -> torch.Tensor:
        return output.float().cpu()

    def applied(self, record: SessionRecord, stream: Stream, chunk: torch.Tensor | None, output: torch.Tensor,
                fmt: str) -> Applied:
        counters = record.counters
        start = counters.latents_out
        record.next_seq += chunk is not None
        counters.frames_in += 0 if chunk is None else chunk.shape[2]
        counters.latents_out += output.shape[2]
        record.finished = chunk is None
        facts = {"format": CHUNK_FORMAT, "session": record.id, "latent_start": start,
                 "latent_count": output.shape[2], "frames_in": counters.frames_in, "finished": record.finished,
                 "height": record.height, "width": record.width, "model": record.model,
                 "model_hash": record.model_hash}
        if record.finished:  # what a client needs to write the whole clip's latents file
            time_factor = stream.model.config.time_factor
            padding = Padding.for_shape(counters.frames_in, record.height, record.width, time_factor)
            facts.update(frames=counters.frames_in, pad_frames=padding.frames, pad_height=padding.height,
                         pad_width=padding.width, time_factor=time_factor)
        return Applied(latent_chunk(output, facts, fmt), record, None if record.finished else stream)


class DecodeKind(SessionKind):
    name = "decode"

    def output_format(self, fmt: str | None) -> str:
        return fmt or "mp4"

    def inputs(self, counters: Counters) -> int:
        return counters.latents_in

    def steps(self, record: SessionRecord) -> int:
        return record.steps

    def check_steps(self, model: Tokenizer, steps: int) -> None:
        check_decode_steps(model, steps)

    def parse(self, body: Body, limits: Limits) -> torch.Tensor:
        return parse_latent_chunk(body)

    def model_input(self, chunk: torch.Tensor) -> torch.Tensor:
        return chunk.float()

    def open(self, model: Tokenizer, record: SessionRecord, position: int) -> Stream:
        if position:
            return StreamingDecoder.resume(model, record.model_hash, record.steps, record.seed, position)
        return StreamingDecoder(model, record.model_hash, steps=record.steps, seed=record.seed)

    def restore(self, model: Tokenizer, record: SessionRecord, state: bytes) -> Stream:
        return StreamingDecoder.from_state(model, record.model_hash, state)

    def check(self, record: SessionRecord, chunk: torch.Tensor, limits: Limits, time_factor: int) -> None:
        _, _, n, h, w = chunk.shape
        if time_factor * n > limits.max_frames + time_factor - 1:  # per chunk; a stream has no limit
            raise TooLarge(f"a chunk of {n} latent frames decodes to more than {limits.max_frames} frames; send "
                           "fewer per chunk", code="clip_too_large")
        height, width = record.height or h * SPACE_FACTOR, record.width or w * SPACE_FACTOR
        if height > h * SPACE_FACTOR or width > w * SPACE_FACTOR:
            raise InvalidInput(f"latents decode to {h * SPACE_FACTOR}x{w * SPACE_FACTOR}, smaller than the "
                               f"session's {height}x{width}", code="chunk_shape_mismatch")
        if record.latent_size is not None and (h, w) != record.latent_size:
            raise InvalidInput(f"chunk latents are {h}x{w} a frame, the session's are "
                               f"{record.latent_size[0]}x{record.latent_size[1]}")
        record.height, record.width, record.latent_size = height, width, (h, w)

    def finish(self, record: SessionRecord) -> ChunkResult | None:
        summary = {"id": record.id, "latents_in": record.counters.latents_in,
                   "frames_out": record.counters.frames_out, "height": record.height, "width": record.width}
        return ChunkResult(json.dumps(summary).encode(), "application/json", None)

    def job_shape(self, record: SessionRecord, chunk: torch.Tensor | None, time_factor: int) -> tuple[int, int, int]:
        """The frames a chunk decodes to past a stream's first (a decode finish runs no job)."""
        return time_factor * chunk.shape[2], SPACE_FACTOR * chunk.shape[3], SPACE_FACTOR * chunk.shape[4]

    def to_host(self, output: torch.Tensor) -> torch.Tensor:
        """uint8 (n,H,W,3) frames, quantised on the device: a quarter of the float bytes cross."""
        return quantise(output).cpu()

    def applied(self, record: SessionRecord, stream: Stream, chunk: torch.Tensor | None, output: torch.Tensor,
                fmt: str) -> Applied:
        counters = record.counters
        start = counters.frames_out
        made = output.shape[0]
        keep = made if record.frames is None else max(0, min(made, record.frames - start))
        record.next_seq += 1
        counters.latents_in += chunk.shape[2]
        counters.frames_out += keep
        if keep:
            frames = output[:keep, :record.height, :record.width].numpy()
            body, media_type = render_frames(frames, record.fps, fmt)
        else:
            body, media_type = b"", "application/octet-stream"
        facts = {"session": record.id, "frame_start": start, "frame_count": keep}
        return Applied(ChunkResult(body, media_type, facts), record, stream)


def latent_chunk(latents: torch.Tensor, facts: dict[str, Any], fmt: str) -> ChunkResult:
    """An encode chunk's latents as npy or safetensors (which carries the facts as metadata).
    The facts' keys are sorted, as the metadata's, so both read the same."""
    facts = dict(sorted(facts.items()))
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, latents.numpy(), allow_pickle=False)
        return ChunkResult(buffer.getvalue(), NPY, facts)
    meta = {CHUNK_METADATA_KEY: json.dumps(facts), "format": CHUNK_FORMAT}
    return ChunkResult(st_save({LATENTS_TENSOR: latents.contiguous()}, metadata=meta), SAFETENSORS, facts)


KINDS: dict[str, SessionKind] = {kind.name: kind for kind in (EncodeKind(), DecodeKind())}
