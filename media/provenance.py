"""Where a measured figure comes from: the command, the commit, the machine and the date.

Every figure the docs quote (benchmarks, evaluations) is written with this record, so a
reader can tell which code on which CPU produced it, and `python -m benchmarks.run_all
--stale` can tell when the code it measured has changed since."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from model import bf16_is_fast

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name: our machines differ (AMD without bf16 arithmetic, AMD with
    AVX512-BF16, Intel with AMX), so every result names the one it was measured on."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def commit() -> str:
    """The repository's HEAD, marked `-dirty` when tracked files have uncommitted changes."""
    try:
        head = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def changed_since(measured_at: str, paths: list[str]) -> list[str]:
    """Commits after `measured_at` that touch `paths`: a figure measured there no longer
    describes the code. An unknown commit (or no paths recorded) counts as changed."""
    base = measured_at.removesuffix("-dirty")
    if not paths or base == "unknown":
        return ["(not recorded)"]
    try:
        return _git("log", "--format=%h %s", f"{base}..HEAD", "--", *paths).splitlines()
    except (OSError, subprocess.CalledProcessError):
        return [f"(commit {base} is not in this repository)"]


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": cpu_model(), "cores": os.cpu_count(), "bf16_hardware": bf16_is_fast()}


def accelerators() -> dict:
    """The CUDA build and cuDNN this torch carries, and the GPUs this process sees: name,
    compute capability and memory (no GPU: an empty list)."""
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"name": props.name, "capability": f"{props.major}.{props.minor}",
                         "memory_gib": round(props.total_memory / 2**30, 1)})
    return {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "gpus": gpus}


def record(command: str, measures: list[str]) -> dict:
    """The provenance of a result measured now: `measures` are the repository paths
    (files or folders) whose code the figure describes."""
    return {"command": command,
            "commit": commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
            "measures": sorted(measures)}
