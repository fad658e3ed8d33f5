"""A run's EMA weights as a served checkpoint, with how they were trained beside them.

The checkpoint is `model.save_pretrained`'s directory, the one `from_pretrained`, `cdt
serve` and every `cdt` command load. `training.json` beside it records the run's
resolved config, a data summary (inputs, data position, skipped files) and each
(re)start's step, world size, device and commit, with the content hash of the weights it
describes; like `receptive_field.json` it stays outside the hash, and loading ignores it.
"""

from __future__ import annotations

import json
from pathlib import Path

from model import build_model, save_pretrained

from .config import TrainingConfig
from .state import load_state, read_run_config

TRAINING_FILE = "training.json"
TRAINING_FORMAT = "cdt-training-record"
TRAINING_VERSION = 1
# Unreadable files named in the record (all are counted).
LISTED_UNREADABLE = 20


def export(run_dir: str | Path, out_dir: str | Path, dtype: str = "bf16") -> dict:
    """Write the run's EMA weights as a served checkpoint (`from_pretrained` loads it)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config = read_run_config(run_dir)
    state = load_state(run_dir)
    model = build_model(config.model.cdt_config(), config.model.kind)
    model.load_state_dict(state["ema"])
    digest = save_pretrained(model.eval(), out_dir, dtype=dtype).content_hash
    record = training_record(config, state, digest)
    (out_dir / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return {"checkpoint": str(out_dir), "run": str(run_dir), "step": state["step"], "kind": model.kind,
            "preset": config.model.preset, "dtype": dtype, "hash": digest}


def training_record(config: TrainingConfig, state: dict, digest: str) -> dict:
    data = state["data"]
    unreadable = sorted(data["unreadable"].items())
    summary = {**data["inputs"], "decode": config.data.decode, "short_side": config.data.short_side,
               "max_frames": config.data.max_frames, "samples_drawn": data["cursor"],
               "epochs": {pool: round(data["cursor"][pool] / n, 3) for pool, n in
                          (("video", data["inputs"]["videos"]), ("image", data["inputs"]["images"])) if n},
               "replaced_samples": data["replaced"], "unreadable_files": len(unreadable),
               "unreadable_examples": dict(unreadable[:LISTED_UNREADABLE])}
    return {"format": TRAINING_FORMAT, "version": TRAINING_VERSION, "model_hash": digest, "step": state["step"],
            "total_steps": config.total_steps, "world": state["world"],
            "wall_seconds": round(state["wall_seconds"], 1), "starts": state["starts"], "config": config.to_data(),
            "data": summary}
