"""Where streaming sessions live between chunks.

A session record is small JSON metadata plus two binary blobs: the model's exported
FeatureCache (safetensors bytes) and the last chunk's response (kept so a retried
`seq` gets the same bytes without applying the chunk twice). The blobs can reach
hundreds of MB, so reads that only need the metadata (status, delete) skip them. Every write is a
compare-and-set on an integer version (WATCH/MULTI in Redis), so two replicas racing
on one session cannot both apply a chunk.

Two implementations share the interface: `RedisSessionStore` (any replica can continue
any session) and `MemorySessionStore` (single replica; the default without Redis).
`LocalStateCache` sits in front of the Redis one and keeps this replica's last writes, so
a session that comes back to the replica that served its previous chunk skips reading
its state over the network.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError, WatchError


class SessionStoreUnavailable(RuntimeError):
    """The store cannot be reached (maps to 503 session_store_unavailable)."""


@dataclass
class SessionRecord:
    meta: dict[str, Any]
    state: bytes = b""
    response: bytes = b""
    version: int = 0
    expires_at: float = 0.0  # unix seconds; refreshed by every write
    stored_state_bytes: int | None = None  # the state's size when it was not loaded
    local: bool = False  # the blobs came from this replica's LocalStateCache, not the store

    @property
    def state_bytes(self) -> int:
        return len(self.state) if self.stored_state_bytes is None else self.stored_state_bytes


class SessionStore(Protocol):
    async def create(self, session_id: str, record: SessionRecord, ttl_s: float, max_sessions: int) -> bool:
        """Store a new record at version 1. False when `max_sessions` are live."""

    async def load(self, session_id: str, blobs: bool = True) -> SessionRecord | None:
        """The record, or None. blobs=False leaves state and response empty (state_bytes
        still reports the stored state's size)."""

    async def save(self, session_id: str, record: SessionRecord, expected_version: int, ttl_s: float) -> bool:
        """Write `record` as version expected_version+1 if the stored version is still
        `expected_version`; refresh the TTL. False if another writer got there first or
        the session is gone."""

    async def delete(self, session_id: str) -> bool: ...

    async def live_count(self) -> int: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class MemorySessionStore:
    """In-process store for a single replica. Expiry is checked on access."""

    def __init__(self) -> None:
        self._records: dict[str, SessionRecord] = {}
        self._lock = asyncio.Lock()

    def _prune(self, now: float) -> None:
        for key in [k for k, r in self._records.items() if r.expires_at <= now]:
            del self._records[key]

    async def create(self, session_id, record, ttl_s, max_sessions) -> bool:
        async with self._lock:
            now = time.time()
            self._prune(now)
            if len(self._records) >= max_sessions or session_id in self._records:
                return False
            record.version, record.expires_at = 1, now + ttl_s
            self._records[session_id] = record
            return True

    async def load(self, session_id, blobs=True):
        async with self._lock:
            self._prune(time.time())
            record = self._records.get(session_id)
            if record is None:
                return None
            if blobs:
                return SessionRecord(dict(record.meta), record.state, record.response, record.version,
                                     record.expires_at)
            return SessionRecord(dict(record.meta), version=record.version, expires_at=record.expires_at,
                                 stored_state_bytes=len(record.state))

    async def save(self, session_id, record, expected_version, ttl_s) -> bool:
        async with self._lock:
            now = time.time()
            self._prune(now)
            current = self._records.get(session_id)
            if current is None or current.version != expected_version:
                return False
            record.version, record.expires_at = expected_version + 1, now + ttl_s
            self._records[session_id] = record
            return True

    async def delete(self, session_id) -> bool:
        async with self._lock:
            return self._records.pop(session_id, None) is not None

    async def live_count(self) -> int:
        async with self._lock:
            self._prune(time.time())
            return len(self._records)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


# KEYS[1] = session hash, KEYS[2] = index of live sessions (zset scored by expiry; it
# expires with its longest-lived member, so no key outlives the sessions)
# ARGV: max sessions, ttl ms, now ms, session id, meta, state, response
_CREATE = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then return -1 end
local expires = tonumber(ARGV[3]) + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'version', 1, 'meta', ARGV[5], 'state', ARGV[6], 'response', ARGV[7],
           'expires_ms', expires)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], expires, ARGV[4])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return 1
"""


class RedisSessionStore:
    """Sessions in Redis: one hash per session with a TTL, plus a zset of live ids (scored by
    expiry) for the live-session limit. Creation is a Lua script (limit check and insert in
    one step); saves are a compare-and-set on the version under WATCH/MULTI."""

    def __init__(self, url: str, prefix: str = "cdt:", connect_timeout_s: float = 2.0,
                 io_timeout_s: float = 60.0) -> None:
        # A dead Redis is noticed by the short connect timeout; the I/O timeout must let a
        # state of a few hundred MB (large frames) cross the wire.
        self._redis = aioredis.Redis.from_url(url, socket_timeout=io_timeout_s,
                                              socket_connect_timeout=connect_timeout_s)
        self._prefix = prefix
        self._index = prefix + "sessions"
        self._create = self._redis.register_script(_CREATE)

    def _key(self, session_id: str) -> str:
        return f"{self._prefix}session:{session_id}"

    async def _call(self, coro):
        try:
            return await coro
        except (RedisError, OSError) as exc:
            raise SessionStoreUnavailable(f"session store unreachable: {exc}") from None

    def _args(self, session_id: str, record: SessionRecord, ttl_s: float) -> list:
        return [int(ttl_s * 1000), int(time.time() * 1000), session_id, json.dumps(record.meta),
                record.state, record.response]

    async def create(self, session_id, record, ttl_s, max_sessions) -> bool:
        keys = [self._key(session_id), self._index]
        result = await self._call(self._create(keys=keys, args=[max_sessions, *self._args(session_id, record, ttl_s)]))
        if result == 1:
            record.version, record.expires_at = 1, time.time() + ttl_s
        return result == 1

    async def load(self, session_id, blobs=True):
        key = self._key(session_id)
        if blobs:
            fields = await self._call(self._redis.hgetall(key))
            if not fields:
                return None
            return SessionRecord(meta=json.loads(fields[b"meta"]), state=fields[b"state"],
                                 response=fields[b"response"], version=int(fields[b"version"]),
                                 expires_at=int(fields[b"expires_ms"]) / 1000)
        async with self._redis.pipeline(transaction=True) as pipe:  # one consistent snapshot
            pipe.hmget(key, "meta", "version", "expires_ms").hstrlen(key, "state")
            (meta, version, expires_ms), state_bytes = await self._call(pipe.execute())
        if meta is None:
            return None
        return SessionRecord(meta=json.loads(meta), version=int(version), expires_at=int(expires_ms) / 1000,
                             stored_state_bytes=int(state_bytes))

    async def save(self, session_id, record, expected_version, ttl_s) -> bool:
        # WATCH/MULTI rather than a script: a script would copy a state of hundreds of MB
        # into Lua strings first (measured: saves took 1.6x as long).
        key, ttl_ms = self._key(session_id), int(ttl_s * 1000)
        expires_ms = int(time.time() * 1000) + ttl_ms
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                await pipe.watch(key)
                current = await pipe.hget(key, "version")
                if current is None or int(current) != expected_version:
                    return False
                index_ttl_ms = await pipe.pttl(self._index)  # -2 absent, -1 no TTL
                pipe.multi()
                pipe.hset(key, mapping={"version": expected_version + 1, "meta": json.dumps(record.meta),
                                        "state": record.state, "response": record.response,
                                        "expires_ms": expires_ms})
                pipe.pexpire(key, ttl_ms)
                pipe.zadd(self._index, {session_id: expires_ms})
                if index_ttl_ms < ttl_ms:
                    pipe.pexpire(self._index, ttl_ms)
                await pipe.execute()
        except WatchError:
            return False
        except (RedisError, OSError) as exc:
            raise SessionStoreUnavailable(f"session store unreachable: {exc}") from None
        record.version, record.expires_at = expected_version + 1, expires_ms / 1000
        return True

    async def delete(self, session_id) -> bool:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(session_id)).zrem(self._index, session_id)
            deleted, _ = await self._call(pipe.execute())
        return bool(deleted)

    async def live_count(self) -> int:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(self._index, "-inf", int(time.time() * 1000)).zcard(self._index)
            _, count = await self._call(pipe.execute())
        return int(count)

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def close(self) -> None:
        await self._redis.aclose()


class LocalStateCache:
    """A shared store plus a copy of the blobs this replica last wrote per session, up to
    `max_bytes` (least recently used first out).

    A full load of a session it holds a copy of first reads only the metadata; when the
    stored version is the one this replica wrote, its own copy of the blobs is that
    version's, and the state (tens to hundreds of MB) does not cross the network. Any
    other version (another replica wrote since), or a session with no copy here, is read
    in full. Writes always go to the shared store before they return, so
    every replica can still continue every session; the copy only saves reads.
    """

    def __init__(self, store: SessionStore, max_bytes: int) -> None:
        self._store, self._max_bytes = store, max_bytes
        self._copies: OrderedDict[str, SessionRecord] = OrderedDict()
        self._bytes = 0

    def _forget(self, session_id: str) -> None:
        copy = self._copies.pop(session_id, None)
        if copy is not None:
            self._bytes -= len(copy.state) + len(copy.response)

    def _keep(self, session_id: str, record: SessionRecord) -> None:
        self._forget(session_id)
        size = len(record.state) + len(record.response)
        if size > self._max_bytes:
            return
        while self._bytes + size > self._max_bytes:
            self._forget(next(iter(self._copies)))
        self._copies[session_id] = SessionRecord({}, record.state, record.response, record.version)
        self._bytes += size

    async def create(self, session_id, record, ttl_s, max_sessions) -> bool:
        return await self._store.create(session_id, record, ttl_s, max_sessions)

    async def load(self, session_id, blobs=True):
        if not blobs:
            return await self._store.load(session_id, blobs=False)
        copy = self._copies.get(session_id)
        if copy is None:  # nothing to compare: one full read, not a metadata read first
            return await self._store.load(session_id)
        brief = await self._store.load(session_id, blobs=False)
        if brief is None or copy.version != brief.version:
            self._forget(session_id)
            return None if brief is None else await self._store.load(session_id)
        self._copies.move_to_end(session_id)
        return SessionRecord(brief.meta, copy.state, copy.response, brief.version, brief.expires_at, local=True)

    async def save(self, session_id, record, expected_version, ttl_s) -> bool:
        # Forget first: if the write fails midway, the stored version is unknown.
        self._forget(session_id)
        saved = await self._store.save(session_id, record, expected_version, ttl_s)
        if saved:
            self._keep(session_id, record)
        return saved

    async def delete(self, session_id) -> bool:
        self._forget(session_id)
        return await self._store.delete(session_id)

    async def live_count(self) -> int:
        return await self._store.live_count()

    async def ping(self) -> None:
        await self._store.ping()

    async def close(self) -> None:
        self._copies.clear()
        self._bytes = 0
        await self._store.close()


def open_store(redis_url: str | None, prefix: str = "cdt:", local_cache_bytes: int = 0) -> SessionStore:
    """Redis when a URL is given (with this replica's copies in front when
    `local_cache_bytes` > 0), else the in-process store."""
    if not redis_url:
        return MemorySessionStore()
    store = RedisSessionStore(redis_url, prefix)
    return LocalStateCache(store, local_cache_bytes) if local_cache_bytes > 0 else store
