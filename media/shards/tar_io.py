"""Shard files: plain tar whose bytes depend only on the samples written.

Members are written in key order with fixed metadata (mtime 0, uid/gid 0, no owner
names, mode 0644, ustar format), so the same samples give the same file whichever engine
or process wrote them. A shard is written under a hidden temporary name, flushed to disk
and renamed: a reader, or a run resumed after a kill, sees a whole shard or none.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .sample import Sample

TEMP_PREFIX = "."
TEMP_SUFFIX = ".tmp"
MEMBER_MODE = 0o644


@dataclass(frozen=True)
class ShardFile:
    """A finished shard: its sample count, encoded frames, size and checksum."""

    name: str
    samples: int
    frames: int
    bytes: int
    sha256: str


def temp_path(path: Path) -> Path:
    return path.with_name(f"{TEMP_PREFIX}{path.name}{TEMP_SUFFIX}")


def remove_temporaries(folder: Path) -> None:
    """Delete what an interrupted run left half-written."""
    for path in folder.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
        path.unlink()


class ShardWriter:
    """Writes one shard's samples in ascending key order; `commit` makes it visible."""

    def __init__(self, path: Path) -> None:
        self.path, self._temp = path, temp_path(path)
        self._file = open(self._temp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._last_key: str | None = None
        self.samples = self.frames = 0

    def add(self, sample: Sample) -> None:
        if self._last_key is not None and sample.key <= self._last_key:
            raise ValueError(f"sample {sample.key} written after {self._last_key}: keys must ascend")
        for suffix, data in sorted(sample.members().items()):
            info = tarfile.TarInfo(f"{sample.key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, MEMBER_MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._last_key = sample.key
        self.samples += 1
        self.frames += sample.frames

    def commit(self) -> ShardFile:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        digest, size = _sha256(self._temp)
        os.replace(self._temp, self.path)
        return ShardFile(self.path.name, self.samples, self.frames, size, digest)

    def discard(self) -> None:
        self._tar.close()
        self._file.close()
        self._temp.unlink(missing_ok=True)


def _sha256(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def read_samples(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) of each sample of a shard, in file order."""
    key, members = None, {}
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            name_key, _, suffix = info.name.partition(".")
            if name_key != key and key is not None:
                yield key, members
                members = {}
            key = name_key
            members[suffix] = tar.extractfile(info).read()
    if key is not None:
        yield key, members
