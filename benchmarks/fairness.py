"""Fair scheduling between API keys, against real `cdt serve` processes (tiny preset, random
init, fp32, this machine's CPU): key B's request latency (p50, p99) alone, and while key A
keeps 16 whole-clip requests in flight; the same flood on the service before the scheduler
(`--base`, by default the commit before service/scheduling.py was added), whose job queue was
first-in-first-out across keys.

Every request is a whole-clip encode of 17 frames of 128x128 (npy in): three model jobs.

    python -m benchmarks.fairness [--base REF] [--requests 12]
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from model import CDTConfig, build_model, save_pretrained

from . import report

from tests.servers import Server  # noqa: E402  (the tests' real-server launcher)

# The code these figures describe (`python -m benchmarks.run_all --stale`).
MEASURES = ["service/", "benchmarks/fairness.py"]

REPO = Path(__file__).resolve().parents[1]
KEY_A, KEY_B = "flooding-key", "other-key"
FLOOD = 16
FRAMES, SIDE = 17, 128


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def added_before(path: str) -> str:
    added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", path], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    return f"{added[-1]}^"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def encode(http: httpx.Client, key: str, body: bytes) -> None:
    http.post("/v1/encode", content=body, headers={"content-type": "application/x-npy",
                                                    "Authorization": f"Bearer {key}"}).raise_for_status()


def latencies(url: str, body: bytes, requests: int, flood: bool) -> list[float]:
    """Key B's request latencies, one request at a time, with or without key A's flood."""
    stop = threading.Event()

    def flooder():
        with httpx.Client(base_url=url, timeout=600) as http:
            while not stop.is_set():
                encode(http, KEY_A, body)

    threads = [threading.Thread(target=flooder) for _ in range(FLOOD if flood else 0)]
    for thread in threads:
        thread.start()
    try:
        with httpx.Client(base_url=url, timeout=600) as http:
            if flood:
                time.sleep(3)  # the flood's requests are in flight
            out = []
            for _ in range(requests):
                start = time.perf_counter()
                encode(http, KEY_B, body)
                out.append(time.perf_counter() - start)
            return out
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="the git revision with first-in-first-out scheduling")
    parser.add_argument("--requests", type=int, default=12, help="key B's requests per measurement")
    args = parser.parse_args()
    base = subprocess.run(["git", "rev-parse", "--short", args.base or added_before("service/scheduling.py")],
                          cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    body = npy(np.random.default_rng(0).integers(0, 256, (FRAMES, SIDE, SIDE, 3), dtype=np.uint8))
    settings = {"api_keys": f"{KEY_A},{KEY_B}", "queue_size": 2 * FLOOD, "key_queue_size": FLOOD + 1,
                "devices": "cpu"}
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = tmp / "tiny"
        torch.manual_seed(0)
        save_pretrained(build_model(CDTConfig.from_preset("tiny"), "cdt"), checkpoint)
        base_tree = tmp / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), base], cwd=REPO, check=True,
                       capture_output=True)
        try:
            for side, repo in (("fair", REPO), ("fifo", base_tree)):
                server = Server(checkpoint, tmp / f"{side}.log", repo=repo, **settings).wait_ready()
                try:
                    with httpx.Client(base_url=server.url, timeout=600) as http:
                        encode(http, KEY_B, body)  # warm-up
                    if side == "fair":
                        results["alone"] = latencies(server.url, body, args.requests, flood=False)
                    results[side] = latencies(server.url, body, args.requests, flood=True)
                finally:
                    server.stop()
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, check=False,
                           capture_output=True)
    alone_p99 = percentile(results["alone"], 99)
    labels = {"alone": "key B alone", "fair": f"key B, key A flooding ({FLOOD} in flight): fair scheduling",
              "fifo": f"key B, key A flooding ({FLOOD} in flight): first-in-first-out ({base})"}
    rows = [{"case": labels[name], "p50 s": round(statistics.median(values), 3),
             "p99 s": round(percentile(values, 99), 3), "p99 / alone p99": round(percentile(values, 99) / alone_p99, 2)}
            for name, values in results.items()]
    fair_ratio = percentile(results["fair"], 99) / alone_p99
    notes = (f"Whole-clip encodes of {FRAMES}x{SIDE}x{SIDE} (3 model jobs each), tiny preset (random init), fp32, "
             f"one CPU worker. Key B sends {args.requests} requests one after another; key A keeps {FLOOD} requests "
             "in flight throughout. The p99 of so few samples is their maximum.")
    path = report.write("fairness", "python -m benchmarks.fairness", {"latencies": results, "base": base,
                                                                      "fair_p99_ratio": fair_ratio},
                        rows, notes, measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
