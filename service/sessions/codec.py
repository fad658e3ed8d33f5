"""Snapshot bytes as stored: a stream's exported state, compressed losslessly.

A feature cache is float32 tensors (safetensors, whose data starts 8-byte aligned). Their
high bytes (sign, exponent) repeat, their low bytes are noise: split into 4 byte planes and
compressed with zstd at its fastest level, the tiny model's caches shrink by a third
(decode) to a half (encode) (`packed_over_cache` in `benchmarks/results/session_moves.md`),
which pays for itself in the snapshot traffic the policy allows. The state must come back
bit for bit, so nothing lossy.
"""

from __future__ import annotations

import struct

import numpy as np
import zstandard

MAGIC = b"CDTSNAP1"
_HEADER = struct.Struct("<8sQ")  # magic, length of the state
_LEVEL = 1
_PLANES = 4  # bytes of a float32


class SnapshotFormatError(ValueError):
    """Bytes that are not a packed snapshot."""


def pack(state: bytes) -> bytes:
    """`state` byte-shuffled by float32 planes and zstd-compressed, behind a header."""
    usable = len(state) // _PLANES * _PLANES
    planes = np.frombuffer(state, np.uint8, count=usable).reshape(-1, _PLANES).T.tobytes()
    body = zstandard.ZstdCompressor(level=_LEVEL).compress(planes + state[usable:])
    return _HEADER.pack(MAGIC, len(state)) + body


def unpack(data: bytes) -> bytes:
    """The state `pack` was given."""
    if len(data) < _HEADER.size:
        raise SnapshotFormatError("snapshot shorter than its header")
    magic, length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotFormatError("not a packed snapshot")
    raw = zstandard.ZstdDecompressor().decompress(memoryview(data)[_HEADER.size:], max_output_size=length)
    if len(raw) != length:
        raise SnapshotFormatError(f"snapshot holds {len(raw)} bytes, its header says {length}")
    usable = length // _PLANES * _PLANES
    state = np.frombuffer(raw, np.uint8, count=usable).reshape(_PLANES, -1).T.tobytes()
    return state + raw[usable:]
