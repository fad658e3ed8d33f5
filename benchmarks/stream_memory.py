"""Peak memory of streaming encode + decode: 17 vs 129 vs 257 frames at one resolution.

Each length runs in a fresh subprocess (peak RSS is per process). Frames are made
chunk by chunk, so the only thing that could grow with length is the model's own
state: the claim is that it does not (FeatureCache holds a fixed number of frames).

    .venv/bin/python -m benchmarks.stream_memory [--size 128] [--preset tiny]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks import report

# The code these figures describe (`python -m benchmarks.run_all --stale`).
MEASURES = ["model/", "benchmarks/stream_memory.py"]

CHILD = """
import json, resource, sys, torch
from model import CDTConfig, StreamingDecoder, StreamingEncoder, build_model, content_hash

frames, size, preset, chunk = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.manual_seed(0)
model = build_model(CDTConfig.from_preset(preset), "cdt").eval()
model_hash = content_hash(model)
enc, dec = StreamingEncoder(model, model_hash), StreamingDecoder(model, model_hash, steps=1, seed=0)
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
done, state_bytes = 0, 0
while done < frames:
    n = 1 if done == 0 else min(chunk, frames - done)
    latents = enc.push(torch.rand(1, 3, n, size, size) * 2 - 1)
    dec.push(latents)
    done += n
state_bytes = len(enc.export_state()) + len(dec.export_state())
print(json.dumps({"frames": frames, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_after_build_mb": baseline / 1024, "state_bytes": state_bytes}))
"""


def run(frames: int, size: int, preset: str, chunk: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(frames), str(size), preset, str(chunk)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--chunk", type=int, default=4, help="frames per chunk after the first")
    parser.add_argument("--lengths", type=int, nargs="+", default=[17, 129, 257])
    args = parser.parse_args()
    rows = [run(n, args.size, args.preset, args.chunk) for n in args.lengths]
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    command = "python -m benchmarks.stream_memory " + " ".join(sys.argv[1:])
    notes = (f"Peak RSS ratio {args.lengths[-1]} vs {args.lengths[0]} frames: **{ratio:.3f}** "
             f"(streaming encode + 1-step decode, {args.preset} preset, {args.size}x{args.size}, "
             f"chunks of {args.chunk} frames; target: within 15%).")
    path = report.write("stream_memory", command.strip(), {"ratio": ratio, "size": args.size,
                                                           "preset": args.preset}, rows, notes, measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
