"""OUTPUT/index.json: what a data set encode made and with what.

It names the options, the model and the source (input count and a digest of their names),
lists the finished shards (samples, frames, bytes, sha256) and the inputs that gave no
sample (code and reason), and says whether every planned shard is done. It holds no times
and lists shards by name, so the finished index of a run that was interrupted and resumed,
or run by another engine, is byte for byte the uninterrupted one's. It is rewritten
(temporary file, then rename) after each shard.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .tar_io import ShardFile, temp_path

INDEX_NAME = "index.json"
INDEX_FORMAT = "cdt-latent-shards"
INDEX_VERSION = 1


class OutputConflict(ValueError):
    """An OUTPUT folder that holds a data set made from another source, options or model."""

    code = "output_conflict"

    def __init__(self, message: str) -> None:
        super().__init__(f"{self.code}: {message}")


@dataclass
class Index:
    """The index's content; `shards` and `failed` are keyed by shard name."""

    options: dict
    model: dict
    source: dict
    planned: int
    shards: dict[str, ShardFile] = field(default_factory=dict)
    failed: dict[str, list[dict]] = field(default_factory=dict)

    def identity(self) -> dict:
        """What must match for a run to continue this index."""
        return {"options": self.options, "model": self.model, "source": self.source}

    def add(self, shard: ShardFile, failed: list[dict]) -> None:
        self.shards[shard.name] = shard
        self.failed[shard.name] = failed

    def to_json(self) -> dict:
        shards = [asdict(self.shards[name]) for name in sorted(self.shards)]
        failed = [{**entry, "shard": name} for name in sorted(self.failed) for entry in self.failed[name]]
        return {
            "format": INDEX_FORMAT, "version": INDEX_VERSION, **self.identity(),
            "complete": len(self.shards) == self.planned, "planned_shards": self.planned,
            "totals": {"shards": len(shards), "samples": sum(s["samples"] for s in shards),
                       "frames": sum(s["frames"] for s in shards), "failed": len(failed)},
            "shards": shards, "failed": failed,
        }

    @classmethod
    def from_json(cls, data: dict) -> "Index":
        index = cls(data["options"], data["model"], data["source"], data["planned_shards"])
        for shard in data["shards"]:
            index.shards[shard["name"]] = ShardFile(**shard)
            index.failed[shard["name"]] = []
        for entry in data["failed"]:
            index.failed[entry.pop("shard")].append(entry)
        return index


def read_index(output: str | Path) -> dict | None:
    """OUTPUT/index.json as written, or None if there is none yet."""
    path = Path(output) / INDEX_NAME
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("format") != INDEX_FORMAT or data.get("version") != INDEX_VERSION:
        raise OutputConflict(f"{path}: not a {INDEX_FORMAT} v{INDEX_VERSION} index")
    return data


def write_index(output: Path, index: Index) -> None:
    path = output / INDEX_NAME
    temp = temp_path(path)
    with open(temp, "w") as f:
        f.write(json.dumps(index.to_json(), indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def continue_index(output: Path, wanted: Index) -> Index:
    """The index to continue: the existing one if it was made the same way, else `wanted`;
    an index made from another source, options or model is refused."""
    existing = read_index(output)
    if existing is None:
        return wanted
    found = Index.from_json(existing)
    if found.identity() != wanted.identity():
        differences = [f"{section}.{key}: {found_value!r} there, {wanted_value!r} now"
                       for section in ("source", "options", "model")
                       for key in sorted(set(getattr(found, section)) | set(getattr(wanted, section)))
                       if (found_value := getattr(found, section).get(key))
                       != (wanted_value := getattr(wanted, section).get(key))]
        raise OutputConflict(f"{output} holds a data set made from another source, options or model "
                             f"({'; '.join(differences)}): write to another OUTPUT, or rerun with its options")
    return found
