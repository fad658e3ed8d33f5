"""Training options as plain data: a nested dict of defaults, a JSON file deep-merged on
top, then `section.key=value` overrides from the command line.

A run is a list of stages (the paper's two-stage recipe): each stage runs for `steps`
optimizer steps with its own clip shape, batch and LPIPS weight; the optimizer, EMA and
LR schedule run across all of them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

# The shared clips sit beside the repository (../shared), wherever it is cloned.
SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"

DEFAULTS: dict[str, Any] = {
    "name": "run",
    "seed": 0,
    # init_from: a checkpoint directory whose weights start a new run (model and EMA), e.g.
    # the shipped checkpoint when the run directory that made it is gone.
    "model": {"preset": "tiny", "kind": "cdt", "init_from": None},
    "data": {
        # Inputs come from `manifest` (TSV/CSV/JSONL rows of the split, training/sources.py)
        # or, if set, from `videos` / `val_videos`: lists of video and image files or folders.
        "manifest": str(SHARED_VIDEOS / "MANIFEST.tsv"),
        "videos": None,
        "val_videos": None,
        # "stream": DataLoader workers decode each clip's frames (any data set size);
        # "cache": each file decoded once into a .npy in cache_dir (small sets). Same clips.
        "decode": "stream",
        "cache_dir": "runs/_cache",
        "short_side": 192,  # files are seen at this short side; crops are cut from it
        "max_frames": 300,  # first frames of a video that clips come from: bounds decode time
        "max_stride": 3,  # temporal stride drawn from 1..max_stride (variable fps)
        "min_region": 1.0,  # smallest crop region, as a multiple of the crop size
        # Share of clips whose RGB channels are randomly reordered: widens a small set's
        # colour range (a clip of saturated blue is rare in ours) at no decode cost.
        "channel_permute": 0.0,
        "workers": 1,  # DataLoader workers cutting (and, streamed, decoding) clips, per rank
        "decode_workers": 2,  # processes decoding videos into the cache
    },
    "loss": {
        "kl_weight": 1e-6,  # on the per-item KL sum divided by pixel elements (LDM's balance)
        "snr_min": 1.0,
        "snr_max": 5.0,
        "terminal_fraction": 0.25,  # batch items trained at t=T-1 on x_T = noise_scale*eps
        # LPIPS backbone (+ optional heads) weights, by path; each stage sets its own
        # lpips_weight (eta), which needs these.
        "lpips_weights": None,
    },
    "optim": {
        "lr": 4e-4,
        "min_lr": 4e-5,
        "warmup": 200,
        "weight_decay": 0.01,
        "betas": [0.9, 0.99],
        "grad_clip": 1.0,
        "ema_decay": 0.999,
        "accum": 1,
    },
    "stages": [
        {"name": "stage1", "steps": 100, "frames": 9, "crop": 64, "batch": 4, "image_ratio": 0.1, "lpips_weight": 0.0},
    ],
    "val": {"every": 500, "frames": 9, "size": 128, "max_clips": 11, "steps": 1},
    "train": {
        "threads": 2,
        # autocast: true, false or "auto" (on for CUDA, off on CPUs, where it is far slower
        # than fp32 without AVX512-BF16 and can give NaN gradients: docs/results.md, 'Speed')
        "bf16": "auto",
        "log_every": 10,
        "ckpt_every_steps": 1000,
        "ckpt_every_minutes": 10.0,
    },
}

STAGE_KEYS = {"name", "steps", "frames", "crop", "batch", "image_ratio", "lpips_weight"}


def merge(base: dict, update: dict, path: str = "") -> dict:
    """Deep-merge `update` into a copy of `base`; unknown keys are errors (typos)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        where = f"{path}{key}"
        if key not in base:
            raise ValueError(f"unknown config key {where!r}")
        if isinstance(base[key], dict) and isinstance(value, dict):
            out[key] = merge(base[key], value, where + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=3e-4` -> (["optim", "lr"], 0.0003); values are JSON, else strings."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"override must look like section.key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.split("."), value


def apply_override(config: dict, text: str) -> dict:
    """Set one value by its dotted path; list items by index (`stages.1.crop=96`)."""
    keys, value = parse_override(text)
    config = copy.deepcopy(config)
    node: Any = config
    try:
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        last = int(keys[-1]) if isinstance(node, list) else keys[-1]
        node[last]  # noqa: B018 -- only existing keys may be overridden (typos fail)
    except (KeyError, IndexError, ValueError, TypeError):
        raise ValueError(f"unknown config key {'.'.join(keys)!r}") from None
    node[last] = value
    return config


def validate(config: dict) -> dict:
    stages = config["stages"]
    if not stages:
        raise ValueError("config needs at least one stage")
    for i, stage in enumerate(stages):
        missing, unknown = STAGE_KEYS - set(stage), set(stage) - STAGE_KEYS
        if missing or unknown:
            raise ValueError(f"stage {i}: missing {sorted(missing)}, unknown {sorted(unknown)}")
        if (stage["frames"] - 1) % 4:
            raise ValueError(f"stage {i}: frames must be 1+4k, got {stage['frames']}")
        if stage["crop"] % 16:
            raise ValueError(f"stage {i}: crop must be a multiple of 16, got {stage['crop']}")
        if stage["crop"] > config["data"]["short_side"]:
            raise ValueError(f"stage {i}: crop {stage['crop']} exceeds data.short_side")
        if stage["lpips_weight"] > 0 and not config["loss"]["lpips_weights"]:
            raise ValueError(f"stage {i}: lpips_weight > 0 needs loss.lpips_weights (a path; nothing is downloaded)")
    if config["data"]["decode"] not in ("stream", "cache"):
        raise ValueError(f"data.decode must be 'stream' or 'cache', got {config['data']['decode']!r}")
    if config["train"]["bf16"] not in (True, False, "auto"):
        raise ValueError(f"train.bf16 must be true, false or \"auto\", got {config['train']['bf16']!r}")
    if not 0.0 <= config["data"]["channel_permute"] <= 1.0:
        raise ValueError(f"data.channel_permute is a probability, got {config['data']['channel_permute']}")
    if config["model"]["kind"] not in ("cdt", "vae"):
        raise ValueError(f"model.kind must be 'cdt' or 'vae', got {config['model']['kind']!r}")
    if not 0 <= config["loss"]["snr_min"] <= config["loss"]["snr_max"]:
        raise ValueError("need 0 <= loss.snr_min <= loss.snr_max")
    if (config["val"]["frames"] - 1) % 4 or config["val"]["size"] % 16:
        raise ValueError("val.frames must be 1+4k and val.size a multiple of 16")
    return config


def load_config(path: str | Path | None, overrides: list[str] = ()) -> dict:
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        config = merge(config, json.loads(Path(path).read_text()))
    for text in overrides:
        config = apply_override(config, text)
    return validate(config)


def total_steps(config: dict) -> int:
    return sum(stage["steps"] for stage in config["stages"])


def stage_at(config: dict, step: int) -> dict:
    """The stage that optimizer step `step` (0-based) belongs to; the last one past the end."""
    end = 0
    for stage in config["stages"]:
        end += stage["steps"]
        if step < end:
            return stage
    return config["stages"][-1]
