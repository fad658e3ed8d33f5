"""Encoding a data set with `cdt encode-dataset`: clips/s and frames/s with the local and
the Ray engine on this machine, and the share of time the model was busy (the rest it
waited for decoded frames: the target is that decoding does not starve it).

Each engine runs the same command in a fresh process on the shared clips (the tiny
shipped checkpoint, the first 17 frames at 256x256, a centre crop), into its own empty
OUTPUT; the Ray engine starts a local cluster. Rates count the clips encoded over the
run's time from opening OUTPUT (after imports and the model load) to the last shard,
which includes the decode pool's or the Ray cluster's start. Both OUTPUTs must hold the
same bytes.

    .venv/bin/python -m benchmarks.dataset_encoding            # all shared clips, both engines
    .venv/bin/python -m benchmarks.dataset_encoding --quick    # 3 clips at 64x64: checks it runs,
                                                               # writes no results
"""

from __future__ import annotations

import argparse
import csv
import filecmp
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report

# The code these figures describe (`python -m benchmarks.run_all --stale`).
MEASURES = ["media/", "model/", "cli/dataset_commands.py", "benchmarks/dataset_encoding.py"]
ROOT = Path(__file__).resolve().parents[1]
SHARED_MANIFEST = ROOT.parent / "shared" / "data" / "videos" / "MANIFEST.tsv"
ENGINES = ("local", "ray")


def manifest_of(clips: int | None, folder: Path) -> Path:
    """The shared manifest, or one of its first `clips` rows (paths made absolute)."""
    if clips is None:
        return SHARED_MANIFEST
    with SHARED_MANIFEST.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[:clips]
    path = folder / "clips.tsv"
    path.write_text("path\n" + "".join(f"{SHARED_MANIFEST.parent / row['file']}\n" for row in rows))
    return path


def run(engine: str, source: Path, output: Path, args) -> dict:
    command = [sys.executable, "-m", "cli.main", "encode-dataset", str(source), str(output), "--engine", engine,
               "--frames", str(args.frames), "--size", str(args.size), "--crop", "center",
               "--workers", str(args.workers), "--shard-size", str(args.shard_size), "--quiet"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {"engine": engine, "clips": summary["encoded_clips"], "failed": summary["failed"],
            "frames": summary["encoded_frames"], "seconds": summary["seconds"],
            "clips_per_s": summary["clips_per_s"], "frames_per_s": summary["frames_per_s"],
            "model_busy": summary["model_busy"], "model_busy_warm": summary["model_busy_warm"],
            "process_seconds": round(time.perf_counter() - start, 3)}


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return not mismatch and not errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--clips", type=int, help="the first N clips of the shared manifest (default all)")
    parser.add_argument("--workers", type=int, default=2, help="decode processes / concurrent decode tasks")
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--quick", action="store_true",
                        help="3 clips at 64x64, 9 frames: checks the benchmark runs; prints, writes no results")
    args = parser.parse_args()
    if args.quick:
        args.size, args.frames, args.clips = 64, 9, 3
    with tempfile.TemporaryDirectory(prefix="dataset-encoding-") as tmp:
        folder = Path(tmp)
        source = manifest_of(args.clips, folder)
        rows = [run(engine, source, folder / engine, args) for engine in args.engines]
        same = len(args.engines) < 2 or same_files(*(folder / engine for engine in args.engines))
    if args.quick:
        print(json.dumps({"rows": rows, "same_bytes": same}, indent=1))
        return
    command = "python -m benchmarks.dataset_encoding " + " ".join(sys.argv[1:])
    notes = (f"`cdt encode-dataset` on {rows[0]['clips'] + rows[0]['failed']} shared clips ({args.frames} frames, "
             f"{args.size}x{args.size} centre crop, tiny shipped checkpoint, fp32, {args.workers} decode workers, "
             f"one CPU model). clips/s and frames/s: clips encoded over the run's time from opening OUTPUT to the "
             "last shard (the decode pool's or the local Ray cluster's start included); model_busy: the share of "
             "that time the model spent encoding; model_busy_warm: the same from the first encode's start on (the "
             "pool's or cluster's start left out). process_seconds adds the imports and the model load. "
             f"Both engines wrote the same bytes: **{same}**.")
    path = report.write("dataset_encoding", command.strip(), {"same_bytes": same, "size": args.size,
                                                              "frames": args.frames}, rows, notes, measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
