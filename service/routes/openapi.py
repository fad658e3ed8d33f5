"""OpenAPI fragments the routes share: binary bodies, the video types listed, and the errors of
model requests."""

from __future__ import annotations

from ..bodies import MP4
from ..errors import error_responses

BINARY = {"schema": {"type": "string", "format": "binary"}}
VIDEO_TYPES = (MP4, "video/webm", "video/x-msvideo")  # any video/* is accepted; these are listed
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "required": True,
                               "schema": {"type": "integer"}}}

# The errors of every request that runs the model (whole clips and session chunks).
MODEL_ERRORS = {
    404: "`model_not_found`: `model=` names no model served here (GET /v1/models)",
    413: "`payload_too_large`: the body is over CDT_MAX_UPLOAD_MB; `clip_too_large`: over CDT_MAX_FRAMES or "
         "CDT_MAX_SIDE, or no chunk fits the memory budget (then `details`: estimate_bytes, budget_bytes, "
         "max_pixels, max_square_side)",
    415: "`unsupported_media_type`: a content type not listed here, an image, or magic bytes that contradict it",
    429: "`overloaded`: the job queue is full on every device; `key_queue_full`, `key_rate_limited`: this key is over "
         "its own queue (CDT_KEY_QUEUE_SIZE) or rate (CDT_KEY_RATE) while other keys are served",
    503: "`not_ready`, `shutting_down`, `queue_timeout` (no model slot or memory within CDT_REQUEST_TIMEOUT_S), "
         "`device_out_of_memory` (with Retry-After), `device_failed`",
    504: "`compute_timeout`: a model job ran over CDT_REQUEST_TIMEOUT_S",
}


def model_request_errors(described: dict[int, str], headers: dict[int, dict] | None = None) -> dict[int, dict]:
    """`responses` of a model request: MODEL_ERRORS, and the route's own statuses and headers."""
    return error_responses({**MODEL_ERRORS, **described}, headers={429: RETRY_AFTER, **(headers or {})})


def binary_body(description: str, media_types: tuple[str, ...]) -> dict:
    """`openapi_extra` of a route whose body is a file of one of `media_types`."""
    return {"requestBody": {"required": True, "description": description,
                            "content": {media_type: BINARY for media_type in media_types}}}
