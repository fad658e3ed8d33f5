"""Model speed: CDT-S against HunyuanVideo-VAE and Wan2.1-VAE, side by side in one process.

All three are built with random weights from their default configs (no download):
CDT `small`, diffusers' `AutoencoderKLHunyuanVideo()` and `AutoencoderKLWan()`. Each
repeat is one interleaved round over the models (encode then decode), so load from
other processes on the machine hits every model alike; reconstruct is that round's
encode + decode. FLOPs are counted by torch.utils.flop_counter on fake tensors (the same
modules, nothing computed), so achieved GFLOP/s = counted FLOPs / median seconds,
reported against the machine's conv3d peak measured here with a large conv3d.

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/python -m benchmarks.model_speed [--repeats 2] [--sizes 128 256] [--frames 17]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import report
from model import CDTConfig, bf16_is_fast, build_model

# The code these figures describe (`python -m benchmarks.run_all --stale`).
MEASURES = ["model/", "benchmarks/model_speed.py"]

BF16_UNAVAILABLE = "not measurable on this CPU"


class CDTRunner:
    name = "CDT-S (small)"

    def __init__(self) -> None:
        self.model = build_model(CDTConfig.from_preset("small"), "cdt").eval()

    def encode(self, video):
        return self.model.encode(video)

    def decode(self, latents):
        return self.model.decode(latents, steps=1, seed=0)

    def to(self, dtype):
        self.model.set_precision(dtype)


class DiffusersRunner:
    """A diffusers VAE: posterior mode on encode (as CDT returns its posterior mean)."""

    def __init__(self, cls) -> None:
        self.name = cls.__name__
        self.model = cls().eval()  # the default config; weights random, nothing downloaded
        self.dtype = torch.float32

    def encode(self, video):
        return self.model.encode(video.to(self.dtype)).latent_dist.mode()

    def decode(self, latents):
        return self.model.decode(latents.to(self.dtype)).sample.float()

    def to(self, dtype):
        if dtype != self.dtype:
            self.dtype = dtype
            self.model.to(dtype)


def conv3d_peak(repeats: int, dtype: torch.dtype) -> dict:
    """Best GFLOP/s of large conv3d layers, the kernels these models spend their time in."""
    best = {"gflops": 0.0}
    for channels, frames, side in ((128, 8, 64), (256, 8, 32)):
        x = torch.randn(1, channels, frames, side, side, dtype=dtype)
        w = torch.randn(channels, channels, 3, 3, 3, dtype=dtype)
        flops = 2 * channels * channels * 27 * frames * side * side  # padding=1 keeps the size
        with torch.inference_mode():
            seconds = report.median_time(lambda: F.conv3d(x, w, padding=1), repeats)
        if flops / seconds / 1e9 > best["gflops"]:
            best = {"gflops": flops / seconds / 1e9, "shape": f"{channels}ch {frames}x{side}x{side} k3"}
    return best


def count_flops(runner, frames: int, side: int) -> dict:
    """FLOPs of one encode and one decode, counted on fake tensors: shapes flow through
    the real modules but nothing is computed, so sizes too slow to time still get counted."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    video = mode.from_tensor(torch.empty(1, 3, frames, side, side))
    with mode, torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            latents = runner.encode(video)
        enc = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            runner.decode(latents)
        dec = counter.get_total_flops()
    return {"encode": enc, "decode": dec, "reconstruct": enc + dec}


def measure(runners, frames: int, side: int, repeats: int, warmup: int) -> dict:
    """Per model: median encode, decode and reconstruct seconds over interleaved rounds."""
    torch.manual_seed(0)
    video = torch.rand(1, 3, frames, side, side) * 2 - 1
    times = {r.name: {"encode": [], "decode": [], "reconstruct": []} for r in runners}
    with torch.inference_mode():
        for round_ in range(warmup + repeats):
            for r in runners:
                start = time.perf_counter()
                latents = r.encode(video)
                middle = time.perf_counter()
                r.decode(latents)
                end = time.perf_counter()
                if round_ >= warmup:
                    t = times[r.name]
                    t["encode"].append(middle - start)
                    t["decode"].append(end - middle)
                    t["reconstruct"].append(end - start)
    return {name: {op: {"seconds": statistics.median(v), "runs": v} for op, v in ops.items()}
            for name, ops in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="timed sizes")
    parser.add_argument("--project-sizes", type=int, nargs="*", default=[],
                        help="sizes only counted, their seconds projected from the GFLOP/s of the last timed size")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKLHunyuanVideo, AutoencoderKLWan  # the `bench` extra

    runners = [CDTRunner(), DiffusersRunner(AutoencoderKLHunyuanVideo), DiffusersRunner(AutoencoderKLWan)]
    cdt = runners[0].name
    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if bf16_is_fast() else {})}
    peaks = {name: conv3d_peak(max(args.repeats, 2), dtype) for name, dtype in dtypes.items()}
    results, rows = {}, []
    for dtype, torch_dtype in dtypes.items():
        for r in runners:
            r.to(torch_dtype)
        rate = {}  # (model, op) -> GFLOP/s at the last timed size, for projections
        for side in args.sizes + args.project_sizes:
            shape = f"{args.frames}x{side}x{side}"
            timed = side in args.sizes
            flops = {r.name: count_flops(r, args.frames, side) for r in runners}
            res = measure(runners, args.frames, side, args.repeats, args.warmup) if timed else {
                r.name: {op: {"seconds": flops[r.name][op] / 1e9 / rate[r.name, op]} for op in flops[r.name]}
                for r in runners}
            for r in runners:
                for op in res[r.name]:
                    res[r.name][op]["flops"] = flops[r.name][op]
            results[f"{dtype} {shape}"] = {"timed": timed, "models": res}
            for op in ("encode", "decode", "reconstruct"):
                for r in runners:
                    m = res[r.name][op]
                    gflops = m["flops"] / m["seconds"] / 1e9
                    if timed:
                        rate[r.name, op] = gflops
                    rows.append({"dtype": dtype, "shape": shape, "op": op, "model": r.name,
                                 "seconds": m["seconds"] if timed else f"~{m['seconds']:.0f} (projected)",
                                 "CDT speedup (x)": m["seconds"] / res[cdt][op]["seconds"],
                                 "GFLOP/call": m["flops"] / 1e9, "GFLOP/s": gflops,
                                 "% of conv3d peak": 100 * gflops / peaks[dtype]["gflops"]})
    bf16 = "measured" if "bf16" in dtypes else BF16_UNAVAILABLE
    last = results[f"fp32 {args.frames}x{args.sizes[-1]}x{args.sizes[-1]}"]["models"]
    round_s = sum(m["reconstruct"]["seconds"] for m in last.values())
    command = (f"python -m benchmarks.model_speed --repeats {args.repeats} --warmup {args.warmup} "
               f"--sizes {' '.join(map(str, args.sizes))}"
               + (f" --project-sizes {' '.join(map(str, args.project_sizes))}" if args.project_sizes else "")
               + f" --frames {args.frames} --threads {args.threads}")
    notes = (
        f"Medians of {args.repeats} interleaved rounds after {args.warmup} untimed warm-up round(s) per dtype, "
        f"torch.set_num_threads({args.threads}), random weights, batch 1; CDT decode is 1 DDIM step. "
        "Reconstruct = encode + decode in the same round. 'CDT speedup' = this model's seconds / CDT-S's "
        "seconds (> 1: CDT-S is faster). FLOPs are counted by torch.utils.flop_counter on fake tensors "
        "(same modules, no compute). conv3d peak here, each dtype's rows against their own: "
        + ", ".join(f"{name} {p['gflops']:.1f} GFLOP/s ({p['shape']})" for name, p in peaks.items()) + ".\n\n"
        + (f"Rows marked 'projected' were not timed: a round there costs about (side / {args.sizes[-1]})^2 "
           f"times a {args.sizes[-1]} round ({round_s:.0f} s here), times warm-up + repeats, too long for this "
           "shared 2-core CPU. Their seconds are the FLOPs counted at that size divided by the GFLOP/s each "
           "model achieved at the last timed size, so their speedups are FLOP-and-efficiency ratios, not "
           "measurements.\n\n" if args.project_sizes else "")
        + ("bf16: weights and activations in bf16 (CDT keeps its KL head and time embedding in fp32), on this "
           "CPU's AVX512-BF16/AMX kernels.\n\n" if "bf16" in dtypes else
           f"bf16: {BF16_UNAVAILABLE}: without AVX512-BF16/AMX PyTorch falls back to a scalar bf16 conv3d that is "
           "orders of magnitude slower than fp32 (benchmarks/results/precision.md), so a bf16 row would measure "
           "that fallback, not the models.\n\n")
        + "Caveat: on a 2-core machine shared with other jobs (a training run, here) absolute seconds are "
        "inflated and noisy, and '% of conv3d peak' (peak taken in a few seconds at the start) understates what "
        "an idle machine reaches; ratios come from interleaved rounds in one process."
    )
    data = {"frames": args.frames, "sizes": args.sizes, "project_sizes": args.project_sizes,
            "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads,
            "conv3d_peak": peaks, "bf16": bf16, "results": results}
    path = report.write("model_speed", command, data, rows, notes, measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
