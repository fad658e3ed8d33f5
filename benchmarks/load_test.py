"""Bounded closed-loop load test against a local replica pair.

Two `cdt serve` replicas (loopback only) with CDT_QUEUE_SIZE=q; clients alternate
between them (round robin, as the compose nginx does). At each level, c = 1x, 2x and
4x the queue size concurrent clients each send /v1/encode requests back to back for
--seconds (a client that gets 429 waits --backoff before its next request). Reports
throughput, latency percentiles of the answered requests, the share of 429s, any 5xx,
and each replica's peak RSS (VmHWM) after every level.

    .venv/bin/python -m benchmarks.load_test [--queue-size 4] [--seconds 15]
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

from benchmarks import report
from model import DEFAULT_CHECKPOINT, CDTConfig, build_model, save_pretrained
from tests.servers import Server

# The code these figures describe (`python -m benchmarks.run_all --stale`).
MEASURES = ["model/", "media/", "service/", "benchmarks/load_test.py"]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_level(urls: list[str], clients: int, seconds: float, body: bytes, backoff: float) -> dict:
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    latencies, statuses = [], []
    turn = itertools.count()

    def client() -> None:
        with httpx.Client(timeout=300) as http:
            while time.monotonic() < deadline:
                url = urls[next(turn) % len(urls)]
                start = time.perf_counter()
                try:
                    status = http.post(url + "/v1/encode", content=body,
                                       headers={"content-type": "application/x-npy"}).status_code
                except httpx.TransportError:
                    status = 0
                elapsed = time.perf_counter() - start
                with lock:
                    statuses.append(status)
                    if status == 200:
                        latencies.append(elapsed)
                if status == 429:
                    time.sleep(backoff)

    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.monotonic() - start
    answered = len(statuses)
    return {"ok": statuses.count(200), "rejected_429": statuses.count(429),
            "errors_5xx": sum(500 <= s < 600 for s in statuses), "transport_errors": statuses.count(0),
            "throughput_rps": statuses.count(200) / wall, "share_429": statuses.count(429) / max(answered, 1),
            "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
            "p99_s": percentile(latencies, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue-size", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15.0, help="per load level")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--backoff", type=float, default=0.05, help="client pause after a 429")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="served checkpoint (default: the shipped one, else a random tiny model)")
    args = parser.parse_args()
    frames = np.random.default_rng(0).integers(0, 256, (args.frames, args.size, args.size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    np.save(buffer, frames, allow_pickle=False)
    body = buffer.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or (DEFAULT_CHECKPOINT if DEFAULT_CHECKPOINT.is_dir() else None)
        if checkpoint is None:
            checkpoint = Path(tmp) / "tiny"
            torch.manual_seed(0)
            save_pretrained(build_model(CDTConfig.from_preset("tiny"), "cdt"), checkpoint)
        servers = [Server(checkpoint, Path(tmp) / f"r{i}.log", queue_size=str(args.queue_size)) for i in range(2)]
        rows = []
        try:
            urls = [s.wait_ready().url for s in servers]
            run_level(urls, 2, 3.0, body, args.backoff)  # warm-up: first-call allocations
            for factor in (1, 2, 4):
                level = run_level(urls, factor * args.queue_size, args.seconds, body, args.backoff)
                rss = [peak_rss_mb(s.process.pid) for s in servers]
                rows.append({"clients": f"{factor}x queue ({factor * args.queue_size})", **level,
                             "peak_rss_mb_max": max(rss)})
        finally:
            for s in servers:
                s.stop()
    worst_5xx = sum(r["errors_5xx"] + r["transport_errors"] for r in rows)
    notes = (f"Two replicas, CDT_QUEUE_SIZE={args.queue_size} each (capacity {2 * (args.queue_size + 1)} "
             f"requests in the pair), /v1/encode of {args.frames}x{args.size}x{args.size} uint8 npy, "
             f"{args.seconds:g} s per level, {args.backoff:g} s client pause after a 429. 5xx or transport "
             f"errors over all levels: **{worst_5xx}**. Peak RSS is the replicas' VmHWM after each level.")
    command = "python -m benchmarks.load_test " + " ".join(sys.argv[1:])
    path = report.write("load_test", command.strip(), {"queue_size": args.queue_size, "errors_5xx": worst_5xx},
                        rows, notes, measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
