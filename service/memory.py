"""Memory a whole-clip request costs, and the budget of each device that admits requests.

A whole-clip request streams through the model in chunks, so what it holds is its
FeatureCache (which grows with the frame area, and for decode with the DDIM steps) plus
the activations of one chunk (frame area times chunk frames), never the clip: its cost
depends on H x W, not on T. `COSTS` gives, per model preset and operation, the bytes of
peak RSS added per pixel of the padded frame:

    bytes = pixels * (state * steps + frame * chunk_frames) + fixed

(`steps` is 1 for encode). The figures are measured, not derived: the fresh-process
peak RSS of streamed runs at several sizes, chunk lengths and steps, fitted by least
squares, by `python -m benchmarks.memory_calibration` (benchmarks/results/
memory_calibration.json records its command, commit, CPU and date). A measured
estimate is then multiplied by `SAFETY`.

Admission: a request whose estimate at the smallest chunk can never fit the budget gets
413 `clip_too_large` with the estimate and the largest frame that fits. Otherwise it
takes the largest chunk up to `MAX_CHUNK_FRAMES` that fits, and reserves its estimate
for its lifetime; a request that fits alone but not beside the running ones waits in
the queue (its admission slot counts toward the queue limit) until memory is released.
A session chunk is admitted the same way at the length its sender chose (its stream's
cache is counted in the hot-session budget, CDT_SESSION_HOT_MB, outside this one).
Each device has its own budget and its own device kind's costs (`MemoryModel`); each served
model is planned with its own preset's costs and chunked in whole groups of its own
`time_factor` frames, in the one budget of the device that runs it. A grown model (8x, 16x
in time) is planned with its preset's costs: the calibration measured the 4x presets only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from model import SPACE_FACTOR, TIME_FACTOR, CDTConfig

from .domain_errors import TooLarge

if TYPE_CHECKING:
    import torch

# Headroom over the fitted estimate: the measured peak exceeds its fit by at most 32% of
# itself (small encode at 64x64; tiny 14-17%, base under 10%), i.e. by 1.46x the fit
# (benchmarks/results/memory_calibration.md).
SAFETY = 1.5
# Pixel frames per chunk: at 8, requests run as fast per frame as one-call whole clips
# (benchmarks/results/request_memory.md), so longer chunks would only cost memory. A chunk
# is a whole number of the model's frame groups (`time_factor` frames), so a model of
# more than 8 frames per latent frame takes one group a chunk.
MAX_CHUNK_FRAMES = 8
MIN_CHUNK_FRAMES = TIME_FACTOR  # the 4x presets' shortest chunk, one group
# Used when the budget cannot be read from the machine.
FALLBACK_BUDGET_BYTES = 4 << 30


@dataclass(frozen=True)
class Cost:
    """Peak RSS bytes a streamed request adds: per pixel of its feature cache (per DDIM
    step for decode), per pixel per frame of its chunk in flight, and a constant."""

    state: float
    frame: float
    fixed: float


# Measured by `python -m benchmarks.memory_calibration`, per device kind; keyed by (preset, op).
# Presets not listed use the costliest listed preset's. A device kind with no table has no
# fit: its requests run one at a time (`MemoryModel`), because another kind's fit says nothing
# of its memory (CUDA keeps bf16 activations, cuDNN workspaces and a caching allocator where
# the CPU fit measured fp32 RSS).
COSTS: dict[str, dict[tuple[str, str], Cost]] = {
    "cpu": {  # fp32
        ("tiny", "encode"): Cost(state=893.4, frame=516.9, fixed=140666503),
        ("tiny", "decode"): Cost(state=1436.1, frame=1076.0, fixed=192357625),
        ("small", "encode"): Cost(state=0.0, frame=1195.9, fixed=64272699),
        ("small", "decode"): Cost(state=8546.0, frame=4671.7, fixed=38674204),
        ("base", "encode"): Cost(state=0.0, frame=4614.6, fixed=56710772),
        ("base", "decode"): Cost(state=28073.1, frame=10015.3, fixed=0),
    },
}


def cost_for(preset: str, op: str, device_kind: str = "cpu") -> Cost | None:
    """The fitted cost of `op` on `preset` on a device of `device_kind`; None without a fit."""
    costs = COSTS.get(device_kind)
    if costs is None:
        return None
    if (preset, op) in costs:
        return costs[(preset, op)]
    return max((c for (p, o), c in costs.items() if o == op), key=lambda c: c.state + c.frame)


def estimate_bytes(cost: Cost, pixels: int, chunk_frames: int, steps: int = 1) -> int:
    return math.ceil(SAFETY * (pixels * (cost.state * steps + cost.frame * chunk_frames) + cost.fixed))


@dataclass(frozen=True)
class Plan:
    """How a request runs: pixel frames per chunk, and the memory it reserves."""

    chunk_frames: int
    bytes: int


def padded_pixels(height: int, width: int) -> int:
    return (-(-height // SPACE_FACTOR) * SPACE_FACTOR) * (-(-width // SPACE_FACTOR) * SPACE_FACTOR)


def chunk_lengths(time_factor: int) -> range:
    """The chunk lengths (pixel frames) a whole-clip request may stream in, longest first:
    whole groups of `time_factor` frames, up to MAX_CHUNK_FRAMES or one group."""
    longest = max(MAX_CHUNK_FRAMES // time_factor, 1) * time_factor
    return range(longest, time_factor - 1, -time_factor)


def plan(cost: Cost, budget: int, height: int, width: int, steps: int = 1, time_factor: int = TIME_FACTOR) -> Plan:
    """The longest chunk (`chunk_lengths`) whose estimate fits `budget`; 413 when not even
    the shortest does, with the largest square frame that would."""
    pixels = padded_pixels(height, width)
    lengths = chunk_lengths(time_factor)
    for chunk in lengths:
        need = estimate_bytes(cost, pixels, chunk, steps)
        if need <= budget:
            return Plan(chunk, need)
    raise too_large(cost, budget, height, width, lengths[-1], steps)


def chunk_bytes(cost: Cost, budget: int, height: int, width: int, frames: int, steps: int = 1) -> int:
    """The estimate of a chunk of `frames` frames given by its sender (a session chunk);
    413 when it cannot fit `budget`."""
    need = estimate_bytes(cost, padded_pixels(height, width), frames, steps)
    if need > budget:
        raise too_large(cost, budget, height, width, frames, steps)
    return need


class MemoryModel:
    """How a device admits work into its budget: by the fitted costs of its device kind, for
    each model by its own preset's costs and frames rule, or, without a fit, one job's worth
    at a time: each request reserves the whole budget and streams in the shortest chunks, so
    requests on the device run one after another and a job that still does not fit fails as
    `device_out_of_memory`, not the process."""

    def __init__(self, device_kind: str, budget: int) -> None:
        self.budget, self.device_kind = budget, device_kind
        self.fitted = device_kind in COSTS

    def plan(self, config: CDTConfig, op: str, height: int, width: int, steps: int = 1) -> Plan:
        """How a whole-clip request of a model of `config` runs here."""
        if not self.fitted:
            return Plan(config.time_factor, self.budget)
        return plan(self._cost(config, op), self.budget, height, width, steps, config.time_factor)

    def chunk_bytes(self, config: CDTConfig, op: str, height: int, width: int, frames: int, steps: int = 1) -> int:
        if not self.fitted:
            return self.budget
        return chunk_bytes(self._cost(config, op), self.budget, height, width, frames, steps)

    def _cost(self, config: CDTConfig, op: str) -> Cost:
        return cost_for(config.preset, op, self.device_kind)


def too_large(cost: Cost, budget: int, height: int, width: int, frames: int, steps: int) -> TooLarge:
    need = estimate_bytes(cost, padded_pixels(height, width), frames, steps)
    per_pixel = cost.state * steps + cost.frame * frames
    max_pixels = max(0, int((budget / SAFETY - cost.fixed) / per_pixel))
    side = int(math.isqrt(max_pixels)) // SPACE_FACTOR * SPACE_FACTOR
    return TooLarge(
        f"{frames} frames of {height}x{width} need about {need / 2**20:.0f} MiB to stream (steps={steps}); this "
        f"replica's memory budget is {budget / 2**20:.0f} MiB (CDT_MEMORY_BUDGET_MB). The largest frame that fits "
        f"is {max_pixels} pixels, e.g. {side}x{side}", code="clip_too_large",
        details={"estimate_bytes": need, "budget_bytes": budget, "max_pixels": max_pixels, "max_square_side": side})


# glibc's mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Blocks from 32 MiB up are mmapped and unmapped whole, smaller ones come from the heap:
# glibc's own range, fixed at its top. Left dynamic, the threshold rises toward it as large
# blocks are freed, so a long stream's allocations move onto the heap chunk after chunk and
# its peak keeps rising. A fixed 128 KiB threshold held the peak flatter but slowed
# decoding down (every activation a freshly zeroed mapping).
_MMAP_THRESHOLD = 32 << 20


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def configure_allocator() -> None:
    """Make the C allocator's footprint follow the work, not its history (glibc only; a
    no-op elsewhere): a fixed mmap threshold, and one arena, since the model runs in one
    thread and per-thread arenas each keep their own free memory."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        _LIBC.mallopt(_M_ARENA_MAX, 1)


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim): run after every
    model job, so what one chunk freed does not stay resident, fragmented, into the next."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def machine_memory_bytes() -> int | None:
    """The memory this process may use: its cgroup's limit, else the machine's RAM."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # cgroup v1 writes a huge number for "no limit"
            return int(text)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def resident_bytes() -> int:
    """This process's current resident set size."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def default_budget(device: torch.device, hot_sessions: int, cpu_workers: int = 1) -> int:
    """Requests may use 80% of what the device holds beyond what is already resident (the
    loaded models, the runtime) and what the device's hot session streams may take; model
    threads sharing the CPU share its memory equally. On CUDA, the device's free memory
    (untested here: no GPU)."""
    if device.type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return max(0, int(0.8 * free) - hot_sessions)
    total = machine_memory_bytes()
    if total is None:
        return FALLBACK_BUDGET_BYTES // cpu_workers
    return max(0, int(0.8 * (total - resident_bytes())) // cpu_workers - hot_sessions)
