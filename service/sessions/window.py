"""The input log's window: which logged chunks a replay needs to rebuild a session's stream.

Positions count inputs: pixel frames for an encode session, latent frames for a decode one;
where a rebuilt stream resumes and what a stream's state has consumed are the model's
streaming unit's (`resume_position`, `settled_inputs`).
"""

from __future__ import annotations

from model import resume_position, settled_inputs

from .record import LogEntry


def window(kind: str, entries: list[LogEntry], end: int, field: int, time_factor: int) -> int:
    """Index of the first entry to keep: the latest one from which a replay reaches `end` with
    at least `field` inputs replayed (a log starting at 0 always rebuilds exactly), for a model
    of `time_factor`."""
    keep = 0
    for i, entry in enumerate(entries):
        position = resume_position(kind, entry.start, time_factor)
        if position == 0 or settled_inputs(kind, end, time_factor) - position >= field:
            keep = i
    return keep
