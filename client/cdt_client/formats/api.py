"""The HTTP API's own conventions: tensor media types, the headers of session chunks, the
error codes and the seed bounds."""

from __future__ import annotations

# Media types of the tensor bodies.
NPY = "application/x-npy"
SAFETENSORS = "application/x-safetensors"
METADATA_HEADER = "X-CDT-Metadata"  # a latents file's metadata as JSON, beside a bare npy body

# Session chunks. Every chunk answer carries its position as JSON in CHUNK_HEADER; an encode
# chunk's safetensors body carries the same under CHUNK_METADATA_KEY, with format CHUNK_FORMAT.
CHUNK_FORMAT = "cdt-latent-chunk"
CHUNK_METADATA_KEY = "cdt_chunk"
CHUNK_HEADER = "X-CDT-Chunk"
REPLAYED_HEADER = "X-CDT-Replayed"  # "1" on the stored answer of a seq applied before, sent again
REBUILD_HEADER = "X-CDT-Rebuild"  # why the replica rebuilt the session's stream for this chunk
EXPECTED_SEQ_HEADER = "X-CDT-Expected-Seq"  # on a 409 `seq_out_of_order`: the seq the session expects

# The largest decode seed. A query parameter is text the service parses exactly, so its
# bound is that of a signed 64-bit integer, the widest integer most clients' languages have.
# A JSON body (a session's spec) may be read by a parser that holds numbers as IEEE doubles
# (JavaScript's), which reads integers exactly only up to 2**53 - 1 (RFC 8259, section 6).
MAX_QUERY_SEED = 2**63 - 1
MAX_JSON_SEED = 2**53 - 1

# Every code an error answer `{"error": {"code": ..., "message": ...}}` may carry, by status.
ERROR_CODES: dict[int, tuple[str, ...]] = {
    400: ("bad_parameter", "empty_body"),
    401: ("missing_api_key",),
    403: ("invalid_api_key",),
    404: ("not_found", "session_not_found"),
    405: ("method_not_allowed",),
    409: ("conflict", "model_mismatch", "seq_out_of_order", "session_finished"),
    413: ("payload_too_large", "clip_too_large", "session_log_too_large"),
    415: ("unsupported_media_type",),
    422: ("invalid_input", "invalid_tensor", "invalid_latents", "undecodable_video", "video_too_small",
          "too_few_frames", "chunk_shape_mismatch", "empty_session"),
    429: ("overloaded", "too_many_sessions", "key_queue_full", "key_rate_limited"),
    503: ("unavailable", "not_ready", "shutting_down", "draining", "queue_timeout", "session_store_unavailable",
          "device_out_of_memory", "device_failed"),
    504: ("timeout", "compute_timeout"),
}
