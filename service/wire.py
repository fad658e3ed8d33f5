"""The wire format beyond JSON bodies: header names, the tag of a session's latent chunks,
and the largest seed each kind of parameter carries. Torch-free: clients may read it."""

from __future__ import annotations

CHUNK_FORMAT = "cdt-latent-chunk"  # `format` of an encode session's chunk (its metadata and X-CDT-Chunk)
CHUNK_HEADER = "X-CDT-Chunk"  # chunk metadata as JSON, on every chunk response
REPLAYED_HEADER = "X-CDT-Replayed"  # `1` on the stored answer of an already applied seq
REBUILD_HEADER = "X-CDT-Rebuild"  # why this replica rebuilt the stream for this chunk
EXPECTED_SEQ_HEADER = "X-CDT-Expected-Seq"  # on 409 seq_out_of_order: the seq the session expects
METADATA_HEADER = "X-CDT-Metadata"  # latents metadata as JSON when the body is bare npy

# The two bounds differ because of how a seed travels. In a JSON body (POST /v1/sessions) it
# stops at 2**53 - 1, the largest integer every JSON parser reads exactly (RFC 8259, section
# 6). A query parameter (/v1/decode, /v1/diffusers/decode) is text, so it takes any
# non-negative int64, all of which the model's noise mixes in (64 bits of seed).
MAX_JSON_SEED = 2**53 - 1
MAX_QUERY_SEED = 2**63 - 1
