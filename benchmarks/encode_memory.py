"""Peak RSS of `cdt encode --chunk` on 33 vs 257 frames of a real clip (129 in between
shows where it levels off), and whole-clip encodes of the same lengths for contrast.

Each encode is a separate `cdt` process; its peak RSS comes from `os.wait4`, which
reports that one child's rusage. The clip is decoded chunk by chunk, so with --chunk
only the latents (1/48 of the pixels' floats) grow with the length. glibc's malloc
raises its mmap threshold as large blocks are freed, so a long run's heap fragments a
little further before it levels off; the run with a fixed MALLOC_MMAP_THRESHOLD_
separates that allocator effect from the data.

    .venv/bin/python -m benchmarks.encode_memory [--video PATH] [--size 128] [--chunk 8]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report

# The code these figures describe (`python -m benchmarks.run_all --stale`).
MEASURES = ["model/", "media/", "cli/", "benchmarks/encode_memory.py"]

FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # 128 KiB: big tensors always mmapped

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VIDEO = REPO.parent / "shared" / "data" / "videos" / "mmaction2__test.mp4"  # 300 frames, 340x256
CDT = Path(sys.executable).parent / "cdt"


def peak_rss_mb(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **env})
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    if child.returncode:
        raise SystemExit(f"{' '.join(argv)} failed: {child.stderr.read().decode().strip()}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    parser.add_argument("--size", type=int, default=128, help="short side the clip is resized to")
    parser.add_argument("--chunk", type=int, default=8, help="frames per --chunk")
    parser.add_argument("--lengths", type=int, nargs="+", default=[33, 129, 257])
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "ckpt"
        subprocess.run([CDT, "init", "--preset", args.preset, "-o", checkpoint, "--seed", "0"], check=True,
                       capture_output=True)
        cases = [(f"--chunk {args.chunk}", True, {}),
                 (f"--chunk {args.chunk}, MALLOC_MMAP_THRESHOLD_=131072", True, FIXED_MMAP),
                 ("whole clip", False, {})]
        for mode, chunked, env in cases:
            for frames in args.lengths:
                argv = [str(CDT), "encode", str(args.video), "-o", str(Path(tmp) / "z.safetensors"),
                        "--checkpoint", str(checkpoint), "--frames", str(frames), "--size", str(args.size), "--quiet"]
                if chunked:
                    argv += ["--chunk", str(args.chunk)]
                rss, seconds = peak_rss_mb(argv, env)
                rows.append({"mode": mode, "frames": frames, "peak_rss_mb": rss, "seconds": seconds})
    n = len(args.lengths)
    ratios = {mode: rows[i * n + n - 1]["peak_rss_mb"] / rows[i * n]["peak_rss_mb"]
              for i, (mode, _, _) in enumerate(cases)}
    short, long = args.lengths[0], args.lengths[-1]
    notes = (f"Peak RSS {long} vs {short} frames: "
             + ", ".join(f"**{ratio:.3f}x** ({mode})" for mode, ratio in ratios.items())
             + f". {args.preset} preset, `{args.video.name}` resized to short side {args.size}, "
             "each run a fresh `cdt encode` process.")
    command = "python -m benchmarks.encode_memory " + " ".join(sys.argv[1:])
    path = report.write("encode_memory", command.strip(),
                        {"ratios": ratios, "video": args.video.name,
                         "size": args.size, "chunk": args.chunk, "preset": args.preset}, rows, notes, measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
