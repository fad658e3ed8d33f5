"""How a step computes, apart from what it computes: bf16 autocast over fp32 master
weights, TF32 on CUDA, `torch.compile`, activation checkpointing, and a short
torch.profiler trace.

None of these change the arithmetic's meaning: the weights, AdamW moments and EMA stay
float32, autocast runs the convolutions in bf16 (the model keeps its KL head and time
embedding in fp32), activation checkpointing recomputes each ResnetBlock's activations in
the backward pass instead of storing them (same gradients, tested on CPU). The model's
layers already keep activations channels-last (model/layers.py); nothing is added here.
TF32 and the CUDA side of compile and autocast have not run here (no GPU).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from model import ResnetBlock

# The profiler skips one step (kernels are built at each new shape), warms up for one and
# records this many.
PROFILE_STEPS = 3


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def allow_tf32() -> None:
    """fp32 matmuls and convolutions (those outside autocast) may use TF32 tensor cores.

    Set through the `allow_tf32` flags: torch's own readers use both APIs (inductor keys its
    autotuning cache on `torch.get_float32_matmul_precision()`, dynamo reads the cuBLAS flag,
    others read `fp32_precision`), and only these setters keep both views readable: once
    `fp32_precision` has been set, the legacy getters raise (torch 2.13)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def checkpoint_activations(model: torch.nn.Module) -> int:
    """Recompute every ResnetBlock's activations in the backward pass; returns how many.

    The block's `forward` is wrapped on the instance, so the state-dict keys and the
    module types that the model and its checkpoints rely on stay as they are."""
    blocks = [m for m in model.modules() if isinstance(m, ResnetBlock)]
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block.forward)
    return len(blocks)


def _checkpointed(forward, x, temb=None, cache=None):
    if cache is not None or not torch.is_grad_enabled():  # streaming and inference: nothing to save
        return forward(x, temb, cache)
    return checkpoint(forward, x, temb, use_reentrant=False)


def compile_model(model: torch.nn.Module) -> None:
    """`torch.compile` each top-level part (encoder, adapter, U-Net / VAE decoder) in
    place: the parameters and their names stay those of the model."""
    for part in model.children():
        part.compile()


class StepProfiler:
    """A torch.profiler trace of a few steps, written to `out_dir` by rank 0 as a Chrome
    trace (chrome://tracing, Perfetto) and a table of the costliest operators."""

    def __init__(self, out_dir: Path, device: torch.device, enabled: bool) -> None:
        self.out_dir = Path(out_dir)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        self._profile = torch.profiler.profile(
            activities=activities, schedule=torch.profiler.schedule(wait=1, warmup=1, active=PROFILE_STEPS),
            on_trace_ready=self._write, record_shapes=True, profile_memory=True,
        ) if enabled else None

    def _write(self, profile) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        profile.export_chrome_trace(str(self.out_dir / "trace.json"))
        table = profile.key_averages().table(sort_by=self.sort_by, row_limit=25)
        (self.out_dir / "operators.txt").write_text(table + "\n")

    def __enter__(self) -> "StepProfiler":
        if self._profile is not None:
            self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._profile is not None:
            self._profile.__exit__(*exc)

    def step(self) -> None:
        if self._profile is not None:
            self._profile.step()
