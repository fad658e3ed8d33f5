"""Compute dtype and memory format, measured side by side in one run.

Reconstruct (encode + 1-step decode) of a random-init model, each case against fp32
contiguous at the same shape:
- fp32 channels_last_3d, at --frames x --size^2;
- bf16 (and bf16 channels_last_3d, the layout oneDNN's AMX kernels prefer) at the same
  shape when the CPU has bf16 arithmetic (AVX512-BF16/AMX). Without it PyTorch falls
  back to a scalar bf16 convolution that is orders of magnitude slower, so bf16 is then
  measured at a small size (--bf16-frames x --bf16-size^2) instead.

    .venv/bin/python -m benchmarks.precision [--preset tiny] [--frames 17] [--size 128]
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks import report
from model import CDTConfig, bf16_is_fast, build_model

# The code these figures describe (`python -m benchmarks.run_all --stale`).
MEASURES = ["model/", "benchmarks/precision.py"]


def reconstruct_fn(model, video):
    def run():
        with torch.inference_mode():
            model.decode(model.encode(video), steps=1, seed=0)
    return run


def measure(model, video, repeats: int, layout) -> float:
    model.to(memory_format=layout)
    seconds = report.median_time(reconstruct_fn(model, video.contiguous(memory_format=layout)), repeats)
    model.to(memory_format=torch.contiguous_format)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--bf16-frames", type=int, default=5, help="bf16 shape on CPUs without bf16 arithmetic")
    parser.add_argument("--bf16-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(CDTConfig.from_preset(args.preset), "cdt").eval()
    has_bf16 = bf16_is_fast()
    frames, size = (args.frames, args.size) if has_bf16 else (args.bf16_frames, args.bf16_size)
    cases = [("fp32", torch.channels_last_3d, args.frames, args.size), ("bf16", torch.contiguous_format, frames, size)]
    if has_bf16:
        cases.append(("bf16", torch.channels_last_3d, frames, size))
    layout_name = {torch.contiguous_format: "contiguous", torch.channels_last_3d: "channels_last_3d"}
    reference: dict[tuple[int, int], float] = {}  # fp32 contiguous seconds per shape
    rows = []
    for dtype, layout, t, side in cases:
        video = torch.rand(1, 3, t, side, side) * 2 - 1
        shape = f"{t}x{side}x{side}"
        if (t, side) not in reference:
            model.set_precision("fp32")
            reference[t, side] = measure(model, video, args.repeats, torch.contiguous_format)
            rows.append({"case": "fp32 contiguous", "shape": shape, "seconds": reference[t, side], "speedup": 1.0})
        model.set_precision(dtype)
        seconds = measure(model, video, args.repeats, layout)
        label = f"{dtype} {layout_name[layout]}" + (" (KL head and time embedding fp32)" if dtype == "bf16" else "")
        rows.append({"case": label, "shape": shape, "seconds": seconds, "speedup": reference[t, side] / seconds})

    notes = (f"CPU has bf16 arithmetic (AVX512-BF16/AMX, `torch.ops.mkldnn._is_mkldnn_bf16_supported()`): "
             f"**{has_bf16}**. "
             "Speedup > 1 means faster than fp32 contiguous at the same shape; medians of "
             f"{args.repeats} runs after a warm-up, torch.set_num_threads({torch.get_num_threads()}).")
    command = "python -m benchmarks.precision " + " ".join(sys.argv[1:])
    path = report.write("precision", command.strip(), {"preset": args.preset, "cpu_bf16": has_bf16}, rows, notes,
                        measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
