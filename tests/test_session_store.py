"""Both session stores against the same contract; the Redis one against the real server."""

import asyncio
import secrets
import time

import pytest
import redis

from service.session_store import (
    MemorySessionStore,
    RedisSessionStore,
    SessionRecord,
    SessionStoreUnavailable,
)

REDIS_URL = "redis://127.0.0.1:6379/0"


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(params=["memory", "redis"])
def make_store(request):
    """A factory (each asyncio.run needs its own connection pool) and the key prefix."""
    prefix = f"cdt-test-{secrets.token_hex(4)}:"
    if request.param == "memory":
        store = MemorySessionStore()
        yield (lambda: store), prefix
        return
    yield (lambda: RedisSessionStore(REDIS_URL, prefix)), prefix
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


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
    if isinstance(factory(), RedisSessionStore):
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
