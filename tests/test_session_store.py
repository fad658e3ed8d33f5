"""The session stores against the same contract (Redis ones against the real server), and
what the replica-local copies in front of Redis may and may not reuse."""

import asyncio
import secrets
import time

import pytest
import redis

from service.session_store import (
    LocalStateCache,
    MemorySessionStore,
    RedisSessionStore,
    SessionRecord,
    SessionStoreUnavailable,
)

REDIS_URL = "redis://127.0.0.1:6379/0"


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def prefix():
    """A fresh Redis key prefix; its keys are removed afterwards."""
    value = f"cdt-test-{secrets.token_hex(4)}:"
    yield value
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{value}*"):
        client.delete(key)


@pytest.fixture(params=["memory", "redis", "redis+local"])
def make_store(request, prefix):
    """A factory (each asyncio.run needs its own connection pool) and the key prefix."""
    if request.param == "memory":
        store = MemorySessionStore()
        return (lambda: store), prefix
    if request.param == "redis":
        return (lambda: RedisSessionStore(REDIS_URL, prefix)), prefix
    return (lambda: LocalStateCache(RedisSessionStore(REDIS_URL, prefix), 1 << 20)), prefix


def record(n: int = 0) -> SessionRecord:
    return SessionRecord(meta={"kind": "encode", "seq": n}, state=bytes([n]) * 1000, response=b"r%d" % n)


def test_create_load_save_compare_and_set(make_store):
    factory, _ = make_store

    async def scenario():
        store = factory()
        assert await store.create("s1", record(0), ttl_s=60, max_sessions=10)
        loaded = await store.load("s1")
        assert loaded.version == 1 and loaded.meta == {"kind": "encode", "seq": 0}
        assert loaded.state == bytes([0]) * 1000 and loaded.response == b"r0"
        assert await store.save("s1", record(1), expected_version=1, ttl_s=60)
        # A writer holding the old version loses.
        assert not await store.save("s1", record(2), expected_version=1, ttl_s=60)
        loaded = await store.load("s1")
        assert loaded.version == 2 and loaded.meta["seq"] == 1 and loaded.state == bytes([1]) * 1000
        assert await store.load("missing") is None
        assert not await store.save("missing", record(1), expected_version=1, ttl_s=60)
        await store.close()

    run(scenario())


def test_metadata_load_skips_the_blobs(make_store):
    factory, _ = make_store

    async def scenario():
        store = factory()
        assert await store.create("m1", record(3), ttl_s=60, max_sessions=10)
        assert await store.save("m1", record(4), expected_version=1, ttl_s=60)
        full, brief = await store.load("m1"), await store.load("m1", blobs=False)
        assert brief.meta == full.meta and brief.version == full.version == 2
        assert brief.expires_at == pytest.approx(full.expires_at, abs=1e-3)
        assert brief.state == b"" and brief.response == b""
        assert brief.state_bytes == full.state_bytes == 1000
        assert await store.load("missing", blobs=False) is None
        await store.close()

    run(scenario())


def test_concurrent_writers_one_wins(make_store):
    factory, _ = make_store

    async def scenario():
        store = factory()
        assert await store.create("race", record(0), ttl_s=60, max_sessions=10)
        results = await asyncio.gather(*[store.save("race", record(i), 1, 60) for i in range(1, 9)])
        assert sum(results) == 1
        assert (await store.load("race")).version == 2
        await store.close()

    run(scenario())


def test_live_session_limit_and_delete(make_store):
    factory, _ = make_store

    async def scenario():
        store = factory()
        assert await store.create("a", record(), ttl_s=60, max_sessions=2)
        assert await store.create("b", record(), ttl_s=60, max_sessions=2)
        assert not await store.create("c", record(), ttl_s=60, max_sessions=2)
        assert await store.live_count() == 2
        assert await store.delete("a")
        assert not await store.delete("a")
        assert await store.load("a") is None
        assert await store.create("c", record(), ttl_s=60, max_sessions=2)
        await store.close()

    run(scenario())


def test_expiry_frees_the_session_and_its_keys(make_store):
    factory, prefix = make_store

    async def scenario():
        store = factory()
        assert await store.create("short", record(), ttl_s=0.3, max_sessions=1)
        assert await store.load("short") is not None
        await asyncio.sleep(0.5)
        assert await store.load("short") is None
        assert await store.live_count() == 0
        assert await store.create("next", record(), ttl_s=0.3, max_sessions=1)
        await store.close()

    run(scenario())
    if not isinstance(factory(), MemorySessionStore):
        time.sleep(0.5)
        assert list(redis.Redis.from_url(REDIS_URL).scan_iter(f"{prefix}*")) == []


def test_saving_refreshes_the_ttl(make_store):
    factory, _ = make_store

    async def scenario():
        store = factory()
        assert await store.create("s", record(), ttl_s=0.4, max_sessions=1)
        await asyncio.sleep(0.25)
        assert await store.save("s", record(1), 1, ttl_s=0.4)
        await asyncio.sleep(0.25)
        assert await store.load("s") is not None  # 0.5 s after creation, alive through the refresh
        await store.close()

    run(scenario())


def test_unreachable_redis_raises_store_unavailable():
    async def scenario():
        store = RedisSessionStore("redis://127.0.0.1:1/0", connect_timeout_s=0.5)
        with pytest.raises(SessionStoreUnavailable):
            await store.ping()
        with pytest.raises(SessionStoreUnavailable):
            await store.load("x")
        await store.close()

    run(scenario())


def test_local_copy_is_reused_only_for_the_version_this_replica_wrote(prefix):
    async def scenario():
        a = LocalStateCache(RedisSessionStore(REDIS_URL, prefix), 1 << 20)
        b = LocalStateCache(RedisSessionStore(REDIS_URL, prefix), 1 << 20)
        assert await a.create("s", record(0), ttl_s=60, max_sessions=10)
        assert not (await a.load("s")).local  # created elsewhere: nothing local yet
        assert await a.save("s", record(1), expected_version=1, ttl_s=60)
        hit = await a.load("s")
        assert hit.local and (hit.version, hit.state, hit.response) == (2, record(1).state, b"r1")
        assert hit.meta == record(1).meta and hit.expires_at > time.time()
        # Replica b writes the next version: a's copy is stale and must not be used.
        from_b = await b.load("s")
        assert not from_b.local and from_b.state == record(1).state
        assert await b.save("s", record(2), expected_version=2, ttl_s=60)
        fresh = await a.load("s")
        assert not fresh.local and (fresh.version, fresh.state) == (3, record(2).state)
        # a lost a race with its stale version: it keeps no copy of anything.
        assert not await a.save("s", record(9), expected_version=2, ttl_s=60)
        assert not (await a.load("s")).local
        assert (await b.load("s")).local
        assert await b.delete("s")
        assert await a.load("s") is None and await b.load("s") is None
        await a.close()
        await b.close()

    run(scenario())


def test_local_copies_skip_reading_the_stored_state(prefix):
    """A hit reads no blob: bytes changed behind the store's back (same version) are not seen."""
    async def scenario():
        store = LocalStateCache(RedisSessionStore(REDIS_URL, prefix), 1 << 20)
        assert await store.create("s", record(0), ttl_s=60, max_sessions=10)
        assert await store.save("s", record(1), expected_version=1, ttl_s=60)
        redis.Redis.from_url(REDIS_URL).hset(f"{prefix}session:s", "state", b"other")
        assert (await store.load("s")).state == record(1).state
        assert (await store.load("s", blobs=False)).state_bytes == len(b"other")
        await store.close()

    run(scenario())


def test_a_replica_without_a_copy_reads_the_session_in_one_command(prefix):
    """The handoff case: no copy to compare versions with, so no metadata read first."""
    def calls():
        stats = redis.Redis.from_url(REDIS_URL).info("commandstats")
        return {cmd: stats.get(f"cmdstat_{cmd}", {}).get("calls", 0) for cmd in ("hgetall", "hmget", "hstrlen")}

    async def scenario():
        writer = LocalStateCache(RedisSessionStore(REDIS_URL, prefix), 1 << 20)
        reader = LocalStateCache(RedisSessionStore(REDIS_URL, prefix), 1 << 20)
        assert await writer.create("s", record(0), ttl_s=60, max_sessions=10)
        assert await writer.save("s", record(1), expected_version=1, ttl_s=60)
        before = calls()
        loaded = await reader.load("s")
        after = calls()
        assert not loaded.local and loaded.state == record(1).state
        assert {cmd: after[cmd] - before[cmd] for cmd in after} == {"hgetall": 1, "hmget": 0, "hstrlen": 0}
        await writer.close()
        await reader.close()

    run(scenario())


def test_local_copies_stay_within_their_byte_budget(prefix):
    size = len(record(1).state) + len(record(1).response)  # 1,002 bytes per copy

    async def scenario():
        store = LocalStateCache(RedisSessionStore(REDIS_URL, prefix), 2 * size)
        for sid in "abc":
            assert await store.create(sid, record(0), ttl_s=60, max_sessions=10)
            assert await store.save(sid, record(1), expected_version=1, ttl_s=60)
        # Least recently used out: "a" went when "c" arrived; after reading b then c, a new
        # copy of "a" pushes out "b".
        assert [(await store.load(sid)).local for sid in "abc"] == [False, True, True]
        assert await store.save("a", record(1), expected_version=2, ttl_s=60)
        assert [(await store.load(sid)).local for sid in "abc"] == [True, False, True]
        big = SessionRecord(meta={}, state=b"x" * (2 * size + 1))
        assert await store.save("b", big, expected_version=2, ttl_s=60)
        assert not (await store.load("b")).local  # larger than the whole budget: never kept
        await store.close()

    run(scenario())
