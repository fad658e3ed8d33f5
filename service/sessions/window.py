"""Positions in a session's input log: where a stream rebuilt from an entry resumes, what a
stream's state has consumed, and which entries a replay needs (the log's window).

Positions count inputs: pixel frames for an encode session, latent frames for a decode one.
"""

from __future__ import annotations

from model import TIME_FACTOR

from .record import LogEntry


def resume_position(kind: str, start: int) -> int:
    """Where a stream rebuilt from a log entry starting at input `start` resumes: encode streams
    resume on a group boundary (1+4k), the first at or after `start`."""
    if kind == "decode" or start == 0:
        return start
    return 1 + TIME_FACTOR * -(-(start - 1) // TIME_FACTOR)


def settled_inputs(kind: str, end: int) -> int:
    """Inputs that the stream's state has consumed after `end` inputs: an encoder keeps the
    frames past the last group boundary pending, not yet in its state."""
    if kind == "decode" or end == 0:
        return end
    return 1 + TIME_FACTOR * ((end - 1) // TIME_FACTOR)


def window(kind: str, entries: list[LogEntry], end: int, field: int) -> int:
    """Index of the first entry to keep: the latest one from which a replay reaches `end` with
    at least `field` inputs replayed (a log starting at 0 always rebuilds exactly)."""
    keep = 0
    for i, entry in enumerate(entries):
        position = resume_position(kind, entry.start)
        if position == 0 or settled_inputs(kind, end) - position >= field:
            keep = i
    return keep
