"""Whole-clip `/v1/encode` and `/v1/decode`, streamed through the model.

Each route spools the body to disk under the upload limit, checks its header against
the limits, plans the request's chunking and memory (`service.memory`), is admitted by
the worker pool, then runs the streaming encoder or decoder one chunk per pool job:
frames are decoded from the upload as the encoder consumes them, and decoded frames are
rendered and sent as they are made. Memory follows the frame size, not the length.
Between chunks, a client that went away stops the work (`cdt_requests_cancelled`).

Errors found before the first byte is sent are JSON 4xx as usual: encode finishes its
compute before answering; decode computes its first chunk first. A failure after that
(a compute timeout) cuts the response short, which clients see: the tensor formats
carry an exact Content-Length, and mp4 is sent chunked without its final chunk.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, AsyncIterator, Iterator, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from media import decode_chunks, encode_chunks, latents_info, tensor_to_frames
from media.video import MAX_FPS
from model import NUM_TIMESTEPS

from ..auth import AUTH_ERRORS, require_api_key
from ..bodies import FRAME_FORMATS, MP4, NPY, OCTET_STREAM, SAFETENSORS, Body, BodyFormat, ClipOptions, Limits, \
    open_frames, open_latents
from ..deps import get_metrics, get_pool, get_settings, receive_body
from ..domain_errors import ClientGone
from ..errors import error_responses
from ..memory import cost_for, plan
from ..metrics import Metrics
from ..ops import check_steps, model_errors
from ..responses import FrameStream, LatentSpool
from ..settings import Settings
from ..wire import MAX_QUERY_SEED, METADATA_HEADER
from ..workers import Admission, WorkerPool
from .openapi import BINARY, binary_body, model_request_errors

MAX_SIZE = 2**16  # a resize target past any CDT_MAX_SIDE: keeps the size arithmetic finite

VIDEO_TYPES = (MP4, "video/webm", "video/x-msvideo")  # any video/* is accepted; these are listed

router = APIRouter(prefix="/v1", tags=["whole clips"], dependencies=[Depends(require_api_key)],
                   responses={**AUTH_ERRORS, **model_request_errors({
                       400: "`bad_parameter`: a query parameter out of its bounds; `empty_body`",
                       422: "`undecodable_video`, `invalid_tensor`, `invalid_latents`, `video_too_small` (a side "
                            "under 8 pixels), `too_few_frames`, `invalid_input`: content the model cannot take"})})

ENCODE_BODY = binary_body(
    "A video container (mp4, webm, avi, ...; `video/*`), or frames as npy (`application/x-npy`) or safetensors "
    "(`application/x-safetensors`, tensor `frames`): uint8 (T,H,W,3) RGB or float (3,T,H,W) in [-1,1]. "
    "`application/octet-stream` is sniffed by magic bytes.", (*VIDEO_TYPES, NPY, SAFETENSORS, OCTET_STREAM))
DECODE_BODY = binary_body("A latents file (safetensors with cdt-latents metadata) as returned by /v1/encode.",
                          (SAFETENSORS, OCTET_STREAM))


def _limits(settings: Settings) -> Limits:
    return Limits(settings.max_frames, settings.max_side)


async def _client_gone(request: Request, metrics: Metrics, op: str) -> bool:
    """Whether the client disconnected (counted): its request stops at this chunk boundary."""
    if await request.is_disconnected():
        metrics.cancelled_total.labels(op).inc()
        return True
    return False


async def admit(pool: WorkerPool, op: str, height: int, width: int, steps: int = 1):
    """The request's chunk length, once admitted with its memory reserved."""
    model = pool.model
    chunking = plan(cost_for(model.config.preset, op), pool.memory.total, height, width, steps)
    return chunking.chunk_frames, await pool.admit(chunking.bytes)


@router.post(
    "/encode",
    summary="encode a whole clip to latents",
    response_class=StreamingResponse,
    openapi_extra=ENCODE_BODY,
    responses={200: {"description": "latents: safetensors with metadata, or npy with the metadata as JSON in "
                                    "a header", "content": {SAFETENSORS: BINARY, NPY: BINARY},
                     "headers": {METADATA_HEADER: {"description": "npy: the latents file's metadata as JSON",
                                                   "schema": {"type": "string"}}}}},
)
async def encode(
    request: Request,
    frames: Annotated[int | None, Query(ge=1, description="use the first N frames (422 if fewer)")] = None,
    size: Annotated[int | None, Query(ge=1, le=MAX_SIZE, description="resize so the short side is S")] = None,
    fps: Annotated[float | None, Query(gt=0, le=MAX_FPS, description="rate recorded for inputs that carry none "
                                                                      "(npy); default 30")] = None,
    format: Annotated[Literal["safetensors", "npy"], Query(description="latents format")] = "safetensors",
    settings: Settings = Depends(get_settings),
    pool: WorkerPool = Depends(get_pool),
    metrics: Metrics = Depends(get_metrics),
) -> StreamingResponse:
    body = await receive_body(request, FRAME_FORMATS, settings, pool, metrics)
    spool = LatentSpool()
    try:
        with metrics.media(f"open_{body.format.value}"):
            source = await asyncio.to_thread(open_frames, body, ClipOptions(frames, size, fps), _limits(settings))
        chunk, admission = await admit(pool, "encode", source.height, source.width)
        try:
            with model_errors():
                async for latents in pool.stream("encode", encode_chunks(pool.model, source.chunks(chunk))):
                    spool.append(latents)
                    if await _client_gone(request, metrics, "encode"):
                        raise ClientGone("the client disconnected during the encode")
        finally:
            admission.release()
    except BaseException:
        spool.close()
        raise
    finally:
        body.close()
    metrics.frames_total.labels("encode").inc(source.count)
    info = latents_info(pool.model, source.count, source.height, source.width, source.fps)
    header, data, media_type, headers = spool.body(info, format)
    length = spool.nbytes(header)
    metrics.bytes_total.labels("/v1/encode", "out").inc(length)
    return StreamingResponse(_send(header, data, spool.close), media_type=media_type,
                             headers={**headers, "Content-Length": str(length)})


async def _send(header: bytes, data: Iterator[bytes], close) -> AsyncIterator[bytes]:
    try:
        yield header
        for part in data:
            yield part
    finally:
        close()


@router.post(
    "/decode",
    summary="decode latents to a whole clip, cropped to the original size and length",
    response_class=StreamingResponse,
    openapi_extra=DECODE_BODY,
    responses={200: {"description": "mp4 (h264, fragmented), or uint8 (T,H,W,3) frames as npy or safetensors "
                                    "(tensor `frames`), streamed as decoded",
                     "content": {MP4: BINARY, NPY: BINARY, SAFETENSORS: BINARY}},
               **error_responses({409: "`model_mismatch`: latents made by another checkpoint"})},
)
async def decode(
    request: Request,
    steps: Annotated[int, Query(ge=1, le=NUM_TIMESTEPS,
                                description="diffusion decoding steps, at most CDT_MAX_STEPS")] = 1,
    seed: Annotated[int, Query(ge=0, le=MAX_QUERY_SEED, description="decoding noise seed")] = 0,
    format: Annotated[Literal["mp4", "safetensors", "npy"], Query(description="output format")] = "mp4",
    settings: Settings = Depends(get_settings),
    pool: WorkerPool = Depends(get_pool),
    metrics: Metrics = Depends(get_metrics),
) -> StreamingResponse:
    check_steps(steps, settings)
    body = await receive_body(request, (BodyFormat.SAFETENSORS,), settings, pool, metrics)
    admission: Admission | None = None
    try:
        with metrics.media("open_latents"):
            source = await asyncio.to_thread(open_latents, body, pool.model.content_hash(), _limits(settings))
        info = source.info
        chunk, admission = await admit(pool, "decode", info.height, info.width, steps)
        output = FrameStream(format, info.frames, info.height, info.width, info.fps)
        parts = _rendered(output, decode_chunks(pool.model, info, source.chunks(chunk // 4), steps, seed))
        stream = pool.stream("decode", parts)
        with model_errors():
            first = await anext(stream)  # errors of the first chunk are still a JSON 4xx
    except BaseException:
        body.close()
        if admission is not None:
            admission.release()
        raise
    headers = {} if output.content_length is None else {"Content-Length": str(output.content_length)}
    return StreamingResponse(_decoded(request, first, stream, body, admission, info.frames, metrics),
                             media_type=output.media_type, headers=headers)


def _rendered(output: FrameStream, videos: Iterator) -> Iterator[bytes]:
    """The response bytes of each decoded chunk (the header goes out with the first)."""
    pending = output.header()
    for video in videos:
        yield pending + output.write(tensor_to_frames(video))
        pending = b""
    yield pending + output.close()


async def _decoded(request: Request, first: bytes, stream: AsyncIterator[bytes], body: Body, admission: Admission,
                   frames: int, metrics: Metrics) -> AsyncIterator[bytes]:
    sent = len(first)
    try:
        yield first
        async for part in stream:
            sent += len(part)
            yield part
            if await _client_gone(request, metrics, "decode"):
                return
        metrics.frames_total.labels("decode").inc(frames)
    except (asyncio.CancelledError, GeneratorExit):
        metrics.cancelled_total.labels("decode").inc()  # the server noticed the disconnect first
        raise
    finally:
        metrics.bytes_total.labels("/v1/decode", "out").inc(sent)
        admission.release()
        body.close()
