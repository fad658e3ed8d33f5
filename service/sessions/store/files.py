"""Snapshots in a directory shared by the replicas (`CDT_SESSION_SNAPSHOT_STORE=file:///path`):
a ReadWriteMany volume in Kubernetes, a named volume in compose.

Layout under the directory, for key prefix P (its `:` as `-`) and session id I, as an object
store's keys (an S3-compatible backend lays them out the same):

- `P/I/<label>-<token>/<i>`: part i of a snapshot, written once, never changed;
- `P/I/<label>-<token>.json`: its manifest (label, parts, bytes), written last, by a rename:
  the commit. A snapshot without a manifest is never read.

`<label>` is zero-padded so names sort by label; the token is random per write, so two writers
never share a name. The latest snapshot is the manifest with the highest label; committing one
deletes those with lower labels, manifest first, then parts. A reader that finds a part gone
met a newer commit and starts over on the newer manifest.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

from .contract import SnapshotRef, part_starts

_MANIFEST = re.compile(r"^(\d{12})-([0-9a-f]{16})\.json$")
_READ_ATTEMPTS = 3


def directory_of(url: str) -> Path:
    """The directory of a `file:///absolute/path` URL."""
    parsed = urlparse(url)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
        raise ValueError(f"expected file:///absolute/path, got {url!r}")
    return Path(unquote(parsed.path))


class FileSnapshotStore:
    """Snapshots as files (layout in the module docstring). Blocking file work runs in threads."""

    def __init__(self, root: Path, prefix: str) -> None:
        self._root = root / prefix.replace(":", "-").strip("-")

    def _session(self, session_id: str) -> Path:
        return self._root / session_id

    # --- blocking work, one thread each -----------------------------------------------------
    def _manifests(self, directory: Path) -> list[tuple[int, str]]:
        """(label, name without .json) of the committed snapshots, highest label last."""
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        found = [(int(m.group(1)), name[:-5]) for name in names if (m := _MANIFEST.match(name))]
        return sorted(found)

    def _ref(self, directory: Path, name: str) -> SnapshotRef | None:
        try:
            manifest = json.loads((directory / f"{name}.json").read_text())
        except FileNotFoundError:
            return None
        return SnapshotRef(manifest["label"], manifest["parts"], manifest["nbytes"])

    def _latest(self, session_id: str) -> tuple[SnapshotRef, str] | None:
        directory = self._session(session_id)
        for _, name in reversed(self._manifests(directory)):
            ref = self._ref(directory, name)
            if ref is not None:
                return ref, name
        return None

    def _put(self, session_id: str, label: int, data: bytes, part_bytes: int) -> bool:
        current = self._latest(session_id)
        if current is not None and current[0].label >= label:
            return False
        directory = self._session(session_id)
        name = f"{label:012d}-{secrets.token_hex(8)}"
        starts = part_starts(len(data), part_bytes)
        try:
            (directory / name).mkdir(parents=True)
            view = memoryview(data)
            for i, start in enumerate(starts):
                (directory / name / str(i)).write_bytes(view[start:start + part_bytes])
            staged = directory / f".{name}.json.tmp"
            staged.write_text(json.dumps({"label": label, "parts": len(starts), "nbytes": len(data)}))
            os.replace(staged, directory / f"{name}.json")  # the commit
        except FileNotFoundError:
            # The session was deleted or swept, or a newer commit removed our parts: nothing to keep.
            self._remove(directory, name)
            return False
        committed = self._manifests(directory)
        if committed[-1][0] > label:  # a newer snapshot was committed meanwhile: ours is not needed
            self._remove(directory, name)
            return False
        for _, older in committed:
            if older != name:
                self._remove(directory, older)
        for entry in os.listdir(directory):  # parts whose writer died before its commit
            if entry < name and not entry.endswith((".json", ".tmp")):
                shutil.rmtree(directory / entry, ignore_errors=True)
        return True

    @staticmethod
    def _remove(directory: Path, name: str) -> None:
        (directory / f"{name}.json").unlink(missing_ok=True)
        shutil.rmtree(directory / name, ignore_errors=True)

    def _get(self, session_id: str) -> tuple[SnapshotRef, bytes] | None:
        directory = self._session(session_id)
        for _ in range(_READ_ATTEMPTS):
            latest = self._latest(session_id)
            if latest is None:
                return None
            ref, name = latest
            try:
                data = b"".join((directory / name / str(i)).read_bytes() for i in range(ref.parts))
            except FileNotFoundError:
                continue  # replaced while read: start over on the newer one
            if len(data) == ref.nbytes:
                return ref, data
        return None

    def _sessions(self) -> list[str]:
        try:
            return os.listdir(self._root)
        except FileNotFoundError:
            return []

    # --- the interface ----------------------------------------------------------------------
    async def put(self, session_id, label, data, part_bytes) -> bool:
        return await asyncio.to_thread(self._put, session_id, label, data, part_bytes)

    async def latest(self, session_id):
        found = await asyncio.to_thread(self._latest, session_id)
        return None if found is None else found[0]

    async def get(self, session_id):
        return await asyncio.to_thread(self._get, session_id)

    async def delete(self, session_id) -> None:
        await asyncio.to_thread(shutil.rmtree, self._session(session_id), True)

    async def sweep(self, live) -> int:
        sessions = await asyncio.to_thread(self._sessions)
        if not sessions:
            return 0
        alive = await live(sessions)
        gone = [session_id for session_id in sessions if session_id not in alive]
        for session_id in gone:
            await self.delete(session_id)
        return len(gone)
