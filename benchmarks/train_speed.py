"""Training step cost: tiny CDT against the tiny VAE baseline, fp32 against bf16 autocast.

One step is what `training.trainer` does per optimizer step: the objective's forward
and backward, gradient clipping and an AdamW step, on random clips of a stage's shape.
CDT and VAE steps alternate within each round, so both see the same machine load; the
table reports median wall seconds and median CPU seconds (process time, all threads)
per step. bf16 autocast is compared at both stages' shapes where the CPU has bf16
arithmetic, else at a small shape: without AVX512-BF16/AMX the CPU falls back to a
scalar bf16 convolution (benchmarks/results/precision.md).

    .venv/bin/python -m benchmarks.train_speed [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks import report
from model import CDTConfig, bf16_is_fast, build_model
from training.config import LossSection
from training.losses import Objective

# The code these figures describe (`python -m benchmarks.run_all --stale`).
MEASURES = ["model/", "training/", "benchmarks/train_speed.py"]


class Step:
    """One optimizer step of a fresh tiny model of `kind` on (batch, 3, frames, crop, crop)."""

    def __init__(self, kind: str, batch: int, frames: int, crop: int, bf16: bool = False) -> None:
        torch.manual_seed(0)
        self.model = build_model(CDTConfig.from_preset("tiny"), kind).train()
        self.objective = Objective(self.model, LossSection())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.video = torch.rand(batch, 3, frames, crop, crop) * 2 - 1
        self.bf16 = bf16
        self.calls = 0
        self.nonfinite = 0  # steps whose gradient norm was inf/NaN (the trainer skips those)

    def __call__(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds) of one step."""
        wall, cpu = time.perf_counter(), time.process_time()
        gen = torch.Generator().manual_seed(self.calls)
        self.calls += 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss, _ = self.objective(self.video, gen)
        loss.backward()
        self.nonfinite += not torch.isfinite(torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)).item()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(steps: dict[str, Step], repeats: int) -> dict[str, dict]:
    """Median wall/CPU seconds per step, one untimed warm-up step each (oneDNN builds
    its kernels once per shape), then `repeats` rounds over all cases."""
    for step in steps.values():
        step()
    samples = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            samples[name].append(step())
    return {name: {"wall": statistics.median(s[0] for s in runs), "cpu": statistics.median(s[1] for s in runs),
                   "non-finite grads": f"{steps[name].nonfinite} of {steps[name].calls}"}
            for name, runs in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16-repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # The stage shapes of training/configs/tiny_{cdt,vae}.json.
    rows = []

    def add_rows(label: str, shape: tuple[int, int, int, int], res: dict, base: str) -> None:
        for name, r in res.items():
            rows.append({"case": f"{label}, {name}", "shape": "x".join(map(str, shape)), "wall s/step": r["wall"],
                         "CPU s/step": r["cpu"], "ratio": r["wall"] / res[base]["wall"],
                         "non-finite grads": r["non-finite grads"]})

    for label, shape in (("stage 1", (4, 9, 64, 64)), ("stage 2", (2, 17, 96, 96))):
        add_rows(label, shape, interleaved({f"{kind}, fp32": Step(kind, *shape[:3]) for kind in ("cdt", "vae")},
                                           args.repeats), "cdt, fp32")
    # Where bf16 is slow (no AVX512-BF16/AMX) a stage-sized bf16 step would take minutes.
    # Both stages mix in batches of 1-frame images, so both clip lengths are measured.
    shapes = (("stage 1", (4, 9, 64, 64)), ("stage 1 images", (4, 1, 64, 64)), ("stage 2", (2, 17, 96, 96)),
              ("stage 2 images", (2, 1, 96, 96))) if bf16_is_fast("cpu") else (("small", (1, 5, 32, 32)),)
    for label, shape in shapes:
        steps = {"cdt, fp32": Step("cdt", *shape[:3]), "cdt, bf16 autocast": Step("cdt", *shape[:3], bf16=True)}
        add_rows(label, shape, interleaved(steps, args.bf16_repeats), "cdt, fp32")

    notes = (f"torch.set_num_threads({args.threads}); medians of {args.repeats} interleaved steps "
             f"({args.bf16_repeats} for the bf16 pairs) after one warm-up step each. 'ratio' is wall seconds "
             "relative to the first row of its group (CDT fp32): > 1 is slower. A step = forward + backward + "
             "clip + AdamW, random clips, random init; data loading and EMA are not included. CPU s/step "
             "above wall s/step means the threads ran in parallel. 'non-finite grads': steps whose gradient norm "
             "was inf/NaN, out of all steps run (warm-up included); the trainer skips those updates.")
    command = "python -m benchmarks.train_speed " + " ".join(sys.argv[1:])
    path = report.write("train_speed", command.strip(), {"threads": args.threads, "repeats": args.repeats}, rows,
                        notes, measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
