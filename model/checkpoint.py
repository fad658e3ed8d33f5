"""Checkpoint directories: `config.json` + `model.safetensors` + `model.sha256`, and
`receptive_field.json`.

The hash covers the config and the weights (`hash_state`); loading recomputes it and
refuses a directory whose weights or config were changed. Nothing is unpickled.

`receptive_field.json` records the streams' measured temporal receptive fields
(model/streaming/receptive_field.py) with the hash they were measured for. It stays out
of the hash: loading uses a record whose hash matches, and measures the model otherwise.

The loader returns the network with a `ModelIdentity`: what it verified and read about
the weights, kept apart from the nn.Module, whose state is only its weights.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import CDTConfig
from .streaming.receptive_field import MEASURED_BY, ReceptiveField, measure
from .tokenizer import Tokenizer, build_model, hash_state, parse_dtype

CHECKPOINT_FORMAT = "cdt-checkpoint"
CHECKPOINT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HASH_FILE = "model.sha256"
RECEPTIVE_FIELD_FILE = "receptive_field.json"
RECEPTIVE_FIELD_FORMAT = "cdt-receptive-field"
RECEPTIVE_FIELD_VERSION = 1
RECEPTIVE_FIELD_UNITS = {"encode": "pixel frames",
                         "decode": "latent frames: decode_base + decode_per_step * DDIM steps"}


def _shipped_checkpoint() -> Path:
    """The checkpoint shipped with the project: `checkpoints/cdt-tiny` in a source tree; an
    installed wheel carries it as data files under the environment's prefix (pyproject.toml,
    `tool.setuptools.data-files`), since it lives beside the packages, not in one."""
    relative = Path("checkpoints") / "cdt-tiny"
    source = Path(__file__).resolve().parents[1] / relative
    installed = Path(sys.prefix) / "share" / "cdt-tokenizer" / relative
    return installed if not source.is_dir() and installed.is_dir() else source


# What the `cdt` commands and the service load when given no checkpoint.
DEFAULT_CHECKPOINT = _shipped_checkpoint()


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, malformed or tampered with."""


@dataclass(frozen=True)
class ModelIdentity:
    """What names a checkpoint's weights and what its streams need to know of them, found
    once when it is saved or loaded (costly to find again: hashing every weight, and
    measuring the receptive field runs streams for seconds to minutes).

    `content_hash` names the config and the weights as stored: stream states and latents
    files carry it, so they are never taken up by another model. `receptive_field` tells
    how many recent inputs a stream's state depends on, hence how far back a log of its
    inputs must reach to rebuild it."""

    content_hash: str
    receptive_field: ReceptiveField


class Pretrained(NamedTuple):
    """A loaded checkpoint: the network and its identity (`model, identity = from_pretrained(d)`)."""

    model: Tokenizer
    identity: ModelIdentity


def save_pretrained(model: Tokenizer, directory: str | Path, dtype: str | torch.dtype | None = None,
                    receptive_field: ReceptiveField | None = None) -> ModelIdentity:
    """Write the checkpoint; `dtype` casts the stored weights (e.g. bf16 to halve the size).
    The receptive field recorded beside it is `receptive_field`, else measured.

    Returns the identity of what was written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    store = parse_dtype(dtype) if dtype is not None else None
    state = {k: (v.to(store) if store is not None and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    digest = hash_state(model.config, state)
    header = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": model.kind,
              "config": model.config.to_dict()}
    (directory / CONFIG_FILE).write_text(json.dumps(header, indent=2, sort_keys=True) + "\n")
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"content_hash": digest, "kind": model.kind})
    (directory / HASH_FILE).write_text(digest + "\n")
    field = receptive_field if receptive_field is not None else measure(model)
    write_receptive_field(directory, field, digest)
    return ModelIdentity(digest, field)


def read_header(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint directory (no {CONFIG_FILE})")
    return _read_versioned_json(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)


def _read_versioned_json(path: Path, fmt: str, version: int) -> dict:
    """A JSON object whose "format" and "version" must be `fmt` and `version`."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None
    if data.get("format") != fmt or data.get("version") != version:
        raise CheckpointError(f"{path}: not a {fmt} v{version} file")
    return data


def from_pretrained(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
) -> Pretrained:
    """The checkpoint's network in `dtype` on `device`, in eval mode, and its identity: the
    verified hash, and the recorded receptive field (measured if none is recorded for
    these weights)."""
    model, digest = _load(directory, device, dtype)
    field = read_receptive_field(directory, digest)
    return Pretrained(model, ModelIdentity(digest, field if field is not None else measure(model)))


def _load(directory: str | Path, device: str | torch.device, dtype: str | torch.dtype) -> tuple[Tokenizer, str]:
    """The checkpoint's network and the content hash its weights were verified against."""
    directory = Path(directory)
    header = read_header(directory)
    config = CDTConfig.from_dict(header["config"])
    for name in (WEIGHTS_FILE, HASH_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory}: missing {name}")
    try:
        state = load_file(str(directory / WEIGHTS_FILE))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: unreadable ({exc})") from None
    expected = (directory / HASH_FILE).read_text().strip()
    actual = hash_state(config, state)
    if actual != expected:
        raise CheckpointError(
            f"{directory}: content hash mismatch (expected {expected[:16]}..., got {actual[:16]}...): "
            "the weights or config were modified"
        )
    model = build_model(config, header.get("kind", "cdt"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{directory}: weights do not fit the config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return model.set_precision(dtype).to(device).eval(), actual


def write_receptive_field(directory: str | Path, field: ReceptiveField, digest: str) -> None:
    record = {"format": RECEPTIVE_FIELD_FORMAT, "version": RECEPTIVE_FIELD_VERSION, "model_hash": digest,
              "measured_by": MEASURED_BY, "units": RECEPTIVE_FIELD_UNITS, **dataclasses.asdict(field)}
    (Path(directory) / RECEPTIVE_FIELD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_receptive_field(directory: str | Path, digest: str) -> ReceptiveField | None:
    """The recorded receptive fields, or None if there is no record for these weights."""
    path = Path(directory) / RECEPTIVE_FIELD_FILE
    if not path.is_file():
        return None
    record = _read_versioned_json(path, RECEPTIVE_FIELD_FORMAT, RECEPTIVE_FIELD_VERSION)
    if record.get("model_hash") != digest:
        return None
    return ReceptiveField(**{f.name: int(record[f.name]) for f in dataclasses.fields(ReceptiveField)})


def record_receptive_field(directory: str | Path) -> ReceptiveField:
    """Measure a saved checkpoint's receptive fields and write its record."""
    model, digest = _load(directory, "cpu", "fp32")
    field = measure(model)
    write_receptive_field(directory, field, digest)
    return field
