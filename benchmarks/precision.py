"""Compute dtype and memory format, measured side by side in one run.

Reconstruct (encode + 1-step decode) of a random-init model:
- fp32 contiguous vs fp32 channels_last_3d, at --frames x --size^2;
- fp32 vs bf16 at a small size (--bf16-size): on CPUs without AVX512-BF16/AMX
  PyTorch falls back to a scalar bf16 convolution that is orders of magnitude slower,
  so the large size would take hours.

    .venv/bin/python -m benchmarks.precision [--preset tiny] [--frames 17] [--size 128]
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks import report
from model import CDTConfig, build_model


def reconstruct_fn(model, video):
    def run():
        with torch.inference_mode():
            model.decode(model.encode(video), steps=1, seed=0)
    return run


def cpu_has_bf16() -> bool:
    flags = open("/proc/cpuinfo").read() if sys.platform.startswith("linux") else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--bf16-frames", type=int, default=5)
    parser.add_argument("--bf16-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(CDTConfig.from_preset(args.preset), "cdt").eval()
    video = torch.rand(1, 3, args.frames, args.size, args.size) * 2 - 1
    rows = []

    contiguous = report.median_time(reconstruct_fn(model, video), args.repeats)
    model.to(memory_format=torch.channels_last_3d)
    channels_last = report.median_time(
        reconstruct_fn(model, video.contiguous(memory_format=torch.channels_last_3d)), args.repeats)
    model.to(memory_format=torch.contiguous_format)
    shape = f"{args.frames}x{args.size}x{args.size}"
    rows.append({"case": "fp32 contiguous", "shape": shape, "seconds": contiguous, "speedup": 1.0})
    rows.append({"case": "fp32 channels_last_3d", "shape": shape, "seconds": channels_last,
                 "speedup": contiguous / channels_last})

    small = torch.rand(1, 3, args.bf16_frames, args.bf16_size, args.bf16_size) * 2 - 1
    fp32 = report.median_time(reconstruct_fn(model, small), args.repeats)
    model.set_precision("bf16")
    bf16 = report.median_time(reconstruct_fn(model, small), args.repeats)
    small_shape = f"{args.bf16_frames}x{args.bf16_size}x{args.bf16_size}"
    rows.append({"case": "fp32", "shape": small_shape, "seconds": fp32, "speedup": 1.0})
    rows.append({"case": "bf16 (weights+activations, KL head and time embedding fp32)", "shape": small_shape,
                 "seconds": bf16, "speedup": fp32 / bf16})

    has_bf16 = cpu_has_bf16()
    notes = (f"CPU advertises AVX512-BF16/AMX: **{has_bf16}** "
             f"(`torch.ops.mkldnn._is_mkldnn_bf16_supported()` = {torch.ops.mkldnn._is_mkldnn_bf16_supported()}). "
             "Speedup > 1 means faster than the row's fp32 reference; medians of "
             f"{args.repeats} runs after a warm-up.")
    command = "python -m benchmarks.precision " + " ".join(sys.argv[1:])
    path = report.write("precision", command.strip(), {"preset": args.preset, "cpu_bf16": has_bf16}, rows, notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
