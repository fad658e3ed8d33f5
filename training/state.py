"""A run directory's files: the resolved config, the checkpoint (`state.pt`) and the log.

The checkpoint holds what exact resume needs beyond the step counter: weights, EMA,
AdamW moments, the global RNG states (for anything that draws from them), the data
position (training/sampling.py) and the data report (skipped files), and the world size
it was written by.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from .config import TrainingConfig

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"


def read_run_config(run_dir: Path) -> TrainingConfig:
    """The run's config over today's defaults: a run directory written before an option
    existed resumes with that option's default, which keeps its old behaviour."""
    path = Path(run_dir) / CONFIG_FILE
    return TrainingConfig.from_data(json.loads(path.read_text()), str(path))


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def save_state(run_dir: Path, state: dict) -> None:
    tmp = run_dir / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(run_dir / STATE_FILE)  # atomic: a kill mid-save keeps the previous state


def load_state(run_dir: Path) -> dict:
    # weights_only: the state holds tensors and plain Python data, nothing to unpickle.
    return torch.load(Path(run_dir) / STATE_FILE, map_location="cpu", weights_only=True)


def truncate_log(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint: a killed run redoes those steps on resume."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(row + "\n" for row in rows))
