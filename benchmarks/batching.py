"""Batching of stream pushes, against real `cdt serve` processes (the shipped checkpoint, fp32,
one CPU worker, this machine): 8 concurrent streaming sessions of same-shape chunks, with
batching off (CDT_BATCH_MAX=1) and on (8; waiting 0 ms, and a few ms for more), side by side:
chunks per second over the run, and each chunk's latency (p50, p99) as its client sees it.

Each session sends its chunks one after another (a client waits for an answer before sending
the next chunk, as a live stream does); the first chunk of each opens its stream alone.

    python -m benchmarks.batching [--sessions 8] [--chunks 6] [--side 128] [--wait-ms 10]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from model import DEFAULT_CHECKPOINT

from . import report
from .fairness import percentile

from tests.servers import Server  # noqa: E402  (the tests' real-server launcher)

# The code these figures describe (`python -m benchmarks.run_all --stale`).
MEASURES = ["service/", "media/", "model/", "benchmarks/batching.py"]


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def run_session(url: str, kind: str, chunks: list[bytes], latencies: list[float], index: int) -> None:
    spec = {"kind": kind, "seed": index} if kind == "decode" else {"kind": kind}
    with httpx.Client(base_url=url, timeout=600) as http:
        answer = http.post("/v1/sessions", json=spec)
        answer.raise_for_status()
        sid = answer.json()["id"]
        for seq, body in enumerate(chunks):
            start = time.perf_counter()
            http.post(f"/v1/sessions/{sid}/chunks/{seq}?format=npy", content=body).raise_for_status()
            if seq:  # the first chunk opens the stream, alone
                latencies.append(time.perf_counter() - start)


def measure(url: str, kind: str, bodies: list[list[bytes]]) -> dict:
    latencies: list[float] = []
    threads = [threading.Thread(target=run_session, args=(url, kind, chunks, latencies, i))
               for i, chunks in enumerate(bodies)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    return {"chunks_per_s": sum(map(len, bodies)) / elapsed, "p50": statistics.median(latencies),
            "p99": percentile(latencies, 99), "latencies": latencies}


def batch_sizes(server: Server, op: str) -> float:
    """Mean jobs per batch of `op` so far."""
    return server.metric("cdt_batch_size_sum", op=op) / max(1.0, server.metric("cdt_batch_size_count", op=op))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=6, help="chunks per session (4 frames, or 1 latent frame)")
    parser.add_argument("--side", type=int, default=128, help="frame height and width")
    parser.add_argument("--wait-ms", type=float, default=10.0, help="CDT_BATCH_WAIT_MS of the third case")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    side, latent = args.side, args.side // 8
    bodies = {
        "decode": [[npy(rng.standard_normal((1, 16, 1, latent, latent)).astype(np.float32))
                    for _ in range(args.chunks)] for _ in range(args.sessions)],
        "encode": [[npy(rng.integers(0, 256, (4 if seq else 1, side, side, 3), dtype=np.uint8))
                    for seq in range(args.chunks)] for _ in range(args.sessions)],
    }
    cases = {"off": {"batch_max": 1}, "on, wait 0 ms": {"batch_max": args.sessions},
             f"on, wait {args.wait_ms:g} ms": {"batch_max": args.sessions, "batch_wait_ms": args.wait_ms}}
    results: dict[str, dict] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, settings in cases.items():
            server = Server(Path(DEFAULT_CHECKPOINT), Path(tmp) / "server.log", devices="cpu", dtype="fp32",
                            queue_size=2 * args.sessions, key_queue_size=2 * args.sessions, **settings).wait_ready()
            try:
                for kind, kind_bodies in bodies.items():
                    measure(server.url, kind, [chunks[:2] for chunks in kind_bodies[:2]])  # warm-up
                    result = measure(server.url, kind, kind_bodies)
                    result["mean_batch"] = batch_sizes(server, f"session_{kind}")
                    results[f"{kind}, batching {case}"] = result
            finally:
                server.stop()
    for kind in bodies:
        off = results[f"{kind}, batching off"]
        for case in cases:
            result = results[f"{kind}, batching {case}"]
            rows.append({"sessions": f"{args.sessions} {kind}", "batching": case,
                         "chunks/s": round(result["chunks_per_s"], 3),
                         "throughput vs off": round(result["chunks_per_s"] / off["chunks_per_s"], 2),
                         "p50 s": round(result["p50"], 3), "p99 s": round(result["p99"], 3),
                         "mean batch": round(result["mean_batch"], 2)})
    notes = (f"{args.sessions} sessions of each kind at once, {args.chunks} chunks each, {side}x{side}: decode chunks "
             "of 1 latent frame (4 frames, 1 DDIM step), encode chunks of 4 frames (the first of 1). The shipped "
             "checkpoint, fp32, one CPU worker with torch's default threads. Latencies are of every chunk but "
             "each session's first (which opens its stream alone); throughput counts every chunk. 'mean "
             "batch' includes the first chunks and the warm-up's, which run alone.")
    gains = {kind: results[f"{kind}, batching on, wait 0 ms"]["chunks_per_s"] / results[f"{kind}, batching off"]
             ["chunks_per_s"] for kind in bodies}
    path = report.write("batching", "python -m benchmarks.batching",
                        {"results": results, "gains": gains, "args": vars(args)}, rows, notes, measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
