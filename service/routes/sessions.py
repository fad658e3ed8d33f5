"""Streaming sessions: `/v1/sessions` create, push chunk `seq`, finish, inspect, delete.

Routes parse and validate, hand off to the session service (`service.sessions.service`),
and render its chunk results as responses: the body, and the chunk's facts as headers.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from cdt_client.formats.api import CHUNK_HEADER, EXPECTED_SEQ_HEADER, REBUILD_HEADER, REPLAYED_HEADER
from fastapi import APIRouter, Path, Query, Request, Response

from ..auth import AUTH_ERRORS
from ..bodies import MP4, NPY, OCTET_STREAM, SAFETENSORS, BodyFormat
from ..deps import MetricsDep, Owner, SessionsDep, UploadDep
from ..errors import error_responses
from ..sessions.protocol import ChunkResult, SessionInfo, SessionSpec
from .openapi import BINARY, MODEL_ERRORS, RETRY_AFTER, VIDEO_TYPES, binary_body, model_request_errors

router = APIRouter(prefix="/v1/sessions", tags=["streaming sessions"], responses=AUTH_ERRORS)

CHUNK_BODY = binary_body(
    "Encode sessions: frames as a video container (`video/*`), npy or safetensors, as for /v1/encode; any number "
    "of frames. Decode sessions: latents (1,16,m,h,w) as safetensors (tensor `latents`: a chunk returned by an "
    "encode session, or a whole latents file) or npy; any m >= 1.", (*VIDEO_TYPES, NPY, SAFETENSORS, OCTET_STREAM))
EXPECTED_SEQ = {EXPECTED_SEQ_HEADER: {"description": "`seq_out_of_order`: the seq the session expects",
                                       "schema": {"type": "integer"}}}
# What a client can do next with the session a response describes (OpenAPI links).
_ID, _NEXT_SEQ = "$response.body#/id", "$response.body#/next_seq"
SESSION_LINKS = {
    "get": {"operationId": "get_session", "parameters": {"session_id": _ID}},
    "push_next_chunk": {"operationId": "push_chunk", "parameters": {"session_id": _ID, "seq": _NEXT_SEQ}},
    "finish": {"operationId": "finish_session", "parameters": {"session_id": _ID}},
    "delete": {"operationId": "delete_session", "parameters": {"session_id": _ID}},
}
_SAME = {"session_id": "$request.path.session_id"}
CHUNK_LINKS = {"get": {"operationId": "get_session", "parameters": _SAME},
               "finish": {"operationId": "finish_session", "parameters": _SAME}}
# What every request on an existing session may meet.
SESSION_ERRORS = {
    400: "`bad_parameter`: a path or query parameter out of its bounds",
    404: "`session_not_found`: unknown, expired, deleted or another key's",
    409: "`model_mismatch`: the session belongs to another checkpoint or dtype",
    503: "`session_store_unavailable`, `not_ready`, `draining` (the replica is stopping: retry, another continues "
         "the session)",
}
CHUNK_FORMATS = tuple(BodyFormat)  # the session's kind is known only once its record is loaded
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


def _response(result: ChunkResult) -> Response:
    headers = {}
    if result.chunk is not None:
        headers[CHUNK_HEADER] = json.dumps(result.chunk)
    if result.replayed:
        headers[REPLAYED_HEADER] = "1"
    if result.rebuild is not None:
        headers[REBUILD_HEADER] = result.rebuild
    return Response(result.body, media_type=result.media_type, headers=headers)


@router.post("", summary="create a streaming session", status_code=201, response_model=SessionInfo,
             responses={201: {"description": "the session", "links": SESSION_LINKS}, **error_responses({
                 400: "`bad_parameter`: the JSON body does not fit its schema",
                 404: "`model_not_found`: `model` names no model served here (GET /v1/models)",
                 409: "`model_mismatch`: `dtype` is not the one this replica computes in",
                 429: "`too_many_sessions`: CDT_MAX_SESSIONS live sessions; `key_too_many_sessions`: this key holds "
                      "CDT_KEY_MAX_SESSIONS",
                 503: "`session_store_unavailable`, `not_ready`, `draining` (the replica is stopping: retry)"},
                 headers={429: RETRY_AFTER})})
async def create_session(spec: SessionSpec, owner: Owner, sessions: SessionsDep) -> SessionInfo:
    return await sessions.create(spec, owner)


@router.get("/{session_id}", summary="session state, progress, log and snapshot bytes, expiry",
            response_model=SessionInfo,
            responses={200: {"description": "the session", "links": SESSION_LINKS}, **error_responses(SESSION_ERRORS)})
async def get_session(session_id: SessionId, owner: Owner, sessions: SessionsDep) -> SessionInfo:
    return await sessions.get(session_id, owner)


@router.delete("/{session_id}", summary="delete a session and its state", status_code=204,
               responses=error_responses(SESSION_ERRORS))
async def delete_session(session_id: SessionId, owner: Owner, sessions: SessionsDep) -> Response:
    await sessions.delete(session_id, owner)
    return Response(status_code=204)


@router.post(
    "/{session_id}/chunks/{seq}",
    summary="push chunk `seq` (from 0) and get its output",
    response_class=Response,
    openapi_extra=CHUNK_BODY,
    responses={200: {"description": "encode: latents of the complete 4-frame groups so far (safetensors tensor "
                                    "`latents`, or npy); decode: frames (mp4, npy, safetensors)",
                     "content": {SAFETENSORS: BINARY, NPY: BINARY, MP4: BINARY}, "headers": CHUNK_HEADERS,
                     "links": CHUNK_LINKS},
               **model_request_errors({
                   **SESSION_ERRORS,
                   400: "`bad_parameter`: a path or query parameter out of its bounds (`format=mp4` on an encode "
                        "session); `empty_body`",
                   409: "`seq_out_of_order` (header X-CDT-Expected-Seq), `session_finished`, `model_mismatch`",
                   413: "`session_log_too_large` (CDT_MAX_SESSION_LOG_MB); " + MODEL_ERRORS[413],
                   422: "`chunk_shape_mismatch`, `undecodable_video`, `invalid_tensor`, `invalid_latents`, "
                        "`video_too_small`, `invalid_input`",
                   503: MODEL_ERRORS[503] + "; `session_store_unavailable`, `draining`"}, headers={409: EXPECTED_SEQ})},
)
async def push_chunk(
    request: Request,
    session_id: SessionId,
    seq: Annotated[int, Path(ge=0, le=2**31)],
    owner: Owner,
    sessions: SessionsDep,
    upload: UploadDep,
    metrics: MetricsDep,
    format: Annotated[Format | None, Query(description="output format (default: safetensors for encode, mp4 "
                                                       "for decode)")] = None,
) -> Response:
    body = await upload.spooled(CHUNK_FORMATS)
    try:
        result = await sessions.push(session_id, seq, owner, body, format)
    finally:
        body.close()
    metrics.bytes_total.labels(request.scope["route"].path, "out").inc(len(result.body))
    return _response(result)


@router.post("/{session_id}/finish", summary="flush what is buffered and close the session",
             response_class=Response,
             responses={200: {"description": "encode: latents of the flushed tail (its X-CDT-Chunk header adds "
                                             "what a whole latents file needs); decode: a JSON summary",
                              "content": {SAFETENSORS: BINARY, NPY: BINARY, "application/json": {}},
                              "headers": CHUNK_HEADERS},
                        **error_responses({
                            **SESSION_ERRORS,
                            400: "`bad_parameter`: a path or query parameter out of its bounds (`format=mp4` on "
                                 "an encode session)",
                            409: "`session_finished`, `model_mismatch`",
                            413: "`clip_too_large`: the flushed frames do not fit the memory budget",
                            422: "`empty_session`: an encode session that received no frames",
                            429: MODEL_ERRORS[429],
                            503: MODEL_ERRORS[503] + "; `session_store_unavailable`, `draining`",
                            504: MODEL_ERRORS[504]}, headers={429: RETRY_AFTER})})
async def finish_session(
    session_id: SessionId,
    owner: Owner,
    sessions: SessionsDep,
    format: Annotated[Format | None, Query(description="encode: latents format of the flushed tail")] = None,
) -> Response:
    sessions.check_capacity(owner)
    return _response(await sessions.finish(session_id, owner, format))
