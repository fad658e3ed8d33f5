"""Where CDT reconstruct spends its time: torch.profiler's top operators by self time.

It backs the model-speed reading in docs/model.md (time outside the convolutions: the
causal time padding's `cat`, attention, PyTorch's slow conv path).

    .venv/bin/python -m benchmarks.profile_cdt [--preset small] [--frames 9] [--size 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import report
from model import CDTConfig, build_model

# The code these figures describe (`python -m benchmarks.run_all --stale`).
MEASURES = ["model/", "benchmarks/profile_cdt.py"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(CDTConfig.from_preset(args.preset), "cdt").eval()
    video = torch.rand(1, 3, args.frames, args.size, args.size) * 2 - 1
    with torch.inference_mode():
        model.decode(model.encode(video), steps=1, seed=0)  # warm-up: oneDNN builds its kernels
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.decode(model.encode(video), steps=1, seed=0)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows = [{"operator": e.key, "calls": e.count, "self seconds": e.self_cpu_time_total / 1e6,
             "share of total": f"{100 * e.self_cpu_time_total / total:.1f}%"} for e in events[: args.top]]
    notes = (f"Reconstruct (encode + 1-step decode) of a random-init CDT `{args.preset}`, "
             f"{args.frames}x{args.size}x{args.size}, fp32, torch.set_num_threads({args.threads}), one profiled "
             "run after a warm-up. Convolutions are `mkldnn_convolution` and `slow_conv3d_forward` (PyTorch's "
             "reference path, taken for small inputs); `cat` is the causal time padding.")
    command = "python -m benchmarks.profile_cdt " + " ".join(sys.argv[1:])
    path = report.write("profile_cdt", command.strip(), vars(args), rows, notes, measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
