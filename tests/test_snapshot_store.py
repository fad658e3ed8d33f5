"""The snapshot stores against one contract: in the session store (in memory, on the real Redis)
and in a directory on disk (two store objects on one directory play two replicas sharing a
volume). Also the promise a draining replica leaves for a rebuild, and the packed format."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import pytest
import torch

from model import StreamingEncoder
from service.sessions.codec import SnapshotFormatError, pack, unpack
from service.sessions.store import MemorySessionStore, RedisSessionStore, SnapshotRef
from service.sessions.store.files import FileSnapshotStore, directory_of
from service.sessions.store.snapshot_store import InSessionStore, open_snapshot_store
from tests.servers import SHARED_REDIS_URL

META = {"kind": "encode", "next_seq": 0}


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(params=["session_store", "file"])
def stores(request, tmp_path):
    """(session store, snapshot store, a second snapshot store on the same place)."""
    sessions = MemorySessionStore()
    if request.param == "session_store":
        return sessions, InSessionStore(sessions), InSessionStore(sessions)
    return sessions, FileSnapshotStore(tmp_path, "cdt:"), FileSnapshotStore(tmp_path, "cdt:")


def test_latest_snapshot_only_moves_forward_and_replicas_share_it(stores):
    sessions, store, other = stores

    async def scenario():
        assert await sessions.create("s", META, ttl_s=60, max_sessions=10)
        assert await store.latest("s") is None and await store.get("s") is None
        assert await store.put("s", 5, b"five" * 100, part_bytes=64)
        assert not await other.put("s", 4, b"four", part_bytes=64)
        assert not await other.put("s", 5, b"again", part_bytes=64)
        assert await other.get("s") == (SnapshotRef(5, 7, 400), b"five" * 100)
        assert await other.put("s", 9, b"nine" * 10, part_bytes=64)
        assert await store.latest("s") == SnapshotRef(9, 1, 40)
        assert await store.get("s") == (SnapshotRef(9, 1, 40), b"nine" * 10)

    run(scenario())


def test_a_half_written_snapshot_is_never_read_and_a_commit_clears_it(tmp_path):
    store = FileSnapshotStore(tmp_path, "cdt:")
    run(store.put("s", 3, b"three", part_bytes=2))
    session = tmp_path / "cdt" / "s"
    # A writer that died: parts of label 7 without their manifest, and one with its manifest staged.
    (session / f"{7:012d}-{'a' * 16}").mkdir()
    (session / f"{7:012d}-{'a' * 16}" / "0").write_bytes(b"sev")
    (session / f".{8:012d}-{'b' * 16}.json.tmp").write_text('{"label": 8, "parts": 1, "nbytes": 3}')
    assert run(store.get("s")) == (SnapshotRef(3, 3, 5), b"three")
    assert run(store.put("s", 9, b"nine", part_bytes=4))
    names = sorted(p.name for p in session.iterdir() if not p.name.startswith("."))
    assert len(names) == 2 and all(name.startswith(f"{9:012d}-") for name in names)  # parts and manifest


def test_readers_never_see_a_mix_of_two_snapshots(tmp_path):
    writer, reader = FileSnapshotStore(tmp_path, "p:"), FileSnapshotStore(tmp_path, "p:")
    size = 1 << 17

    async def scenario():
        async def write():
            for label in range(1, 16):
                assert await writer.put("s", label, bytes([label]) * size, part_bytes=1 << 12)

        async def read():
            seen = []
            for _ in range(60):
                found = await reader.get("s")
                if found is not None:
                    assert found[1] == bytes([found[0].label]) * size
                    seen.append(found[0].label)
            return seen

        _, seen = await asyncio.gather(write(), read())
        assert seen == sorted(seen)
        assert (await reader.latest("s")).label == 15

    run(scenario())


def test_sweep_removes_the_snapshots_of_ended_sessions_and_delete_its_own(tmp_path):
    sessions = MemorySessionStore()
    store = FileSnapshotStore(tmp_path, "cdt:")

    async def scenario():
        for sid, ttl in (("kept", 60), ("expiring", 0.2), ("deleted", 60)):
            assert await sessions.create(sid, META, ttl_s=ttl, max_sessions=10)
            assert await store.put(sid, 1, b"state", part_bytes=2)
        assert await store.put("never-created", 1, b"state", part_bytes=2)  # a record that is gone
        await store.delete("deleted")
        assert sorted(os.listdir(tmp_path / "cdt")) == ["expiring", "kept", "never-created"]
        await asyncio.sleep(0.3)
        assert await store.sweep(sessions.live) == 2
        assert os.listdir(tmp_path / "cdt") == ["kept"]
        assert await store.get("kept") == (SnapshotRef(1, 3, 5), b"state")

    run(scenario())


def test_snapshot_store_urls(tmp_path):
    sessions = MemorySessionStore()
    assert isinstance(open_snapshot_store(None, sessions, "cdt:"), InSessionStore)
    assert isinstance(open_snapshot_store(f"file://{tmp_path}", sessions, "cdt:"), FileSnapshotStore)
    assert directory_of("file:///srv/snap%20shots") == Path("/srv/snap shots")
    for bad in ("s3://bucket/x", "file://host/x", "file:relative", "/plain/path"):
        with pytest.raises(ValueError):
            directory_of(bad)


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_promise_lasts_until_withdrawn_or_expired_and_never_outlives_its_session(backend):
    prefix = f"cdt-test-{secrets.token_hex(4)}:"

    async def scenario():
        store = MemorySessionStore() if backend == "memory" else RedisSessionStore(SHARED_REDIS_URL, prefix)
        assert await store.create("s", META, ttl_s=60, max_sessions=10)
        assert await store.promised_snapshot("s") is None
        await store.promise_snapshot("s", 7, ttl_s=30)
        assert await store.promised_snapshot("s") == 7
        await store.withdraw_promise("s")
        assert await store.promised_snapshot("s") is None
        await store.promise_snapshot("s", 8, ttl_s=0.2)
        await asyncio.sleep(0.3)
        assert await store.promised_snapshot("s") is None
        await store.promise_snapshot("gone", 1, ttl_s=30)  # no session: no promise
        assert await store.promised_snapshot("gone") is None
        await store.promise_snapshot("s", 9, ttl_s=30)
        assert await store.live(["s", "gone"]) == {"s"}
        assert await store.delete("s")
        assert await store.promised_snapshot("s") is None and await store.live(["s"]) == set()
        await store.close()

    run(scenario())


def test_packed_state_comes_back_bit_for_bit_and_smaller(tiny_model):
    stream = StreamingEncoder(tiny_model, "hash")
    torch.manual_seed(0)
    for _ in range(2):
        stream.push(torch.rand(1, 3, 4, 32, 32) * 2 - 1)
    state = stream.cache.to_bytes()
    packed = pack(state)
    assert unpack(packed) == state and len(packed) < len(state)
    for length in range(6):  # lengths that are not whole float32s
        assert unpack(pack(b"x" * length)) == b"x" * length
    with pytest.raises(SnapshotFormatError):
        unpack(state)  # an unpacked state (the previous release's snapshots)
