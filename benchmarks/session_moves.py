"""Sessions moving between replicas under the default settings (the snapshot policy, the
drain on SIGTERM, snapshots in a directory the replicas share:
`CDT_SESSION_SNAPSHOT_STORE=file://...`), measured through real `cdt serve` replicas sharing
a real Redis, the tiny checkpoint, 4-frame chunks, per kind (encode, decode) and frame size,
each session on a freshly started replica beside a long-lived one:

- kill: the session runs on its replica until the policy's second snapshot starts, K chunks
  after its first (K read from the chunks between them); the replica is SIGKILLed while that
  snapshot is written; the next chunk on the other replica replays the K chunks after the
  first: the policy's worst case. Its stall (the rebuild) as a multiple of one chunk's
  compute, that of the session's next chunks on the same replica (the CPU is shared: a
  chunk measured elsewhere or earlier ran under other load); the snapshot's bytes over the K chunks' own (body plus response); the session's
  storage: its snapshot, and its Redis keys against the input window they must hold;
- drain: a few chunks, then SIGTERM; the next chunk on the other replica rebuilds from the
  snapshot the drain wrote: its stall as a multiple of one chunk's compute.

    .venv/bin/python -m benchmarks.session_moves [--sizes 256 512]
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import redis

from benchmarks import report
from benchmarks.session_cost import CHUNK_FRAMES, REDIS_URL, TINY, chunk_body, push, session_memory
from tests.servers import Server, metric_sum

# The code these figures describe (`python -m benchmarks.run_all --stale`).
MEASURES = ["model/", "media/", "service/", "benchmarks/session_moves.py", "benchmarks/session_cost.py"]

DRAIN_CHUNKS = 3  # chunks before a drain (the policy's first snapshot comes later)
REFERENCE_CHUNKS = 2  # hot chunks after a rebuild, whose compute a stall is measured against
TARGETS = {"drain_stall": 2.0, "kill_stall": 10.0, "snapshot_traffic": 10.0, "redis_over_window": 2.0}


def window_bytes(checkpoint: Path, kind: str, body: bytes) -> int:
    """The input log's most: the receptive field, in chunks of `body`'s size (steps 1)."""
    field = json.loads((checkpoint / "receptive_field.json").read_text())
    if kind == "encode":
        return field["encode"] // CHUNK_FRAMES * len(body)
    return (field["decode_base"] + field["decode_per_step"]) * len(body)


def computed_s(before: str, after: str, kind: str) -> float:
    """Mean compute of the session chunks between two /metrics texts."""
    op = f"session_{kind}"
    return ((metric_sum(after, "cdt_compute_seconds_sum", op=op) - metric_sum(before, "cdt_compute_seconds_sum", op=op))
            / (metric_sum(after, "cdt_compute_seconds_count", op=op)
               - metric_sum(before, "cdt_compute_seconds_count", op=op)))


def rebuilt(other: Server, http: httpx.Client, kind: str, sid: str, seq: int, body: bytes
            ) -> tuple[float, float, str, float]:
    """The next chunk on `other`: its rebuild seconds, chunks replayed after a snapshot, source;
    then the compute of the session's chunks after it there (hot), which the stall is measured
    against: on the same replica, at nearly the same time, as the CPU is shared."""
    before = other.metrics()
    response = push(http, other, sid, seq, body)
    after = other.metrics()
    for more in range(1, 1 + REFERENCE_CHUNKS):
        push(http, other, sid, seq + more, body)
    chunk_s = computed_s(after, other.metrics(), kind)
    seconds = (metric_sum(after, "cdt_session_rebuild_seconds_sum")
               - metric_sum(before, "cdt_session_rebuild_seconds_sum"))
    age = (metric_sum(after, "cdt_session_snapshot_age_chunks_sum")
           - metric_sum(before, "cdt_session_snapshot_age_chunks_sum"))
    source = next((s for s in ("snapshot", "window", "start")
                   if metric_sum(after, "cdt_session_rebuilds_total", source=s)
                   > metric_sum(before, "cdt_session_rebuilds_total", source=s)), "none")
    assert response.headers.get("x-cdt-rebuild") == "missing", response.headers
    return seconds, age, source, chunk_s


def killed_mid_session(start: callable, other: Server, prefix: str, kind: str, size: int, r: redis.Redis) -> dict:
    """The policy's worst case: SIGKILL as its second snapshot starts, K chunks after the first."""
    rng = np.random.default_rng(0)
    body = chunk_body(kind, size, size, rng)
    started = "cdt_session_snapshot_interval_chunks_count"
    with start() as hot, httpx.Client(timeout=3600) as http:
        sid = http.post(hot.url + "/v1/sessions", json={"kind": kind}).json()["id"]
        push(http, hot, sid, 0, body)  # the first chunk starts the stream: not steady state
        before, payload, seq, first_at = hot.metrics(), 0, 1, None
        while True:
            payload += len(body) + len(push(http, hot, sid, seq, body).content)
            seq += 1
            now = hot.metrics()
            if metric_sum(now, started) == 1 and first_at is None:
                first_at = seq  # chunks from here to the second snapshot: K
            if metric_sum(now, started) == 2:  # being written: the worst moment to lose the replica
                hot.process.send_signal(signal.SIGKILL)
                break
        hot.process.wait(30)
        chunks = seq - 1
        chunk_s = computed_s(before, now, kind)
        interval = seq - first_at
        snapshot_bytes = metric_sum(now, "cdt_session_snapshot_bytes_sum")  # the first one, written
        cache_mb = metric_sum(now, "cdt_session_hot_bytes") / 2**20
        latest = http.get(f"{other.url}/v1/sessions/{sid}").json()["snapshot_seq"]
        memory = session_memory(r, prefix, sid)
        seconds, age, source, other_chunk_s = rebuilt(other, http, kind, sid, seq, body)
        http.delete(f"{other.url}/v1/sessions/{sid}")
    return {"kind": kind, "size": f"{size}x{size}", "chunk_compute_s": chunk_s, "K": interval,
            "cache_mb": cache_mb, "snapshot_mb": snapshot_bytes / 2**20,
            "packed_over_cache": snapshot_bytes / 2**20 / cache_mb,
            "snapshot_traffic": snapshot_bytes / (interval * payload / chunks),
            "redis_session_mb": memory / 2**20, "redis_over_window": memory / window_bytes(TINY, kind, body),
            "latest_snapshot": latest, "kill_replayed": age, "kill_source": source, "kill_stall_s": seconds,
            "kill_chunk_s": other_chunk_s, "kill_stall": seconds / other_chunk_s}


def drained(start: callable, other: Server, kind: str, size: int) -> dict:
    """SIGTERM after a few chunks; the next chunk rebuilds from the drain's snapshot."""
    rng = np.random.default_rng(1)
    body = chunk_body(kind, size, size, rng)
    with start() as hot, httpx.Client(timeout=3600) as http:
        sid = http.post(hot.url + "/v1/sessions", json={"kind": kind}).json()["id"]
        for seq in range(DRAIN_CHUNKS):
            push(http, hot, sid, seq, body)
        started = time.perf_counter()
        hot.process.send_signal(signal.SIGTERM)
        hot.process.wait(600)
        drain_s = time.perf_counter() - started
        seconds, age, source, chunk_s = rebuilt(other, http, kind, sid, DRAIN_CHUNKS, body)
        http.delete(f"{other.url}/v1/sessions/{sid}")
    return {"drain_exit_s": drain_s, "drain_replayed": age, "drain_source": source, "drain_stall_s": seconds,
            "drain_chunk_s": chunk_s, "drain_stall": seconds / chunk_s}


def moves(tmp: Path, sizes: list[int], r: redis.Redis) -> list[dict]:
    """A kill and a drain per kind and size (module docstring), snapshots in a directory the replicas share."""
    directory = tmp / "snapshots"
    directory.mkdir()
    prefix = f"cdt-bench-{secrets.token_hex(4)}:"
    env = {"redis_url": REDIS_URL, "session_key_prefix": prefix, "session_snapshot_store": f"file://{directory}"}
    rows = []
    with Server(TINY, tmp / "other.log", **env) as other:
        for size in sizes:
            for kind in ("encode", "decode"):
                def start(name=f"{kind}{size}"):
                    return Server(TINY, tmp / f"{name}-{secrets.token_hex(2)}.log", **env)

                row = killed_mid_session(start, other, prefix, kind, size, r)
                row.update(drained(start, other, kind, size))
                rows.append(row)
                print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        rows = moves(Path(tmp_dir), args.sizes, redis.Redis.from_url(REDIS_URL))
    worst = {name: max(row[name] for row in rows) for name in TARGETS}
    met = {name: worst[name] <= target for name, target in TARGETS.items()}
    summary = {"worst": worst, "targets": TARGETS, "met": met}
    notes = (
        "`kill_stall`, `drain_stall`: the other replica's rebuild as a multiple of one chunk's compute there "
        "(`kill_chunk_s`, `drain_chunk_s`: the mean of the session's next chunks, hot, on that replica) "
        "(`*_replayed`: chunks replayed after the snapshot, `*_source`: what it was rebuilt from); "
        "`snapshot_traffic`: a snapshot's bytes over the K chunks' body plus response bytes; `snapshot_mb`: the "
        "packed snapshot (`packed_over_cache` of the hot feature cache); `redis_over_window`: the session's "
        "Redis keys over the input window (one receptive field of chunks).\n\nTargets with the default settings: "
        + "; ".join(f"{name} <= {target:g}: worst **{worst[name]:.2f}** ({'met' if met[name] else 'NOT met'})"
                    for name, target in TARGETS.items()) + ".")
    command = "python -m benchmarks.session_moves " + " ".join(sys.argv[1:])
    path = report.write("session_moves", command.strip(), summary, rows, notes, measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
