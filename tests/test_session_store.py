"""The session stores against one contract: in memory, on a single Redis and on a real 3-master Redis
Cluster (never mocks). Redis tests also look at the keys themselves: TTLs, parts, slots."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import redis

from service.sessions.store import (
    MemorySessionStore,
    RedisSessionStore,
    SessionStore,
    SessionStoreUnavailable,
    SnapshotRef,
    open_store,
)
from tests.redis_cluster import RedisClusterNodes, redis_cluster  # noqa: F401 (fixture)

REDIS_URL = "redis://127.0.0.1:6379/0"
META = {"kind": "encode", "next_seq": 0}


def run(coro):
    return asyncio.run(coro)


@dataclass
class Backend:
    """How to open a store on one backend (each asyncio.run needs its own connection pool), and the
    Redis servers holding its keys (none in memory)."""

    open: Callable[[], SessionStore]
    prefix: str
    node_urls: tuple[str, ...] = ()

    def clients(self) -> list[redis.Redis]:
        return [redis.Redis.from_url(url) for url in self.node_urls]

    def located_keys(self, contains: str = "") -> list[tuple[redis.Redis, str]]:
        """This test's keys on every node, each with a client of the node holding it."""
        return [(client, key.decode()) for client in self.clients() for key in client.scan_iter(f"{self.prefix}*")
                if contains in key.decode()]

    def keys(self, contains: str = "") -> list[str]:
        return sorted(key for _, key in self.located_keys(contains))

    def remove_keys(self) -> None:
        for client in self.clients():
            for key in client.scan_iter(f"{self.prefix}*"):
                client.delete(key)


@pytest.fixture(params=["memory", "redis", "cluster"])
def backend(request):
    """A store factory under a fresh key prefix; the prefix's keys are removed afterwards."""
    prefix = f"cdt-test-{secrets.token_hex(4)}:"
    if request.param == "memory":
        store = MemorySessionStore()
        yield Backend(lambda: store, prefix)
        return
    url, node_urls = REDIS_URL, (REDIS_URL,)
    if request.param == "cluster":
        cluster: RedisClusterNodes = request.getfixturevalue("redis_cluster")
        url, node_urls = cluster.url, cluster.node_urls
    found = Backend(lambda: RedisSessionStore(url, prefix), prefix, node_urls)
    yield found
    found.remove_keys()


async def commit(store, sid, version, seq, ttl_s=60.0, log_put=None, log_drop=()):
    """A commit in the shape the session layer makes: meta and response for chunk `seq`."""
    return await store.commit(sid, version, {**META, "next_seq": seq + 1}, b"response %d" % seq, ttl_s,
                              log_put, list(log_drop))


def test_create_load_commit_compare_and_set(backend):
    async def scenario():
        store = backend.open()
        assert await store.create("s1", META, ttl_s=60, max_sessions=10)
        loaded = await store.load("s1")
        assert (loaded.meta, loaded.version, loaded.response) == (META, 1, b"")
        assert (loaded.snapshot, loaded.log_bytes) == (None, 0)
        assert loaded.expires_at == pytest.approx(time.time() + 60, abs=5)
        assert await commit(store, "s1", 1, seq=0)
        assert not await commit(store, "s1", 1, seq=7)  # a writer holding the old version loses
        loaded = await store.load("s1")
        assert (loaded.version, loaded.meta["next_seq"], loaded.response) == (2, 1, b"response 0")
        brief = await store.load("s1", response=False)
        assert (brief.version, brief.meta, brief.response) == (2, loaded.meta, b"")
        assert await store.load("missing") is None
        assert not await commit(store, "missing", 1, seq=0)
        await store.close()

    run(scenario())


def test_racing_commits_exactly_one_wins(backend):
    async def scenario():
        store = backend.open()
        assert await store.create("race", META, ttl_s=60, max_sessions=10)
        results = await asyncio.gather(*[commit(store, "race", 1, seq=i, log_put=(str(i), b"x" * i))
                                         for i in range(1, 9)])
        assert sum(results) == 1
        winner = results.index(True) + 1
        loaded = await store.load("race")
        assert (loaded.version, loaded.response, loaded.log_bytes) == (2, b"response %d" % winner, winner)
        assert await store.read_log("race", [str(i) for i in range(1, 9)]) == {str(winner): b"x" * winner}
        await store.close()

    run(scenario())


def test_log_entries_put_drop_and_read(backend):
    async def scenario():
        store = backend.open()
        assert await store.create("s", META, ttl_s=60, max_sessions=10)
        for seq in range(4):
            drop = [str(seq - 2)] if seq >= 2 else []  # keep a window of two entries
            assert await commit(store, "s", seq + 1, seq, log_put=(str(seq), bytes([seq]) * 1000), log_drop=drop)
        assert await store.read_log("s", ["0", "1", "2", "3", "9"]) == {"2": b"\x02" * 1000, "3": b"\x03" * 1000}
        assert (await store.load("s")).log_bytes == 2000
        # Drops apply before the put; a put replaces an entry of the same name; an empty commit keeps the log.
        assert await commit(store, "s", 5, 4, log_put=("3", b"new"), log_drop=["3", "2", "never"])
        assert await commit(store, "s", 6, 5)
        assert await store.read_log("s", ["2", "3"]) == {"3": b"new"}
        assert (await store.load("s")).log_bytes == 3
        assert await store.read_log("s", []) == {} and await store.read_log("missing", ["3"]) == {}
        await store.close()

    run(scenario())


def test_snapshot_is_split_into_parts_and_read_back_equal(backend):
    data = secrets.token_bytes(10_000)

    async def scenario():
        store = backend.open()
        assert await store.create("s", META, ttl_s=60, max_sessions=10)
        assert await store.read_snapshot("s") is None
        assert await store.put_snapshot("s", label=3, data=data, part_bytes=1024)
        assert (await store.load("s")).snapshot == SnapshotRef(label=3, parts=10, nbytes=10_000)
        assert await store.read_snapshot("s") == (SnapshotRef(3, 10, 10_000), data)
        with pytest.raises(ValueError):
            await store.put_snapshot("s", label=4, data=data, part_bytes=0)
        assert not await store.put_snapshot("missing", label=1, data=data, part_bytes=1024)
        await store.close()

    run(scenario())
    if backend.node_urls:
        values = [client.get(key) for client, key in backend.located_keys(":snap:")]
        assert len(values) == 10
        assert max(map(len, values)) == 1024 and sum(map(len, values)) == 10_000


def test_snapshot_never_moves_backwards(backend):
    async def scenario():
        store = backend.open()
        assert await store.create("s", META, ttl_s=60, max_sessions=10)
        assert await store.put_snapshot("s", label=5, data=b"five" * 100, part_bytes=64)
        assert not await store.put_snapshot("s", label=4, data=b"four", part_bytes=64)
        assert not await store.put_snapshot("s", label=5, data=b"again", part_bytes=64)
        assert await store.read_snapshot("s") == (SnapshotRef(5, 7, 400), b"five" * 100)
        assert await store.put_snapshot("s", label=9, data=b"nine" * 10, part_bytes=64)
        assert await store.read_snapshot("s") == (SnapshotRef(9, 1, 40), b"nine" * 10)
        assert await store.put_snapshot("s", label=10, data=b"", part_bytes=64)
        assert await store.read_snapshot("s") == (SnapshotRef(10, 0, 0), b"")
        await store.close()

    run(scenario())
    if backend.node_urls:  # the replaced and the refused snapshots left no parts behind
        assert backend.keys(":snap:") == []


def test_snapshot_write_racing_commits(backend):
    """Commits go on for as long as a snapshot of many parts is being written, and one more after it;
    neither disturbs the other. Whether a commit lands inside the write is up to the event loop and the
    network, so sessions are raced until one did (on Redis; the in-process store never yields there)."""
    data = secrets.token_bytes(1 << 21)

    async def race(store, sid) -> int:
        """Commits completed while the snapshot was being written."""
        assert await store.create(sid, META, ttl_s=60, max_sessions=100)
        writing, stored_event = asyncio.Event(), asyncio.Event()

        async def commits():
            seq = during = 0
            while True:
                last = stored_event.is_set()
                assert await commit(store, sid, seq + 1, seq, log_put=(str(seq), b"in %d" % seq),
                                    log_drop=[str(seq - 3)])
                during += writing.is_set() and not stored_event.is_set()
                seq += 1
                await asyncio.sleep(0)
                if last:
                    return seq, during

        async def snapshot():
            writing.set()
            stored = await store.put_snapshot(sid, 7, data, part_bytes=1 << 16)
            stored_event.set()
            return stored

        (count, during), stored = await asyncio.gather(commits(), snapshot())
        assert stored
        loaded = await store.load(sid)
        assert (loaded.version, loaded.response) == (count + 1, b"response %d" % (count - 1))
        assert loaded.snapshot == SnapshotRef(7, 32, 1 << 21)
        assert await store.read_snapshot(sid) == (loaded.snapshot, data)
        kept = [str(i) for i in range(max(0, count - 3), count)]
        assert sorted(await store.read_log(sid, [str(i) for i in range(count)])) == sorted(kept)
        return during

    async def scenario():
        store = backend.open()
        for attempt in range(20 if backend.node_urls else 1):
            if await race(store, f"s{attempt}"):
                break
        else:
            assert not backend.node_urls, "no commit landed while a snapshot was being written"
        await store.close()

    run(scenario())


def test_readers_never_see_mixed_snapshot_parts(backend):
    size = 1 << 18

    async def scenario():
        store = backend.open()
        assert await store.create("s", META, ttl_s=60, max_sessions=10)

        async def write():
            for label in range(1, 16):
                assert await store.put_snapshot("s", label, bytes([label]) * size, part_bytes=1 << 14)

        async def read():
            seen = []
            for _ in range(40):
                found = await store.read_snapshot("s")
                if found is not None:
                    ref, data = found
                    assert data == bytes([ref.label]) * size
                    seen.append(ref.label)
                await asyncio.sleep(0)
            return seen

        _, seen = await asyncio.gather(write(), read())
        assert seen == sorted(seen)  # a reader never goes back to an older snapshot
        assert (await store.read_snapshot("s"))[0].label == 15
        await store.close()

    run(scenario())


def test_commit_refreshes_the_ttl_of_every_key_and_expiry_leaves_none(backend):
    async def scenario():
        store = backend.open()
        started = time.monotonic()
        assert await store.create("s", META, ttl_s=1.0, max_sessions=1)
        assert await commit(store, "s", 1, 0, ttl_s=1.0, log_put=("0", b"input"))
        assert await store.put_snapshot("s", 1, b"z" * 5000, part_bytes=1000)
        await asyncio.sleep(0.6 - (time.monotonic() - started))
        assert await commit(store, "s", 2, 1, ttl_s=1.0)
        refreshed = time.monotonic()
        if backend.node_urls:  # every key of the session now expires with it, the index too
            ttls = [client.pttl(key) for client, key in backend.located_keys()]
            assert len(ttls) == 1 + 1 + 5 + 1 and min(ttls) > 700 and max(ttls) <= 1000
        await asyncio.sleep(1.2 - (time.monotonic() - started))  # past the TTL given at creation
        assert (await store.load("s")).version == 3
        assert await store.read_log("s", ["0"]) == {"0": b"input"}
        assert (await store.read_snapshot("s"))[1] == b"z" * 5000
        await asyncio.sleep(1.3 - (time.monotonic() - refreshed))
        assert await store.load("s") is None and await store.read_snapshot("s") is None
        assert await store.live_count() == 0
        assert await store.create("next", META, ttl_s=0.2, max_sessions=1)  # the expired one is not counted
        await store.close()

    run(scenario())
    if backend.node_urls:
        time.sleep(0.3)
        assert backend.keys() == []


def test_live_session_limit(backend):
    async def scenario():
        store = backend.open()
        assert await store.create("a", META, ttl_s=60, max_sessions=2)
        assert not await store.create("a", META, ttl_s=60, max_sessions=10)  # the id is taken
        assert await store.create("b", META, ttl_s=60, max_sessions=2)
        assert not await store.create("c", META, ttl_s=60, max_sessions=2)
        assert await store.live_count() == 2
        assert await store.delete("a")
        assert await store.live_count() == 1
        assert await store.create("c", META, ttl_s=60, max_sessions=2)
        await store.close()

    run(scenario())


def test_delete_removes_every_key_of_the_session(backend):
    async def scenario():
        store = backend.open()
        for sid in ("doomed", "kept"):
            assert await store.create(sid, META, ttl_s=60, max_sessions=10)
            assert await commit(store, sid, 1, 0, log_put=("0", b"input"))
            assert await store.put_snapshot(sid, 1, b"y" * 3000, part_bytes=1000)
        if backend.node_urls:
            assert len(backend.keys("doomed")) == 1 + 1 + 3
        assert await store.delete("doomed")
        assert not await store.delete("doomed")
        assert await store.load("doomed") is None and await store.read_snapshot("doomed") is None
        assert await store.read_log("doomed", ["0"]) == {}
        assert not await store.put_snapshot("doomed", 2, b"late", part_bytes=1000)
        assert (await store.read_snapshot("kept"))[1] == b"y" * 3000
        assert await store.live_count() == 1
        await store.close()

    run(scenario())
    if backend.node_urls:
        assert backend.keys("doomed") == [] and len(backend.keys("kept")) == 1 + 1 + 3


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "redis+cluster://127.0.0.1:1"])
def test_unreachable_redis_raises_store_unavailable(url):
    async def scenario():
        store = RedisSessionStore(url, connect_timeout_s=0.5)
        with pytest.raises(SessionStoreUnavailable):
            await store.ping()
        with pytest.raises(SessionStoreUnavailable):
            await store.load("x")
        with pytest.raises(SessionStoreUnavailable):
            await commit(store, "x", 1, 0)
        await store.close()

    run(scenario())


@pytest.mark.parametrize("sid", ["plain-id", "a}b{c"])
def test_a_sessions_keys_share_one_cluster_slot(redis_cluster, sid):  # noqa: F811 (fixture)
    prefix = f"cdt-test-{secrets.token_hex(4)}:"
    backend = Backend(lambda: RedisSessionStore(redis_cluster.url, prefix), prefix, redis_cluster.node_urls)

    async def scenario():
        store = backend.open()
        assert await store.create(sid, META, ttl_s=60, max_sessions=10)
        assert await commit(store, sid, 1, 0, log_put=("0", b"input"))
        assert await store.put_snapshot(sid, 1, b"w" * 6000, part_bytes=1000)
        await store.close()

    run(scenario())
    try:
        located = [(client, key) for client, key in backend.located_keys() if key != f"{prefix}sessions"]
        assert len(located) == 1 + 1 + 6
        assert len({client.execute_command("CLUSTER", "KEYSLOT", key) for client, key in located}) == 1
        assert len({client.connection_pool.connection_kwargs["port"] for client, _ in located}) == 1
    finally:
        backend.remove_keys()


def test_open_store_follows_the_url_rule(redis_cluster):  # noqa: F811 (fixture)
    prefix = f"cdt-test-{secrets.token_hex(4)}:"

    async def scenario():
        assert isinstance(open_store(None, prefix), MemorySessionStore)
        cluster = open_store(redis_cluster.url, prefix)
        assert await cluster.create("s", META, ttl_s=5, max_sessions=10)
        assert (await cluster.load("s")).meta == META
        assert await cluster.delete("s")
        await cluster.close()
        # A plain URL to one cluster node reaches only that node's slots: the error says what to use.
        single = open_store(redis_cluster.node_urls[0], prefix)
        errors = []
        for sid in "abcdefgh":
            try:
                await single.load(sid)
            except SessionStoreUnavailable as exc:
                errors.append(str(exc))
        assert errors and all("redis+cluster://" in error for error in errors)
        await single.close()

    run(scenario())
