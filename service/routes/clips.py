"""Whole-clip `/v1/encode` and `/v1/decode`.

Each route reads the body under the upload limit, decodes it in a thread (PyAV and
numpy block), runs the model job on the worker pool and encodes the response in a
thread.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response

from media import encode_video

from ..auth import require_api_key
from ..codecs import (
    METADATA_HEADER,
    MP4,
    NPY,
    OCTET_STREAM,
    SAFETENSORS,
    ClipOptions,
    Kind,
    Limits,
    decode_clip,
    decode_latents,
    encode_frames,
    encode_latents,
)
from ..deps import get_metrics, get_pool, get_settings, receive_body
from ..metrics import Metrics
from ..ops import decode_clip as decode_job
from ..ops import model_errors
from ..settings import Settings
from ..workers import WorkerPool

MAX_STEPS = 1000
MAX_SEED = 2**63 - 1

router = APIRouter(prefix="/v1", tags=["whole clips"], dependencies=[Depends(require_api_key)])

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_ERRORS = {status: {"description": f"`{{\"error\": {{\"code\": ..., \"message\": ...}}}}` ({what})"}
           for status, what in [(400, "bad parameter or empty body"), (401, "missing key"), (403, "bad key"),
                                (413, "body or clip too large"), (415, "unsupported media"),
                                (422, "undecodable or invalid content"), (429, "queue full; see Retry-After"),
                                (503, "not ready, shutting down or queue timeout"), (504, "compute timeout")]}
ENCODE_BODY = {"requestBody": {"required": True, "description":
    "A video container (mp4, webm, avi, ...; `video/*`), or frames as npy (`application/x-npy`) or safetensors "
    "(`application/x-safetensors`, tensor `frames`): uint8 (T,H,W,3) RGB or float (3,T,H,W) in [-1,1]. "
    "`application/octet-stream` is sniffed by magic bytes.",
    "content": {t: _BINARY for t in (MP4, "video/webm", "video/x-msvideo", NPY, SAFETENSORS, OCTET_STREAM)}}}
DECODE_BODY = {"requestBody": {"required": True, "description":
    "A latents file (safetensors with cdt-latents metadata) as returned by /v1/encode.",
    "content": {t: _BINARY for t in (SAFETENSORS, OCTET_STREAM)}}}


def _limits(settings: Settings) -> Limits:
    return Limits(settings.max_frames, settings.max_side)


@router.post(
    "/encode",
    summary="encode a whole clip to latents",
    response_class=Response,
    openapi_extra=ENCODE_BODY,
    responses={200: {"description": f"latents: safetensors with metadata, or npy with the metadata as JSON in "
                                    f"the {METADATA_HEADER} header", "content": {SAFETENSORS: _BINARY, NPY: _BINARY}},
               **_ERRORS},
)
async def encode(
    request: Request,
    frames: Annotated[int | None, Query(ge=1, description="use the first N frames (422 if fewer)")] = None,
    size: Annotated[int | None, Query(ge=1, description="resize so the short side is S")] = None,
    fps: Annotated[float | None, Query(gt=0, description="rate recorded for inputs that carry none (npy); "
                                                         "default 30")] = None,
    format: Annotated[Literal["safetensors", "npy"], Query(description="latents format")] = "safetensors",
    settings: Settings = Depends(get_settings),
    pool: WorkerPool = Depends(get_pool),
    metrics: Metrics = Depends(get_metrics),
) -> Response:
    body = await receive_body(request, (Kind.VIDEO, Kind.NPY, Kind.SAFETENSORS), settings, pool, metrics)
    with metrics.media(f"decode_{body.kind.value}"):
        clip = await asyncio.to_thread(decode_clip, body, ClipOptions(frames, size, fps), _limits(settings))
    del body
    with model_errors():
        item = await pool.run("encode", lambda model: encode_video(model, clip.video, clip.fps))
    metrics.frames_total.labels("encode").inc(item.frames)
    with metrics.media(f"encode_latents_{format}"):
        content, media_type, headers = await asyncio.to_thread(encode_latents, item, format)
    metrics.bytes_total.labels("/v1/encode", "out").inc(len(content))
    return Response(content, media_type=media_type, headers=headers)


@router.post(
    "/decode",
    summary="decode latents to a whole clip, cropped to the original size and length",
    response_class=Response,
    openapi_extra=DECODE_BODY,
    responses={200: {"description": "mp4 (h264), or uint8 (T,H,W,3) frames as npy or safetensors (tensor `frames`)",
                     "content": {MP4: _BINARY, NPY: _BINARY, SAFETENSORS: _BINARY}},
               409: {"description": "`model_mismatch`: latents made by another checkpoint"}, **_ERRORS},
)
async def decode(
    request: Request,
    steps: Annotated[int, Query(ge=1, le=MAX_STEPS, description="diffusion decoding steps")] = 1,
    seed: Annotated[int, Query(ge=0, le=MAX_SEED, description="decoding noise seed")] = 0,
    format: Annotated[Literal["mp4", "safetensors", "npy"], Query(description="output format")] = "mp4",
    settings: Settings = Depends(get_settings),
    pool: WorkerPool = Depends(get_pool),
    metrics: Metrics = Depends(get_metrics),
) -> Response:
    body = await receive_body(request, (Kind.SAFETENSORS,), settings, pool, metrics)
    with metrics.media("decode_latents"):
        item = await asyncio.to_thread(decode_latents, body, pool.model.content_hash(), _limits(settings))
    del body
    with model_errors():
        frames = await pool.run("decode", lambda model: decode_job(model, item, steps, seed))
    metrics.frames_total.labels("decode").inc(len(frames))
    with metrics.media(f"encode_frames_{format}"):
        content, media_type = await asyncio.to_thread(encode_frames, frames, item.fps, format)
    metrics.bytes_total.labels("/v1/decode", "out").inc(len(content))
    return Response(content, media_type=media_type)
