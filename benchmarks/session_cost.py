"""What streaming sessions cost the store, measured through two real `cdt serve` replicas
sharing a real Redis.

Part 1, per kind (encode, decode) and frame size, 4-frame chunks, the tiny checkpoint:
- the replica holding the session's hot stream serves `--chunks` chunks; from its
  /metrics: compute per chunk (`cdt_compute_seconds`), synchronous store time per chunk
  (`cdt_session_store_seconds`: the load and the commit), and from Redis' INFO the bytes
  that crossed to and from Redis per chunk, against the chunk's body plus its response;
- the other replica then serves the next chunk, rebuilding the stream first
  (`cdt_session_rebuild_seconds`), without a snapshot (log window replay) and with one
  (replicas started with snapshots after every chunk), as a multiple of one chunk's compute.

Part 2, decode sessions with the default limits where one FeatureCache is large (the
tiny checkpoint at 1280x720, a random-init `small` (CDT-S) at 512x512): chunks over
HTTP, alternating between the two replicas, Redis memory of the session's keys
(`MEMORY USAGE`) against the input log window it must hold.

    .venv/bin/python -m benchmarks.session_cost [--sizes 256 512] [--chunks 60 6] [--scale-chunks 4]
"""

from __future__ import annotations

import argparse
import io
import json
import secrets
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
from tests.servers import Server, metric_sum

# The code these figures describe (`python -m benchmarks.run_all --stale`).
MEASURES = ["model/", "media/", "service/", "benchmarks/session_cost.py"]

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "checkpoints" / "cdt-tiny"
CDT = Path(sys.executable).parent / "cdt"
REDIS_URL = "redis://127.0.0.1:6379/0"
CHUNK_FRAMES = 4  # pixel frames per chunk: 1 latent frame


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
                     snapshots: bool, r: redis.Redis) -> dict:
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
        if snapshots:  # the snapshot of the last chunk is written off the response path: wait for it
            deadline = time.monotonic() + 600
            while http.get(f"{hot.url}/v1/sessions/{sid}").json()["snapshot_seq"] != chunks - 1:
                if time.monotonic() > deadline:
                    raise SystemExit("the snapshot was never written")
                time.sleep(0.2)
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
    return {"kind": kind, "size": f"{size}x{size}", "snapshots": snapshots, "chunk_compute_s": compute,
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
        for snapshots in (False, True):
            # Snapshots after every chunk (a rebuild target of one chunk), or none.
            env = {"session_snapshot_mb": 4096, "session_rebuild_target": 1} if snapshots else {"session_snapshot_mb": 0}
            with ExitStack() as stack:
                pair, prefix = replicas(stack, TINY, tmp, **env)
                for size, chunks in zip(args.sizes, args.chunks, strict=True):
                    for kind in ("encode", "decode"):
                        rows.append(hot_then_rebuild(pair, prefix, kind, size, chunks, snapshots, r))
                        print(rows[-1], flush=True)
        with ExitStack() as stack:
            scale["tiny decode 1280x720"] = alternating_decode(*replicas(stack, TINY, tmp), TINY, 720, 1280,
                                                               args.scale_chunks, r)
            print(scale, flush=True)
        small = tmp / "small"
        subprocess.run([CDT, "init", "--preset", "small", "-o", small, "--seed", "0"], check=True, capture_output=True)
        with ExitStack() as stack:
            scale["small (CDT-S) decode 512x512"] = alternating_decode(*replicas(stack, small, tmp), small, 512, 512,
                                                                       args.scale_chunks, r)
            print(scale, flush=True)
    hot = [row for row in rows if not row["snapshots"]]
    summary = {"worst_store_share": max(row["store_share"] for row in hot),
               "worst_redis_bytes_ratio": max(row["redis_bytes_ratio"] for row in hot), "scale": scale}
    notes = (
        f"Part 1: tiny checkpoint, fp32, {CHUNK_FRAMES}-frame chunks (npy in and out); per size "
        f"({', '.join(map(str, args.sizes))}) {', '.join(str(c - 1) for c in args.chunks)} steady-state chunks on the "
        "replica holding the hot stream, then one on the other replica (`log_chunks`: what its rebuild replayed, "
        "at most one receptive field). Store time on "
        f"the response path, worst share of chunk compute: **{summary['worst_store_share']:.2%}**; bytes to and "
        f"from Redis per chunk over the chunk's body plus response: at most "
        f"**{summary['worst_redis_bytes_ratio']:.2f}x**. `rebuild_over_chunk`: the other replica's rebuild "
        "time as a multiple of one chunk's compute, from the log window (`snapshots` false) or from a "
        "snapshot plus the chunks after it (true).\n\nPart 2 (default limits, two replicas, chunks alternating, "
        "1 latent frame per chunk): "
        + "; ".join(f"{name}: {s['chunks']} chunks completed, Redis holds at most {s['redis_session_mb']:.1f} MB for "
                    f"the session (its log {s['log_mb']:.1f} MB, the rest the last response and the record) "
                    f"against an input window of {s['window_mb']:.1f} MB at most (**{s['redis_over_window']:.2f}x**), "
                    f"chunk seconds {', '.join(f'{t:.0f}' for t in s['chunk_s'])}" for name, s in scale.items()))
    command = "python -m benchmarks.session_cost " + " ".join(sys.argv[1:])
    path = report.write("session_cost", command.strip(), summary, rows, notes, measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
