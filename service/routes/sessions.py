"""Streaming sessions: `/v1/sessions` create, push chunk `seq`, finish, inspect, delete.

Routes parse and validate, then hand off to `service.sessions.Sessions`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from ..auth import require_api_key
from ..bodies import MP4, NPY, OCTET_STREAM, SAFETENSORS
from ..deps import get_metrics, get_settings, receive_body
from ..errors import Unavailable
from ..metrics import Metrics
from ..sessions import CHUNK_HEADER, CHUNK_KINDS, REBUILD_HEADER, REPLAYED_HEADER, Sessions, SessionInfo, \
    SessionSpec
from ..settings import Settings

router = APIRouter(prefix="/v1/sessions", tags=["streaming sessions"])

_BINARY = {"schema": {"type": "string", "format": "binary"}}
CHUNK_BODY = {"requestBody": {"required": True, "description":
    "Encode sessions: frames as a video container (`video/*`), npy or safetensors, as for /v1/encode; any number "
    "of frames. Decode sessions: latents (1,16,m,h,w) as safetensors (tensor `latents`: a chunk returned by an "
    "encode session, or a whole latents file) or npy; any m >= 1.",
    "content": {t: _BINARY for t in (MP4, "video/webm", NPY, SAFETENSORS, OCTET_STREAM)}}}
SessionId = Annotated[str, Path(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Format = Literal["safetensors", "npy", "mp4"]
_STRING = {"schema": {"type": "string"}}
CHUNK_HEADERS = {
    CHUNK_HEADER: {"description": "the chunk's position as JSON (encode: latent_start, latent_count, frames_in, "
                                  "...; decode: frame_start, frame_count)", **_STRING},
    REPLAYED_HEADER: {"description": "`1` when the answer is the stored one of an already applied seq", **_STRING},
    REBUILD_HEADER: {"description": "present when this replica rebuilt the session's stream from the store "
                                    "first: `missing` (never held here), `stale` (another replica advanced it) or "
                                    "`evicted` (over CDT_SESSION_HOT_MB)", **_STRING},
}


def get_sessions(request: Request) -> Sessions:
    sessions = getattr(request.app.state, "sessions", None)
    if sessions is None:
        raise Unavailable("the model is not loaded yet", code="not_ready")
    return sessions


def _response(result) -> Response:
    return Response(result.body, media_type=result.media_type, headers=result.headers)


@router.post("", summary="create a streaming session", status_code=201, response_model=SessionInfo,
             responses={429: {"description": "`too_many_sessions` (CDT_MAX_SESSIONS), see Retry-After"}})
async def create_session(spec: SessionSpec, owner: str = Depends(require_api_key),
                         sessions: Sessions = Depends(get_sessions)) -> SessionInfo:
    return await sessions.create(spec, owner)


@router.get("/{session_id}", summary="session state, progress, log and snapshot bytes, expiry",
            response_model=SessionInfo)
async def get_session(session_id: SessionId, owner: str = Depends(require_api_key),
                      sessions: Sessions = Depends(get_sessions)) -> SessionInfo:
    return await sessions.get(session_id, owner)


@router.delete("/{session_id}", summary="delete a session and its state", status_code=204)
async def delete_session(session_id: SessionId, owner: str = Depends(require_api_key),
                         sessions: Sessions = Depends(get_sessions)) -> Response:
    await sessions.delete(session_id, owner)
    return Response(status_code=204)


@router.post(
    "/{session_id}/chunks/{seq}",
    summary="push chunk `seq` (from 0) and get its output",
    response_class=Response,
    openapi_extra=CHUNK_BODY,
    responses={200: {"description": "encode: latents of the complete 4-frame groups so far (safetensors tensor "
                                    "`latents`, or npy); decode: frames (mp4, npy, safetensors)",
                     "content": {SAFETENSORS: _BINARY, NPY: _BINARY, MP4: _BINARY}, "headers": CHUNK_HEADERS},
               409: {"description": "`seq_out_of_order` (header X-CDT-Expected-Seq), `session_finished`, "
                                    "`model_mismatch`"},
               413: {"description": "`session_log_too_large` (CDT_MAX_SESSION_LOG_MB), body over the upload limit, "
                                    "`clip_too_large`"},
               404: {"description": "`session_not_found`: unknown, expired, deleted or another key's"},
               503: {"description": "`session_store_unavailable`"}},
)
async def push_chunk(
    request: Request,
    session_id: SessionId,
    seq: Annotated[int, Path(ge=0, le=2**31)],
    format: Annotated[Format | None, Query(description="output format (default: safetensors for encode, mp4 "
                                                       "for decode)")] = None,
    owner: str = Depends(require_api_key),
    sessions: Sessions = Depends(get_sessions),
    settings: Settings = Depends(get_settings),
    metrics: Metrics = Depends(get_metrics),
) -> Response:
    body = await receive_body(request, CHUNK_KINDS, settings, sessions.pool, metrics)
    try:
        result = await sessions.push(session_id, seq, owner, body, request.headers.get("content-type", OCTET_STREAM),
                                     format)
    finally:
        body.close()
    metrics.bytes_total.labels(request.scope["route"].path, "out").inc(len(result.body))
    return _response(result)


@router.post("/{session_id}/finish", summary="flush what is buffered and close the session",
             response_class=Response,
             responses={200: {"description": "encode: latents of the flushed tail (its X-CDT-Chunk header adds "
                                             "what a whole latents file needs); decode: a JSON summary",
                              "content": {SAFETENSORS: _BINARY, NPY: _BINARY, "application/json": {}},
                              "headers": CHUNK_HEADERS}})
async def finish_session(
    session_id: SessionId,
    format: Annotated[Format | None, Query(description="encode: latents format of the flushed tail")] = None,
    owner: str = Depends(require_api_key),
    sessions: Sessions = Depends(get_sessions),
) -> Response:
    sessions.pool.check_capacity()
    return _response(await sessions.finish(session_id, owner, format))
