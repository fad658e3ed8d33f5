"""Whole-clip `/v1/encode` and `/v1/decode`, streamed through the model.

Each route spools the body to disk under the upload limit, checks its header against
the limits, is admitted to one device by the worker pool with the chunking and memory
planned there (`service.memory`), then runs the streaming encoder or decoder one chunk per
model job on that device. The host work around the model runs on the host pool and
overlaps with it: the upload's next chunk is decoded while the model encodes this one, and
a decoded chunk is rendered (mp4, npy, safetensors) while the model decodes the next. Frames
cross to and from the device as uint8. Memory follows the frame size, not the length.
Between chunks, a client that went away stops the work (`cdt_requests_cancelled`).

Errors found before the first byte is sent are JSON 4xx as usual: encode finishes its
compute before answering; decode computes its first chunk first. A failure after that
(a compute timeout) cuts the response short, which clients see: the tensor formats
carry an exact Content-Length, and mp4 is sent chunked without its final chunk.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import Annotated, AsyncIterator, Iterator, Literal

import torch

from cdt_client.formats.api import METADATA_HEADER
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from media import ClipDecoder, ClipEncoder, decode_chunk_length, latents_info

from ..auth import AUTH_ERRORS
from ..bodies import FRAME_FORMATS, MP4, NPY, OCTET_STREAM, SAFETENSORS, Body, BodyFormat, ClipOptions, open_frames, \
    open_latents
from ..deps import AskedModelDep, FpsQuery, FramesQuery, LimitsDep, MetricsDep, ModelDep, PoolDep, SeedQuery, \
    SettingsDep, SizeQuery, Owner, StepsQuery, UploadDep, require_api_key
from ..domain_errors import ClientGone
from ..errors import error_responses
from ..host import HostPool, settle
from ..metrics import Metrics
from ..ops import admit, check_decode_steps, check_steps
from ..responses import FrameStream, LatentSpool
from ..workers import Admission
from .openapi import BINARY, VIDEO_TYPES, binary_body, model_request_errors

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


async def _client_gone(request: Request, metrics: Metrics, op: str) -> bool:
    """Whether the client disconnected (counted): its request stops at this chunk boundary."""
    if await request.is_disconnected():
        metrics.cancelled_total.labels(op).inc()
        return True
    return False


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
    upload: UploadDep,
    owner: Owner,
    limits: LimitsDep,
    pool: PoolDep,
    metrics: MetricsDep,
    served: ModelDep,
    frames: FramesQuery = None,
    size: SizeQuery = None,
    fps: FpsQuery = None,
    format: Annotated[Literal["safetensors", "npy"], Query(description="latents format")] = "safetensors",
) -> StreamingResponse:
    body = await upload.spooled(FRAME_FORMATS)
    spool = LatentSpool()
    host = pool.host
    try:
        source = await host.run(f"open_{body.format.value}", open_frames, body, ClipOptions(frames, size, fps), limits)
        chunk, admission = await admit(pool, served, owner, "encode", source.height, source.width)
        try:
            encoder = ClipEncoder(admission.model, served.content_hash)
            # Container decoding of chunk i+1 on the host pool overlaps the model's work on chunk i.
            async with aclosing(host.iterate(f"read_{body.format.value}", source.chunks(chunk))) as parts:
                async for part in parts:
                    latents = await admission.execute("encode", encoder.step(part))
                    await host.run("spool_latents", spool.append, latents)
                    if await _client_gone(request, metrics, "encode"):
                        raise ClientGone("the client disconnected during the encode")
            tail = await admission.execute("encode", lambda model: encoder.finish())
            await host.run("spool_latents", spool.append, tail)
        finally:
            admission.release()
    except BaseException:
        spool.close()
        raise
    finally:
        body.close()
    metrics.frames_total.labels("encode", served.name).inc(source.count)
    info = latents_info(served.reference, served.content_hash, source.count, source.height, source.width, source.fps,
                        served.name)
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
               **error_responses({409: "`model_mismatch`: latents made by another model than `model`, or, without "
                                       "`model`, by none served here"})},
)
async def decode(
    request: Request,
    upload: UploadDep,
    owner: Owner,
    limits: LimitsDep,
    settings: SettingsDep,
    pool: PoolDep,
    metrics: MetricsDep,
    asked: AskedModelDep,
    steps: StepsQuery = 1,
    seed: SeedQuery = 0,
    format: Annotated[Literal["mp4", "safetensors", "npy"], Query(description="output format")] = "mp4",
) -> StreamingResponse:
    check_steps(steps, settings)
    body = await upload.spooled((BodyFormat.SAFETENSORS,))
    host = pool.host
    admission: Admission | None = None
    stream: AsyncIterator[bytes] | None = None
    try:
        source, served = await host.run("open_latents", open_latents, body, pool.models, asked, limits)
        info = source.info
        chunk, admission = await admit(pool, served, owner, "decode", info.height, info.width, steps)
        check_decode_steps(served.reference, steps)
        output = FrameStream(format, info.frames, info.height, info.width, info.fps)
        decoder = ClipDecoder(admission.model, served.content_hash, info, steps, seed)
        latents = source.chunks(decode_chunk_length(served.reference, chunk))
        stream = _decode_stream(output, host, admission, decoder, latents)
        first = await anext(stream)  # errors of the first chunk are still a JSON 4xx
    except BaseException:
        if stream is not None:
            await stream.aclose()
        body.close()
        if admission is not None:
            admission.release()
        raise
    headers = {} if output.content_length is None else {"Content-Length": str(output.content_length)}
    return StreamingResponse(_decoded(request, first, stream, body, admission, info.frames, metrics, served.name),
                             media_type=output.media_type, headers=headers)


async def _decode_stream(output: FrameStream, host: HostPool, admission: Admission, decoder: ClipDecoder,
                         latents: Iterator[torch.Tensor]) -> AsyncIterator[bytes]:
    """The response bytes, chunk by chunk: while the model decodes chunk i+1, the host pool
    renders chunk i and reads chunk i+2's latents. The first chunk goes out as soon as it is
    rendered (its errors are still a JSON answer, and the client sees bytes early)."""
    op = f"render_{output.fmt}"
    header = output.header()
    rendering: asyncio.Future | None = None
    try:
        async with aclosing(host.iterate("read_latents", latents)) as parts:
            async for part in parts:
                frames = await admission.execute("decode", decoder.step(part))
                if header:
                    yield header + await host.run(op, output.write, frames)
                    header = b""
                    continue
                if rendering is not None:
                    yield await rendering
                rendering = asyncio.ensure_future(host.run(op, output.write, frames))
        if rendering is not None:
            yield await rendering
        yield header + await host.run(op, output.close)
    finally:
        if rendering is not None:
            await settle(rendering)


async def _decoded(request: Request, first: bytes, stream: AsyncIterator[bytes], body: Body, admission: Admission,
                   frames: int, metrics: Metrics, model: str) -> AsyncIterator[bytes]:
    sent = len(first)
    try:
        yield first
        async for part in stream:
            sent += len(part)
            yield part
            if await _client_gone(request, metrics, "decode"):
                return
        metrics.frames_total.labels("decode", model).inc(frames)
    except (asyncio.CancelledError, GeneratorExit):
        metrics.cancelled_total.labels("decode").inc()  # the server noticed the disconnect first
        raise
    finally:
        metrics.bytes_total.labels("/v1/decode", "out").inc(sent)
        await stream.aclose()  # its host work ends before the body it reads is closed
        admission.release()
        body.close()
