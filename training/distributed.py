"""The process's device and its place in a torchrun world.

`cdt train` on one process and `torchrun --nproc-per-node N [--nnodes M ...] -m cli.main
train` run the same code: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE, and each rank joins one process group, NCCL on CUDA and gloo on CPU.
Under torchrun, `--device cuda` means cuda:LOCAL_RANK on every rank.

A collective waits `CDT_COLLECTIVE_TIMEOUT_S` seconds (default 2 hours) for the other
ranks before the run aborts, on NCCL and gloo alike. It is long because with
`data.decode: "cache"` the other ranks of a machine wait at a barrier while its first rank
decodes every file into the cache, which takes about files x decode time / decode_workers;
NCCL's own default (10 minutes) aborts a run whose cache takes longer. Raise it for larger
sets, or use `data.decode: "stream"`, which has no such wait. The price of a long timeout
is that a rank that hangs (rather than dies: torchrun stops the run when a rank exits) is
noticed that late. It is an environment setting, not a config key, because the group is
joined before the run's config is read, and because it depends on the machine and the data
set, like `--threads` (torchrun passes the environment to every rank; a resumed run may
change it).

The CUDA paths (NCCL, device placement) are written to PyTorch's documented contract but
have not run on this repository's machines, which have no GPU.
"""

from __future__ import annotations

import datetime
import math
import os

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT_ENV = "CDT_COLLECTIVE_TIMEOUT_S"
DEFAULT_COLLECTIVE_TIMEOUT_S = 2 * 3600


class DeviceError(ValueError):
    """A device that this machine does not have; reported as one line."""


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(requested: str | None) -> torch.device:
    """`cuda`, `cuda:N` or `cpu`; None picks cuda when available. Under torchrun, `cuda`
    is cuda:LOCAL_RANK. Sets the current CUDA device."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise DeviceError(f"--device {requested}: not a device; use cuda, cuda:N or cpu") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"--device {requested}: only cuda and cpu are supported")
    if not torch.cuda.is_available():
        why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise DeviceError(f"--device {requested}: CUDA is not available here ({why}); use --device cpu")
    if device.index is None:
        device = torch.device("cuda", local_rank())
    elif world_size() > 1:
        raise DeviceError(f"--device {requested}: under torchrun give --device cuda (each rank takes cuda:LOCAL_RANK)")
    if device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {device}: only {torch.cuda.device_count()} GPUs are visible")
    torch.cuda.set_device(device)
    return device


def collective_timeout() -> datetime.timedelta:
    """How long a collective waits for the other ranks: `CDT_COLLECTIVE_TIMEOUT_S` seconds."""
    raw = os.environ.get(COLLECTIVE_TIMEOUT_ENV)
    if raw is None:
        return datetime.timedelta(seconds=DEFAULT_COLLECTIVE_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{COLLECTIVE_TIMEOUT_ENV}={raw!r}: must be a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the process group when started by torchrun."""
    world = world_size()
    if world > 1 and not dist.is_initialized():
        timeout = collective_timeout()
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device, timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is set on any rank (a collective: every rank must call it)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_to_all(obj) -> list:
    """Every rank's `obj`, in rank order (a collective)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
