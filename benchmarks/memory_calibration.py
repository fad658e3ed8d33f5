"""Calibrate the service's memory estimates (`service.memory.COSTS`): the peak RSS a
streamed encode or decode adds, per pixel of the frame, per chunk frame and per DDIM
step, for each model preset.

Each measurement is a fresh process that builds the model (random weights: memory does
not depend on their values), streams a tiny clip through the same functions the
service runs (`media.encode_chunks` / `media.decode_chunks`) so one-time allocations
(thread pools, kernels) are in its baseline, then streams `--chunks` chunks at the
measured size; the cost is the rise of its peak RSS. A least-squares fit of

    cost = pixels * (state * steps + frame * chunk_frames) + fixed

over sizes, chunk lengths and steps gives the table to paste into service/memory.py.

    .venv/bin/python -m benchmarks.memory_calibration [--presets tiny small base]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import numpy as np
from scipy.optimize import nnls

from benchmarks import report

# The code these figures describe (`python -m benchmarks.run_all --stale`).
MEASURES = ["model/", "benchmarks/memory_calibration.py"]

# Sizes large enough that the per-pixel terms dominate the allocator's and kernels' noise
# (below ~128x128 the peak is not even monotonic in the area), within minutes on a CPU.
SIZES = {"tiny": [(128, 128), (256, 256), (256, 384)], "small": [(64, 64), (128, 128), (128, 192)],
         "base": [(64, 64), (96, 96)]}
CHUNKS = (4, 8)  # pixel frames per chunk
WARMUP_SIDE = 16


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def stream(model, model_hash: str, op: str, height: int, width: int, chunk: int, chunks: int, steps: int) -> None:
    """Run the service's streamed encode or decode of `chunks` chunks of `chunk` frames."""
    import torch

    from media import decode_chunks, encode_chunks, latents_info

    g = torch.Generator().manual_seed(0)
    if op == "encode":
        parts = (torch.rand(1, 3, chunk, height, width, generator=g) * 2 - 1 for _ in range(chunks))
        for _ in encode_chunks(model, model_hash, parts):
            pass
        return
    latent_chunk = chunk // 4
    info = latents_info(model, model_hash, 1 + 4 * (latent_chunk * chunks - 1), height, width, 30.0)
    parts = (torch.randn(1, 16, latent_chunk, height // 8, width // 8, generator=g) for _ in range(chunks))
    for _ in decode_chunks(model, model_hash, info, parts, steps=steps):
        pass


def measure_one(preset: str, op: str, height: int, width: int, chunk: int, steps: int, chunks: int) -> dict:
    import torch

    from model import CDTConfig, build_model, content_hash

    torch.manual_seed(0)
    model = build_model(CDTConfig.from_preset(preset), "cdt").eval()
    model_hash = content_hash(model)
    with torch.inference_mode():
        stream(model, model_hash, op, WARMUP_SIDE, WARMUP_SIDE, chunk, 3, steps)
        baseline = peak_rss()
        stream(model, model_hash, op, height, width, chunk, chunks, steps)
    return {"baseline": baseline, "peak": peak_rss()}


def run_child(*args) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory_calibration", "--one", *map(str, args)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit(rows: list[dict]) -> dict:
    """Least squares with every coefficient >= 0 (a negative one would be noise)."""
    a = np.array([[r["pixels"] * r["steps"], r["pixels"] * r["chunk_frames"], 1.0] for r in rows])
    b = np.array([r["cost_bytes"] for r in rows], dtype=float)
    (state, frame, fixed), _ = nnls(a, b)
    worst = max(abs(a[i] @ (state, frame, fixed) - b[i]) / b[i] for i in range(len(rows)))
    return {"state": round(float(state), 1), "frame": round(float(frame), 1), "fixed": round(float(fixed)),
            "worst_relative_error": round(float(worst), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    parser.add_argument("--chunks", type=int, default=3, help="chunks streamed per measurement")
    parser.add_argument("--one", nargs=6, help=argparse.SUPPRESS)  # child: preset op height width chunk steps
    args = parser.parse_args()
    if args.one:
        preset, op, h, w, chunk, steps = args.one
        print(json.dumps(measure_one(preset, op, int(h), int(w), int(chunk), int(steps), args.chunks)))
        return
    rows, fits = [], {}
    for preset in args.presets:
        for op in ("encode", "decode"):
            cases = [(h, w, c, 1) for h, w in SIZES[preset] for c in CHUNKS]
            if op == "decode":
                cases += [(h, w, CHUNKS[0], 2) for h, w in SIZES[preset][-2:]]
            op_rows = []
            for h, w, chunk, steps in cases:
                m = run_child(preset, op, h, w, chunk, steps)
                op_rows.append({"preset": preset, "op": op, "height": h, "width": w, "pixels": h * w,
                                "chunk_frames": chunk, "steps": steps, "cost_bytes": m["peak"] - m["baseline"],
                                "baseline_bytes": m["baseline"]})
                print(op_rows[-1], flush=True)
            fits[f"{preset}/{op}"] = fit(op_rows)
            rows += op_rows
    table = "\n".join(f'    ("{key.split("/")[0]}", "{key.split("/")[1]}"): Cost(state={f["state"]}, '
                      f'frame={f["frame"]}, fixed={f["fixed"]}),' for key, f in fits.items())
    notes = ("Fitted `cost = pixels * (state * steps + frame * chunk_frames) + fixed` (bytes of peak RSS over the "
             f"process's baseline), per preset and op:\n\n```\n{table}\n```\n\n" + "\n".join(
                 f"- {key}: worst relative error of the fit {f['worst_relative_error']:.1%}"
                 for key, f in fits.items()))
    command = "python -m benchmarks.memory_calibration " + " ".join(sys.argv[1:])
    path = report.write("memory_calibration", command.strip(), {"fits": fits, "chunks": args.chunks}, rows, notes,
                        measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
