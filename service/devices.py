"""The devices a replica computes on: which ones (CDT_DEVICES), the dtype they share, the CPU
threads each model thread takes, and which errors of a device are its own failure rather
than the request's.

CUDA paths here have not run on a GPU (none in this workplace); `scripts/gpu_check.sh`
checks them where one is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model import bf16_is_fast


class DeviceSetupError(ValueError):
    """CDT_DEVICES names a device this process cannot use."""


@dataclass(frozen=True)
class DeviceSlot:
    """One model thread's device. `name` labels its metrics and model card: the device itself,
    or `cpu/0`, `cpu/1`... when the CPU is listed more than once."""

    device: torch.device
    name: str
    threads: int | None  # torch intra-op threads of its model thread (None: torch's default)


def visible_gpus() -> list[torch.device]:
    if not torch.cuda.is_available():
        return []
    return [torch.device("cuda", index) for index in range(torch.cuda.device_count())]


def resolve(names: tuple[str, ...]) -> list[torch.device]:
    """CDT_DEVICES as devices: `cuda` expands to every visible GPU; unset means every visible
    GPU, else the CPU."""
    if not names:
        return visible_gpus() or [torch.device("cpu")]
    devices: list[torch.device] = []
    for name in names:
        if name == "cpu":
            devices.append(torch.device("cpu"))
            continue
        gpus = visible_gpus()
        if not gpus:
            why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise DeviceSetupError(f"CDT_DEVICES={','.join(names)}: CUDA is not available here ({why})")
        if name == "cuda":
            devices.extend(gpus)
        elif torch.device(name) in gpus:
            devices.append(torch.device(name))
        else:
            raise DeviceSetupError(f"CDT_DEVICES: {name} is not visible ({len(gpus)} GPUs: cuda:0..cuda:{len(gpus) - 1})")
    return devices


def slots(devices: list[torch.device]) -> list[DeviceSlot]:
    """One slot per device. Model threads on the CPU split its cores between them: each takes
    an equal share of torch's intra-op threads, at least one."""
    cpus = sum(device.type == "cpu" for device in devices)
    threads = max(1, torch.get_num_threads() // cpus) if cpus > 1 else None
    result, seen = [], 0
    for device in devices:
        if device.type == "cpu":
            name = "cpu" if cpus == 1 else f"cpu/{seen}"
            seen += 1
            result.append(DeviceSlot(device, name, threads))
        else:
            result.append(DeviceSlot(device, str(device), None))
    return result


def compute_dtype(requested: str | None, devices: list[torch.device]) -> str:
    """CDT_DTYPE, or unset: bf16 when every device is a GPU with fast bf16, else fp32. One dtype
    for all devices, because a session is pinned to the dtype it was created in. The CPU gets
    fp32 even where it has bf16 arithmetic: replicas of one deployment may run on different
    CPUs, and sessions fail over only between replicas of one dtype."""
    if requested is not None:
        return requested
    return "bf16" if all(d.type == "cuda" and bf16_is_fast(d) for d in devices) else "fp32"


# Stream pushes a device runs as one batch at most, by device kind, unless CDT_BATCH_MAX says.
# cpu: 8 sessions' same-shape chunks batched gave 2.2-2.4x the throughput of one at a time
# (`python -m benchmarks.batching`, benchmarks/results/batching.md). cuda: not measured here
# (no GPU); 8 because a GPU runs one 4-frame chunk far below its width, and the throughput
# table of scripts/gpu_check.sh measures it per model and device.
DEFAULT_BATCH_MAX = {"cpu": 8, "cuda": 8}


def batch_max(requested: int | None, device: torch.device) -> int:
    """CDT_BATCH_MAX, or the device kind's default (1, no batching, for a kind without one)."""
    return requested if requested is not None else DEFAULT_BATCH_MAX.get(device.type, 1)


def is_out_of_memory(exc: BaseException) -> bool:
    """The device could not allocate what the job needed: the job fails, the device is fine."""
    return isinstance(exc, torch.OutOfMemoryError)


def is_device_failure(exc: BaseException) -> bool:
    """An error of the accelerator itself (an illegal access, an ECC error, a lost device):
    CUDA's errors are sticky, so the device's context is unusable for every later job.
    torch raises them as `torch.AcceleratorError`."""
    return isinstance(exc, torch.AcceleratorError)


def release_device_cache(device: torch.device) -> None:
    """Give the blocks a failed job left in the caching allocator back to the device."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.empty_cache()
