"""Peak RSS of a fresh `cdt serve` replica serving one `/v1/encode` or `/v1/decode` at
256x256 for 17, 257 and 1,025 frames, and its time per frame beside a service that runs
the model on the whole clip in one call: the commit given by `--whole-clip-commit`,
checked out in a temporary git worktree and served the same way, on the shortest clip
(a whole-clip decode of 257 frames at 256x256 would need tens of GB).

The input is a real clip (looped forward and back to reach 1,025 frames) written as
mp4; decode requests send the latents the encode returned and take mp4 back. Each
request runs on a new server process; its peak RSS is the kernel's high-water mark
(VmHWM) after the request.

    .venv/bin/python -m benchmarks.request_memory [--lengths 17 257 1025] [--size 256]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np

from benchmarks import report
from media import VideoWriter, read_video
from tests.servers import Server

# The code these figures describe (`python -m benchmarks.run_all --stale`).
MEASURES = ["model/", "media/", "service/", "benchmarks/request_memory.py"]

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "cdt-tiny"
WHOLE_CLIP_COMMIT = "8d79126"  # the last commit whose service ran whole clips in one model call
VIDEO = REPO.parent / "shared" / "data" / "videos" / "mmaction2__test.mp4"


def looped_clip(frames: int, size: int) -> np.ndarray:
    clip = read_video(VIDEO, size=size, crop=size).frames
    order = np.concatenate([np.arange(len(clip)), np.arange(len(clip) - 2, 0, -1)])
    return clip[np.resize(order, frames)]


def serve_one(path: str, body: bytes, content_type: str, log: Path,
              repo: Path = REPO) -> tuple[bytes, float, float, float]:
    """(response, seconds, peak RSS MB after the request, peak RSS MB when ready)."""
    with Server(CHECKPOINT, log, repo=repo) as server:
        ready = server.peak_rss_bytes() / 2**20
        start = time.perf_counter()
        response = httpx.post(server.url + path, content=body, headers={"content-type": content_type}, timeout=3600)
        seconds = time.perf_counter() - start
        if response.status_code != 200:
            raise SystemExit(f"{path}: {response.status_code} {response.text}")
        return response.content, seconds, server.peak_rss_bytes() / 2**20, ready


@contextmanager
def worktree(commit: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=REPO, check=True,
                       capture_output=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, check=True)


def measure(rows: list, label: str, frames: int, size: int, tmp: Path, repo: Path = REPO) -> None:
    clip = looped_clip(frames, size)
    path = tmp / f"clip{frames}.mp4"
    with VideoWriter(path, size, size, 30.0) as writer:
        writer.write(clip)
    body, content_type = path.read_bytes(), "video/mp4"
    for endpoint in ("/v1/encode", "/v1/decode"):
        body, seconds, peak, ready = serve_one(endpoint, body, content_type, tmp / "server.log", repo)
        content_type = "application/x-safetensors"
        rows.append({"service": label, "endpoint": endpoint, "frames": frames, "peak_rss_mb": peak,
                     "ready_rss_mb": ready, "seconds": seconds, "ms_per_frame": 1000 * seconds / frames})
        print(rows[-1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[17, 257, 1025])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--whole-clip-commit", default=WHOLE_CLIP_COMMIT)
    args = parser.parse_args()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for frames in args.lengths:
            measure(rows, "streamed", frames, args.size, Path(tmp))
        with worktree(args.whole_clip_commit) as old:
            measure(rows, f"whole clip ({args.whole_clip_commit[:7]})", args.lengths[0], args.size, Path(tmp), old)
    ratios, speed, whole_ms = {}, {}, {}
    for endpoint in ("/v1/encode", "/v1/decode"):
        streamed = [r for r in rows if r["endpoint"] == endpoint and r["service"] == "streamed"]
        whole = next(r for r in rows if r["endpoint"] == endpoint and r["service"] != "streamed")
        ratios[endpoint] = streamed[-1]["peak_rss_mb"] / streamed[0]["peak_rss_mb"]
        whole_ms[endpoint] = whole["ms_per_frame"]
        speed[endpoint] = {r["frames"]: r["ms_per_frame"] / whole["ms_per_frame"] for r in streamed}
    short, long = args.lengths[0], args.lengths[-1]
    notes = (f"Peak RSS {long} vs {short} frames: "
             + ", ".join(f"{e} **{r:.3f}x**" for e, r in ratios.items())
             + f". Time per frame over the whole-clip service ({args.whole_clip_commit[:7]}) at {short} frames: "
             + "; ".join(f"{e} " + ", ".join(f"{n} frames {x:.3f}x" for n, x in s.items()) for e, s in speed.items())
             + f". tiny checkpoint, {args.size}x{args.size}, mp4 in and out, a fresh replica per request.")
    command = "python -m benchmarks.request_memory " + " ".join(sys.argv[1:])
    path = report.write("request_memory", command.strip(),
                        {"rss_ratios": ratios, "time_per_frame_vs_whole_clip": speed,
                         "whole_clip_ms_per_frame": whole_ms, "size": args.size}, rows, notes, measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
