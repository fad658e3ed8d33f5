"""`POST /v1/frames`: the frames `/v1/encode` would encode from the same body and options,
as uint8 safetensors, npy or mp4. No model job.

It gives a reconstruction its exact reference (the frames after the service's own
container decoding, `frames=` cut and `size=` resize, which a browser or another decoder
would not reproduce bit for bit), and renders frames (such as `/v1/decode`'s tensor
output) as a playable mp4. The web page uses it for both.

The output is assembled in memory, so it is bounded by the upload limit: anything larger
could not be sent back to the service anyway.

`model=` is checked as on /v1/encode (404 `model_not_found`), so a client can send the same
options to both; the frames do not depend on the model (padding to its grid happens inside
the encode).
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Response

from media import tensor_to_frames

from ..auth import AUTH_ERRORS
from ..bodies import FRAME_FORMATS, MP4, NPY, OCTET_STREAM, SAFETENSORS, Body, ClipOptions, Limits, open_frames
from ..deps import FpsQuery, FramesQuery, LimitsDep, MetricsDep, PoolDep, SettingsDep, SizeQuery, \
    UploadDep, get_model, require_api_key
from ..domain_errors import InvalidInput, TooLarge
from ..errors import error_responses
from ..responses import render_frames
from .openapi import BINARY, MODEL_ERRORS, RETRY_AFTER, VIDEO_TYPES, binary_body

CHUNK_FRAMES = 8  # frames decoded at a time while the output is assembled

router = APIRouter(prefix="/v1", tags=["whole clips"], dependencies=[Depends(require_api_key)],
                   responses=AUTH_ERRORS)

FRAMES_BODY = binary_body("As for /v1/encode: a video container (`video/*`), or frames as npy or safetensors "
                          "(tensor `frames`).", (*VIDEO_TYPES, NPY, SAFETENSORS, OCTET_STREAM))


@router.post(
    "/frames",
    summary="the frames /v1/encode would encode from this body and these options, as uint8",
    response_class=Response,
    dependencies=[Depends(get_model)],
    openapi_extra=FRAMES_BODY,
    responses={200: {"description": "uint8 (T,H,W,3) frames: safetensors (tensor `frames`, metadata `fps`), npy, "
                                    "or mp4 (h264, fragmented)",
                     "content": {SAFETENSORS: BINARY, NPY: BINARY, MP4: BINARY}},
               **error_responses({
                   400: "`bad_parameter`: a query parameter out of its bounds; `empty_body`",
                   404: MODEL_ERRORS[404],
                   413: "`payload_too_large`: the body is over CDT_MAX_UPLOAD_MB; `clip_too_large`: over "
                        "CDT_MAX_FRAMES or CDT_MAX_SIDE, or frames over the upload limit",
                   415: MODEL_ERRORS[415],
                   422: "`undecodable_video`, `invalid_tensor`, `video_too_small`, `too_few_frames`",
                   429: "`overloaded`, `key_queue_full`, `key_rate_limited`: the job queue or this key's own "
                        "limits are full (checked before the body is read)",
                   503: "`not_ready`, `shutting_down`"}, headers={429: RETRY_AFTER})},
)
async def frames(
    upload: UploadDep,
    limits: LimitsDep,
    settings: SettingsDep,
    pool: PoolDep,
    metrics: MetricsDep,
    frames: FramesQuery = None,
    size: SizeQuery = None,
    fps: FpsQuery = None,
    format: Annotated[Literal["safetensors", "npy", "mp4"], Query(description="output format")] = "safetensors",
) -> Response:
    body = await upload.spooled(FRAME_FORMATS)
    try:
        data, media_type = await pool.host.run(f"frames_{body.format.value}", _render, body,
                                               ClipOptions(frames, size, fps), limits, settings.max_upload_bytes,
                                               format)
    finally:
        body.close()
    metrics.bytes_total.labels("/v1/frames", "out").inc(len(data))
    return Response(data, media_type=media_type)


def _render(body: Body, options: ClipOptions, limits: Limits, max_bytes: int, fmt: str) -> tuple[bytes, str]:
    source = open_frames(body, options, limits)
    parts, nbytes = [], 0
    for chunk in source.chunks(CHUNK_FRAMES):
        # uint8 bodies give their frames as they are; float ones are quantised as decoded frames are.
        parts.append(chunk if isinstance(chunk, np.ndarray) else tensor_to_frames(chunk))
        nbytes += parts[-1].nbytes
        if nbytes > max_bytes:
            raise TooLarge(f"the frames come to more than {max_bytes} bytes, the upload limit "
                           "(CDT_MAX_UPLOAD_MB); ask for fewer (frames=) or smaller (size=) frames",
                           code="clip_too_large")
    if not parts:
        raise InvalidInput("the video has no frames", code="undecodable_video")
    return render_frames(np.concatenate(parts), source.fps, fmt)
