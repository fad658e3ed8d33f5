"""Calibrate the service's memory estimates (`service.memory.COSTS`) on one device kind:
the memory a streamed encode or decode adds, per pixel of the frame, per chunk frame and
per DDIM step, for each model preset.

Each measurement is a fresh process that builds the model (random weights: memory does
not depend on their values) on the device, in the dtype the service computes in there,
streams a tiny clip through the same functions the service runs (`media.encode_chunks` /
`media.decode_chunks`) so one-time allocations (thread pools, kernels) are in its
baseline, then streams `--chunks` chunks at the measured size. The cost is the rise of

- on the CPU (`--device cpu`, fp32): the process's peak RSS;
- on CUDA (`--device cuda`, bf16 on devices with bf16 tensor cores, else fp32):
  `torch.cuda.max_memory_allocated`, its peak reset after the warm-up. What the caching
  allocator reserves beyond its allocations and the CUDA context are not in it.
  Untested: no GPU.

A least-squares fit of

    cost = pixels * (state * steps + frame * chunk_frames) + fixed

over sizes, chunk lengths and steps gives the table to paste into service/memory.py.

The results key the fits by device kind, `cpu` or `cuda:<device name>` (allocations
differ with the GPU's kernels): `devices` in memory_calibration.json holds each kind's
latest fits with their dtype and provenance, and a run replaces only its own kind's entry.
The top level is the run that wrote the file: its device kind, dtype, fits and rows.

    .venv/bin/python -m benchmarks.memory_calibration [--presets tiny small base] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import numpy as np
import torch

from benchmarks import report
from media import decode_chunks, encode_chunks, latents_info, provenance
from model import CDTConfig, bf16_is_fast, build_model, content_hash
from training.distributed import DeviceError, resolve_device

try:
    from scipy.optimize import nnls
except ImportError:  # the bench extra: the measuring children and the argument checks run without it
    nnls = None

# The code these figures describe (`python -m benchmarks.run_all --stale`).
MEASURES = ["model/", "benchmarks/memory_calibration.py"]

# Sizes large enough that the per-pixel terms dominate the allocator's and kernels' noise
# (below ~128x128 the peak is not even monotonic in the area), within minutes on a CPU.
# A GPU runs the same sizes.
SIZES = {"tiny": [(128, 128), (256, 256), (256, 384)], "small": [(64, 64), (128, 128), (128, 192)],
         "base": [(64, 64), (96, 96)]}
CHUNKS = (4, 8)  # pixel frames per chunk
WARMUP_SIDE = 16


# What a measurement's cost is the rise of, per device type.
COST_MEASURE = {"cpu": "peak RSS over the process's baseline",
                "cuda": "torch.cuda.max_memory_allocated over the bytes allocated after the warm-up"}
# The keys of a device kind's entry besides its dtype (a file without `devices` holds them
# at its top level).
ENTRY_KEYS = ("chunks", "fits", "command", "commit", "date", "machine", "measures")


def calibration_dtype(device: torch.device) -> str:
    """The dtype the service computes in on `device`: bf16 where bf16 is fast on a GPU,
    fp32 on CPUs."""
    return "bf16" if device.type == "cuda" and bf16_is_fast(device) else "fp32"


def device_kind(device: torch.device) -> str:
    """What the fits are kept per: `cpu`, or `cuda:` and the GPU's name."""
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_meter(device: torch.device):
    """(start, peak): the bytes in use as measuring starts, and the peak since then. The
    CPU's peak RSS only rises, so starting it resets nothing. CUDA: untested, no GPU."""
    if device.type != "cuda":
        return peak_rss, peak_rss

    def start() -> int:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)

    def peak() -> int:
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)

    return start, peak


def stream(model, model_hash: str, op: str, height: int, width: int, chunk: int, chunks: int, steps: int) -> None:
    """Run the service's streamed encode or decode of `chunks` chunks of `chunk` frames,
    made on the host as the service's are (the streams move them to the model's device)."""
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


def measure_one(preset: str, op: str, height: int, width: int, chunk: int, steps: int, chunks: int,
                device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(CDTConfig.from_preset(preset), "cdt").set_precision(calibration_dtype(device))
    model = model.to(device).eval()
    model_hash = content_hash(model)
    start, peak = memory_meter(device)
    with torch.inference_mode():
        stream(model, model_hash, op, WARMUP_SIDE, WARMUP_SIDE, chunk, 3, steps)
        baseline = start()
        stream(model, model_hash, op, height, width, chunk, chunks, steps)
    return {"baseline": baseline, "peak": peak()}


def run_child(device: torch.device, *args) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory_calibration", "--device", str(device),
                          "--one", *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit(rows: list[dict]) -> dict:
    """Least squares with every coefficient >= 0 (a negative one would be noise)."""
    a = np.array([[r["pixels"] * r["steps"], r["pixels"] * r["chunk_frames"], 1.0] for r in rows])
    b = np.array([r["cost_bytes"] for r in rows], dtype=float)
    (state, frame, fixed), _ = nnls(a, b)
    worst = max(abs(a[i] @ (state, frame, fixed) - b[i]) / b[i] for i in range(len(rows)))
    return {"state": round(float(state), 1), "frame": round(float(frame), 1), "fixed": round(float(fixed)),
            "worst_relative_error": round(float(worst), 3)}


def device_fits(results: dict | None) -> dict[str, dict]:
    """The entries of every device kind a results file holds: dtype, chunks, fits and their
    provenance. A file without `devices` holds one CPU run in fp32 at its top level."""
    if results is None:
        return {}
    if "devices" in results:
        return results["devices"]
    return {"cpu": {"dtype": "fp32", **{key: results[key] for key in ENTRY_KEYS}}}


def with_device(results: dict | None, kind: str, entry: dict) -> dict[str, dict]:
    """The results file's device entries with `kind`'s replaced by `entry`."""
    return {**device_fits(results), kind: entry}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--chunks", type=int, default=3, help="chunks streamed per measurement")
    parser.add_argument("--device", default="cpu", help="cpu (default), or cuda or cuda:N (untested: no GPU)")
    parser.add_argument("--one", nargs=6, help=argparse.SUPPRESS)  # child: preset op height width chunk steps
    args = parser.parse_args()
    if args.one:
        preset, op, h, w, chunk, steps = args.one
        print(json.dumps(measure_one(preset, op, int(h), int(w), int(chunk), int(steps), args.chunks,
                                     torch.device(args.device))))
        return
    try:
        device = resolve_device(args.device)
    except DeviceError as exc:
        parser.error(str(exc))
    if nnls is None:
        parser.error("the fit needs scipy (the bench extra): pip install -e '.[bench]'")
    kind, dtype = device_kind(device), calibration_dtype(device)
    rows, fits = [], {}
    for preset in args.presets:
        for op in ("encode", "decode"):
            cases = [(h, w, c, 1) for h, w in SIZES[preset] for c in CHUNKS]
            if op == "decode":
                cases += [(h, w, CHUNKS[0], 2) for h, w in SIZES[preset][-2:]]
            op_rows = []
            for h, w, chunk, steps in cases:
                m = run_child(device, preset, op, h, w, chunk, steps)
                op_rows.append({"preset": preset, "op": op, "height": h, "width": w, "pixels": h * w,
                                "chunk_frames": chunk, "steps": steps, "cost_bytes": m["peak"] - m["baseline"],
                                "baseline_bytes": m["baseline"]})
                print(op_rows[-1], flush=True)
            fits[f"{preset}/{op}"] = fit(op_rows)
            rows += op_rows
    command = " ".join(["python -m benchmarks.memory_calibration", *sys.argv[1:]])
    entry = {"dtype": dtype, "chunks": args.chunks, "fits": fits, **provenance.record(command, MEASURES)}
    devices = with_device(report.load("memory_calibration"), kind, entry)
    table = "\n".join(f'    ("{key.split("/")[0]}", "{key.split("/")[1]}"): Cost(state={f["state"]}, '
                      f'frame={f["frame"]}, fixed={f["fixed"]}),' for key, f in fits.items())
    notes = (f"Device {kind}, {dtype}. Fitted `cost = pixels * (state * steps + frame * chunk_frames) + fixed` "
             f"(bytes of {COST_MEASURE[device.type]}), per preset and op:\n\n```\n{table}\n```\n\n" + "\n".join(
                 f"- {key}: worst relative error of the fit {f['worst_relative_error']:.1%}"
                 for key, f in fits.items())
             + "\n\nFits held per device kind (`devices` in memory_calibration.json):\n\n" + "\n".join(
                 f"- {name}: {held['dtype']}, commit {held['commit']}, {held['date']}"
                 for name, held in devices.items()))
    path = report.write("memory_calibration", command,
                        {"device": kind, "dtype": dtype, "fits": fits, "chunks": args.chunks, "devices": devices},
                        rows, notes, measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
