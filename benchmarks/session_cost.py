"""What streaming sessions cost the store, measured through two real `cdt serve` replicas
sharing a real Redis.

Part 1, per kind (encode, decode) and frame size, 4-frame chunks, the tiny checkpoint:
- the replica holding the session's hot stream serves `--chunks` chunks; from its
  /metrics: compute per chunk (`cdt_compute_seconds`), synchronous store time per chunk
  (`cdt_session_store_seconds`: the load and the commit), and from Redis' INFO the bytes
  that crossed to and from Redis per chunk, against the chunk's body plus its response;
- the other replica then serves the next chunk, rebuilding the stream first
  (`cdt_session_rebuild_seconds`) with snapshots off (`CDT_SESSION_SNAPSHOT_MB=0`): by
  replaying the log window, as a multiple of one chunk's compute.

Part 2, decode sessions with the default limits where one FeatureCache is large (the
tiny checkpoint at 1280x720, a random-init `small` (CDT-S) at 512x512): chunks over
HTTP, alternating between the two replicas, Redis memory of the session's keys
(`MEMORY USAGE`) against the input log window it must hold.

Part 3, moves with the default settings (snapshot policy, drain, snapshots in a shared
directory: `CDT_SESSION_SNAPSHOT_STORE=file://...`), per kind and frame size, each on a freshly
started replica beside a long-lived one:
- kill: the session runs on its replica until a policy snapshot (label L) and K more chunks
  (K, the policy's interval, read from the labels of two successive snapshots), so the next
  snapshot is due but still being written; the replica is SIGKILLed; the next chunk on the
  other replica replays the chunks after the latest snapshot: the worst case of the policy.
  Its stall (the rebuild) as a multiple of one chunk's compute; the snapshots' bytes over the
  chunks' own (body plus response) over the same chunks; the session's storage: its
  snapshot on disk, its Redis keys against the input window it must hold;
- drain: a few chunks, then SIGTERM; the next chunk on the other replica rebuilds from the
  snapshot the drain wrote: its stall as a multiple of one chunk's compute.

    .venv/bin/python -m benchmarks.session_cost [--sizes 256 512] [--chunks 60 6] [--scale-chunks 4]
"""

from __future__ import annotations

import argparse
import io
import json
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import redis

from benchmarks import report
from tests.servers import Server, metric_sum, wait_for

# The code these figures describe (`python -m benchmarks.run_all --stale`).
MEASURES = ["model/", "media/", "service/", "benchmarks/session_cost.py"]

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "checkpoints" / "cdt-tiny"
CDT = Path(sys.executable).parent / "cdt"
REDIS_URL = "redis://127.0.0.1:6379/0"
CHUNK_FRAMES = 4  # pixel frames per chunk: 1 latent frame
DRAIN_CHUNKS = 3  # chunks before a drain (the policy's first snapshot comes later)
TARGETS = {"drain_stall": 2.0, "kill_stall": 10.0, "snapshot_traffic": 10.0, "redis_over_window": 2.0}


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def redis_bytes(r: redis.Redis) -> int:
    stats = r.info("stats")
    return stats["total_net_input_bytes"] + stats["total_net_output_bytes"]


def chunk_body(kind: str, height: int, width: int, rng: np.random.Generator) -> bytes:
    """One 4-frame chunk: uint8 frames for encode, one latent frame (float32) for decode."""
    if kind == "encode":
        return npy(rng.integers(0, 256, (CHUNK_FRAMES, height, width, 3), dtype=np.uint8))
    return npy(rng.standard_normal((1, 16, 1, height // 8, width // 8), dtype=np.float32))


def push(http: httpx.Client, server: Server, sid: str, seq: int, body: bytes) -> httpx.Response:
    response = http.post(f"{server.url}/v1/sessions/{sid}/chunks/{seq}", content=body,
                         params={"format": "npy"}, headers={"content-type": "application/x-npy"})
    if response.status_code != 200:
        raise SystemExit(f"chunk {seq}: {response.status_code} {response.text}")
    return response


def session_keys(r: redis.Redis, prefix: str, sid: str) -> list[bytes]:
    return list(r.scan_iter(match=f"{prefix}*{{{sid}}}*"))


def session_memory(r: redis.Redis, prefix: str, sid: str) -> int:
    return sum(r.memory_usage(key, samples=0) or 0 for key in session_keys(r, prefix, sid))


def hot_then_rebuild(pair: tuple[Server, Server], prefix: str, kind: str, size: int, chunks: int,
                     r: redis.Redis) -> dict:
    """`chunks` chunks on the replica holding the stream, then one on the other."""
    hot, other = pair
    rng = np.random.default_rng(0)
    bodies = [chunk_body(kind, size, size, rng) for _ in range(chunks + 1)]
    with httpx.Client(timeout=3600) as http:
        sid = http.post(hot.url + "/v1/sessions", json={"kind": kind}).json()["id"]
        push(http, hot, sid, 0, bodies[0])  # the first chunk starts the stream: not steady state
        before, redis_before = hot.metrics(), redis_bytes(r)
        payload = 0
        for seq in range(1, chunks):
            payload += len(bodies[seq]) + len(push(http, hot, sid, seq, bodies[seq]).content)
        after, redis_after = hot.metrics(), redis_bytes(r)
        rebuilt_before = other.metrics()
        response = push(http, other, sid, chunks, bodies[chunks])
        rebuilt_after = other.metrics()
        info = http.get(f"{other.url}/v1/sessions/{sid}").json()
        memory = session_memory(r, prefix, sid)
        http.delete(f"{other.url}/v1/sessions/{sid}")
    n = chunks - 1
    compute = (metric_sum(after, "cdt_compute_seconds_sum", op=f"session_{kind}")
               - metric_sum(before, "cdt_compute_seconds_sum", op=f"session_{kind}")) / n
    store = sum(metric_sum(after, "cdt_session_store_seconds_sum", op=op)
                - metric_sum(before, "cdt_session_store_seconds_sum", op=op) for op in ("load", "commit")) / n
    rebuild = (metric_sum(rebuilt_after, "cdt_session_rebuild_seconds_sum")
               - metric_sum(rebuilt_before, "cdt_session_rebuild_seconds_sum"))
    return {"kind": kind, "size": f"{size}x{size}", "chunk_compute_s": compute,
            "store_s": store, "store_share": store / compute, "chunk_and_response_kb": payload / n / 1024,
            "redis_kb": (redis_after - redis_before) / n / 1024,
            "redis_bytes_ratio": (redis_after - redis_before) / payload,
            "rebuild": response.headers.get("x-cdt-rebuild", "none"), "rebuild_s": rebuild,
            "rebuild_over_chunk": rebuild / compute, "log_chunks": info["log_chunks"],
            "log_mb": info["log_bytes"] / 2**20, "redis_session_mb": memory / 2**20}


def alternating_decode(pair: tuple[Server, Server], prefix: str, checkpoint: Path, height: int, width: int,
                       chunks: int, r: redis.Redis) -> dict:
    """A decode session whose chunks alternate between the replicas (every chunk rebuilds),
    and Redis' memory for it against the input window it keeps at most: the receptive field
    recorded with the checkpoint, in chunks of one latent frame."""
    rng = np.random.default_rng(0)
    field = json.loads((checkpoint / "receptive_field.json").read_text())
    window = (field["decode_base"] + field["decode_per_step"]) * len(chunk_body("decode", height, width, rng))
    times, peak_memory, peak_log = [], 0, 0
    with httpx.Client(timeout=3600) as http:
        sid = http.post(pair[0].url + "/v1/sessions", json={"kind": "decode"}).json()["id"]
        for seq in range(chunks):
            server = pair[seq % 2]
            start = time.perf_counter()
            push(http, server, sid, seq, chunk_body("decode", height, width, rng))
            times.append(time.perf_counter() - start)
            info = http.get(f"{server.url}/v1/sessions/{sid}").json()
            peak_memory = max(peak_memory, session_memory(r, prefix, sid))
            peak_log = max(peak_log, info["log_bytes"])
        http.delete(f"{pair[0].url}/v1/sessions/{sid}")
    return {"chunks": chunks, "chunk_s": times, "redis_session_mb": peak_memory / 2**20, "log_mb": peak_log / 2**20,
            "window_mb": window / 2**20, "redis_over_window": peak_memory / window}


def window_bytes(checkpoint: Path, kind: str, body: bytes) -> int:
    """The input log's most: the receptive field, in chunks of `body`'s size (steps 1)."""
    field = json.loads((checkpoint / "receptive_field.json").read_text())
    if kind == "encode":
        return field["encode"] // CHUNK_FRAMES * len(body)
    return (field["decode_base"] + field["decode_per_step"]) * len(body)


def wait_snapshot(http: httpx.Client, server: Server, sid: str, after: int | None) -> int:
    """The label of the session's snapshot once it is past `after`."""
    found: list[int] = []

    def newer() -> bool:
        label = http.get(f"{server.url}/v1/sessions/{sid}").json()["snapshot_seq"]
        found[:] = [] if label is None else [label]
        return bool(found) and (after is None or found[0] > after)

    wait_for(newer, "no policy snapshot", timeout_s=600, every_s=0.1)
    return found[0]


def computed_s(before: str, after: str, kind: str) -> float:
    """Mean compute of the session chunks between two /metrics texts."""
    op = f"session_{kind}"
    return ((metric_sum(after, "cdt_compute_seconds_sum", op=op) - metric_sum(before, "cdt_compute_seconds_sum", op=op))
            / (metric_sum(after, "cdt_compute_seconds_count", op=op)
               - metric_sum(before, "cdt_compute_seconds_count", op=op)))


def rebuilt(other: Server, http: httpx.Client, sid: str, seq: int, body: bytes) -> tuple[float, float, str]:
    """The next chunk on `other`: its rebuild seconds, chunks replayed after a snapshot, source."""
    before = other.metrics()
    response = push(http, other, sid, seq, body)
    after = other.metrics()
    seconds = (metric_sum(after, "cdt_session_rebuild_seconds_sum")
               - metric_sum(before, "cdt_session_rebuild_seconds_sum"))
    age = (metric_sum(after, "cdt_session_snapshot_age_chunks_sum")
           - metric_sum(before, "cdt_session_snapshot_age_chunks_sum"))
    source = next((s for s in ("snapshot", "window", "start")
                   if metric_sum(after, "cdt_session_rebuilds_total", source=s)
                   > metric_sum(before, "cdt_session_rebuilds_total", source=s)), "none")
    assert response.headers.get("x-cdt-rebuild") == "missing", response.headers
    return seconds, age, source


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
        seconds, age, source = rebuilt(other, http, sid, seq, body)
        http.delete(f"{other.url}/v1/sessions/{sid}")
    return {"kind": kind, "size": f"{size}x{size}", "chunk_compute_s": chunk_s, "K": interval,
            "cache_mb": cache_mb, "snapshot_mb": snapshot_bytes / 2**20,
            "packed_over_cache": snapshot_bytes / 2**20 / cache_mb,
            "snapshot_traffic": snapshot_bytes / (interval * payload / chunks),
            "redis_session_mb": memory / 2**20, "redis_over_window": memory / window_bytes(TINY, kind, body),
            "latest_snapshot": latest, "kill_replayed": age, "kill_source": source, "kill_stall_s": seconds,
            "kill_stall": seconds / chunk_s}


def drained(start: callable, other: Server, kind: str, size: int) -> dict:
    """SIGTERM after a few chunks; the next chunk rebuilds from the drain's snapshot."""
    rng = np.random.default_rng(1)
    body = chunk_body(kind, size, size, rng)
    with start() as hot, httpx.Client(timeout=3600) as http:
        sid = http.post(hot.url + "/v1/sessions", json={"kind": kind}).json()["id"]
        push(http, hot, sid, 0, body)
        before = hot.metrics()
        for seq in range(1, DRAIN_CHUNKS):
            push(http, hot, sid, seq, body)
        chunk_s = computed_s(before, hot.metrics(), kind)
        started = time.perf_counter()
        hot.process.send_signal(signal.SIGTERM)
        hot.process.wait(600)
        drain_s = time.perf_counter() - started
        seconds, age, source = rebuilt(other, http, sid, DRAIN_CHUNKS, body)
        http.delete(f"{other.url}/v1/sessions/{sid}")
    return {"drain_exit_s": drain_s, "drain_replayed": age, "drain_source": source, "drain_stall_s": seconds,
            "drain_stall": seconds / chunk_s}


def moves(tmp: Path, sizes: list[int], r: redis.Redis) -> list[dict]:
    """Part 3 (module docstring): default settings, snapshots in a directory the replicas share."""
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


def replicas(stack: ExitStack, checkpoint: Path, tmp: Path, **env) -> tuple[tuple[Server, Server], str]:
    """Two replicas sharing Redis under a key prefix of their own, and the prefix."""
    prefix = f"cdt-bench-{secrets.token_hex(4)}:"
    pair = tuple(stack.enter_context(Server(checkpoint, tmp / f"replica{i}.log", redis_url=REDIS_URL,
                                            session_key_prefix=prefix, **env)) for i in range(2))
    return pair, prefix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--chunks", type=int, nargs="+", default=[60, 6],
                        help="chunks per session on the hot replica, one per size: past the receptive field "
                             "(tiny: 17 encode and 54 decode chunks of 4 frames) the log stops growing")
    parser.add_argument("--scale-chunks", type=int, default=4, help="chunks per session in part 2")
    args = parser.parse_args()
    r = redis.Redis.from_url(REDIS_URL)
    rows, scale = [], {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        move_rows = moves(tmp, args.sizes, r)
        with ExitStack() as stack:  # snapshots off: every rebuild replays the log
            pair, prefix = replicas(stack, TINY, tmp, session_snapshot_mb=0)
            for size, chunks in zip(args.sizes, args.chunks, strict=True):
                for kind in ("encode", "decode"):
                    rows.append(hot_then_rebuild(pair, prefix, kind, size, chunks, r))
                    print(rows[-1], flush=True)
        # Snapshots in a directory: Redis keeps the records, last responses and logs only.
        files = {"session_snapshot_store": f"file://{tmp / 'snapshots'}"}
        with ExitStack() as stack:
            scale["tiny decode 1280x720"] = alternating_decode(*replicas(stack, TINY, tmp, **files), TINY, 720, 1280,
                                                               args.scale_chunks, r)
            print(scale, flush=True)
        small = tmp / "small"
        subprocess.run([CDT, "init", "--preset", "small", "-o", small, "--seed", "0"], check=True, capture_output=True)
        with ExitStack() as stack:
            scale["small (CDT-S) decode 512x512"] = alternating_decode(*replicas(stack, small, tmp, **files), small,
                                                                       512, 512, args.scale_chunks, r)
            print(scale, flush=True)
    worst = {"drain_stall": max(row["drain_stall"] for row in move_rows),
             "kill_stall": max(row["kill_stall"] for row in move_rows),
             "snapshot_traffic": max(row["snapshot_traffic"] for row in move_rows),
             "redis_over_window": max([row["redis_over_window"] for row in move_rows]
                                      + [s["redis_over_window"] for s in scale.values()])}
    summary = {"worst_store_share": max(row["store_share"] for row in rows),
               "worst_redis_bytes_ratio": max(row["redis_bytes_ratio"] for row in rows), "scale": scale,
               "moves": move_rows, "worst": worst, "targets": TARGETS,
               "met": {name: worst[name] <= target for name, target in TARGETS.items()}}
    notes = (
        "Part 3, moves with the default settings (module docstring), snapshots in a directory the replicas "
        "share; `kill_stall`, `drain_stall`: the other replica's rebuild as a multiple of one chunk's compute "
        "(`*_replayed`: chunks replayed after the snapshot); `snapshot_traffic`: snapshot bytes written over the "
        "chunks' body plus response bytes; `snapshot_mb`: the packed snapshot on disk (`packed_over_cache` of "
        "the hot feature cache); `redis_over_window`: the session's Redis keys over the input window.\n\n"
        + "\n".join(report.table_lines(move_rows)) + "\n\n"
        + "Targets: " + "; ".join(f"{name} <= {target:g}: worst **{worst[name]:.2f}** "
                                  f"({'met' if summary['met'][name] else 'NOT met'})"
                                  for name, target in TARGETS.items()) + ".\n\n"
        f"Part 1: tiny checkpoint, fp32, {CHUNK_FRAMES}-frame chunks (npy in and out); per size "
        f"({', '.join(map(str, args.sizes))}) {', '.join(str(c - 1) for c in args.chunks)} steady-state chunks on the "
        "replica holding the hot stream, then one on the other replica (`log_chunks`: what its rebuild replayed, "
        "at most one receptive field). Store time on "
        f"the response path, worst share of chunk compute: **{summary['worst_store_share']:.2%}**; bytes to and "
        f"from Redis per chunk over the chunk's body plus response: at most "
        f"**{summary['worst_redis_bytes_ratio']:.2f}x**. `rebuild_over_chunk`: the other replica's rebuild "
        "time as a multiple of one chunk's compute, replaying the log window (snapshots off: "
        "`CDT_SESSION_SNAPSHOT_MB=0`).\n\nPart 2 (default limits, snapshots in a directory, two replicas, chunks "
        "alternating, 1 latent frame per chunk): "
        + "; ".join(f"{name}: {s['chunks']} chunks completed, Redis holds at most {s['redis_session_mb']:.1f} MB for "
                    f"the session (its log {s['log_mb']:.1f} MB, the rest the last response and the record) "
                    f"against an input window of {s['window_mb']:.1f} MB at most (**{s['redis_over_window']:.2f}x**), "
                    f"chunk seconds {', '.join(f'{t:.0f}' for t in s['chunk_s'])}" for name, s in scale.items()))
    command = "python -m benchmarks.session_cost " + " ".join(sys.argv[1:])
    path = report.write("session_cost", command.strip(), summary, rows, notes, measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
