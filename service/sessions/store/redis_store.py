"""Sessions in a Redis or a Redis Cluster: any replica continues any session.

Layout, for key prefix P and session id I. Every key of a session contains the hash tag `{I}`, so a
session lives in one cluster slot and each of its scripts runs on one node:

- `Ps:{I}`: hash of version, meta, response, expires_ms, log_bytes and the current snapshot pointer
  (snap_label, snap_token, snap_parts, snap_bytes);
- `Ps:{I}:log`: hash of log entry name -> chunk input;
- `Ps:{I}:snap:<label>:<token>:<i>`: string, part i of a snapshot. The token is random per write, so
  parts are written once and never changed, and two writers of one label never share a key;
- `Ps:{I}:promise`: string, the label of a snapshot a draining replica is writing (`promise_snapshot`),
  expiring with the drain's budget, never after the session;
- `Psessions`: zset of live session ids scored by expiry (unix ms), for the store-wide session limit.
  It is global, so on a cluster it sits in a slot of its own and is only touched by single-key commands.
- `Powner:<principal>`: set of an API key's session ids, for the per-key session limit; ids of
  sessions that are gone leave it when the key next creates one. It expires a session TTL after the
  key's last creation (a key's sessions active for longer than that stop counting: the limit errs on
  the side of the caller).

Every key of a session expires with it: commits refresh the TTL of all of them.

URL rule (`CDT_REDIS_URL`): `redis://` and `rediss://` URLs (redis-py's format) address a single Redis;
`redis+cluster://host:port` and `rediss+cluster://host:port` address a Redis Cluster through any one of
its nodes (the client discovers the others). redis-py has no URL scheme for a cluster; the `+cluster`
suffix is this module's, and the URL without it goes to `RedisCluster.from_url`.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import MovedError, RedisClusterException, RedisError

from .contract import SessionStoreUnavailable, SnapshotRef, StoredSession, part_starts

# The part keys of a session's current snapshot. Scripts derive them from the session hash rather than
# taking them in KEYS: they carry the session's hash tag, so they live in the slot the script runs on.
_SNAPSHOT_PARTS = """
local function snapshot_parts(session)
  local snap = redis.call('HMGET', session, 'snap_label', 'snap_token', 'snap_parts')
  local keys = {}
  if snap[1] then
    for i = 0, tonumber(snap[3]) - 1 do
      keys[#keys + 1] = session .. ':snap:' .. snap[1] .. ':' .. snap[2] .. ':' .. i
    end
  end
  return keys
end
"""

# KEYS[1] = index. ARGV: now ms, expires ms, ttl ms, max sessions, session id.
# The index expires with its longest-lived member, so it never outlives the sessions.
_ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[5]) then return 0 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return -1 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[5])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
"""

# KEYS[1] = index. ARGV: now ms, expires ms, ttl ms, session id. Moves a listed session's expiry later.
_TOUCH = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZADD', KEYS[1], 'XX', 'GT', ARGV[2], ARGV[4])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
"""

# KEYS[1] = index. ARGV: now ms.
_COUNT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
return redis.call('ZCARD', KEYS[1])
"""

# KEYS[1] = session hash. ARGV: meta, ttl ms, expires ms.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'version', 1, 'meta', ARGV[1], 'response', '', 'expires_ms', ARGV[3], 'log_bytes', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS[1] = session hash, KEYS[2] = log. ARGV: expected version, meta, response, ttl ms, expires ms,
# '1' when an entry is put (ARGV[7] name, ARGV[8] bytes) else '0', then the names to drop.
_COMMIT = _SNAPSHOT_PARTS + """
local version = redis.call('HGET', KEYS[1], 'version')
if not version or tonumber(version) ~= tonumber(ARGV[1]) then return 0 end
local log_bytes = tonumber(redis.call('HGET', KEYS[1], 'log_bytes'))
for i = 9, #ARGV do
  log_bytes = log_bytes - redis.call('HSTRLEN', KEYS[2], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
end
if ARGV[6] == '1' then
  log_bytes = log_bytes - redis.call('HSTRLEN', KEYS[2], ARGV[7]) + string.len(ARGV[8])
  redis.call('HSET', KEYS[2], ARGV[7], ARGV[8])
end
redis.call('HSET', KEYS[1], 'version', tonumber(version) + 1, 'meta', ARGV[2], 'response', ARGV[3],
           'expires_ms', ARGV[5], 'log_bytes', log_bytes)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
for _, part in ipairs(snapshot_parts(KEYS[1])) do redis.call('PEXPIRE', part, ARGV[4]) end
return 1
"""

# KEYS[1] = session hash, KEYS[2..] = the new snapshot's parts. ARGV: label, token, parts, bytes.
# The new parts are already written; this makes them current or deletes them.
_SWITCH_SNAPSHOT = _SNAPSHOT_PARTS + """
local function discard()
  for i = 2, #KEYS do redis.call('UNLINK', KEYS[i]) end
  return 0
end
if redis.call('EXISTS', KEYS[1]) == 0 then return discard() end
local current = redis.call('HGET', KEYS[1], 'snap_label')
if current and tonumber(current) >= tonumber(ARGV[1]) then return discard() end
-- parts carry a TTL while written: one that ran out leaves the snapshot incomplete
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then return discard() end
end
for _, part in ipairs(snapshot_parts(KEYS[1])) do redis.call('UNLINK', part) end
redis.call('HSET', KEYS[1], 'snap_label', ARGV[1], 'snap_token', ARGV[2], 'snap_parts', ARGV[3],
           'snap_bytes', ARGV[4])
local ttl = redis.call('PTTL', KEYS[1])
for i = 2, #KEYS do redis.call('PEXPIRE', KEYS[i], ttl) end
return 1
"""

# KEYS[1] = session hash, KEYS[2] = log, KEYS[3] = promise.
_DELETE = _SNAPSHOT_PARTS + """
local existed = redis.call('EXISTS', KEYS[1])
for _, part in ipairs(snapshot_parts(KEYS[1])) do redis.call('UNLINK', part) end
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3])
return existed
"""

# KEYS[1] = session hash, KEYS[2] = promise. ARGV: label, ttl ms.
_PROMISE = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl <= 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', math.min(ttl, tonumber(ARGV[2])))
return 1
"""

# KEYS[1] = an owner's set. ARGV: limit, session id, ttl ms.
_OWN = """
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[2])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
"""

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_SESSION_FIELDS = ["version", "meta", "expires_ms", "log_bytes", "snap_label", "snap_parts", "snap_bytes"]
# A reader that finds parts missing met a newer snapshot replacing the one it started on: it starts over
# on the new one, a few times at most.
_SNAPSHOT_READ_ATTEMPTS = 3


def _client(url: str, **options) -> aioredis.Redis | RedisCluster:
    """A cluster client for `redis+cluster://` and `rediss+cluster://` URLs, else a single-Redis one."""
    scheme, _, rest = url.partition("://")
    if scheme in _CLUSTER_SCHEMES:
        return RedisCluster.from_url(f"{_CLUSTER_SCHEMES[scheme]}://{rest}", **options)
    return aioredis.Redis.from_url(url, **options)


def _now_ms() -> int:
    return int(time.time() * 1000)


class RedisSessionStore:
    """Sessions in a Redis or a Redis Cluster (layout in the module docstring). Every change to a
    session's keys that must be atomic is one Lua script on the session's slot, reads are single-slot
    commands, and the live-session index has scripts of its own: no command spans two slots."""

    def __init__(self, url: str, prefix: str = "cdt:", connect_timeout_s: float = 2.0,
                 io_timeout_s: float = 60.0) -> None:
        # A dead Redis is noticed by the short connect timeout; the I/O timeout must let a snapshot
        # part or a large chunk input cross the wire.
        self._redis = _client(url, socket_timeout=io_timeout_s, socket_connect_timeout=connect_timeout_s)
        self._prefix = prefix
        self._index = prefix + "sessions"
        scripts = {"admit": _ADMIT, "touch": _TOUCH, "count": _COUNT, "create": _CREATE, "commit": _COMMIT,
                   "switch": _SWITCH_SNAPSHOT, "delete": _DELETE, "promise": _PROMISE, "own": _OWN}
        self._scripts = {name: self._redis.register_script(source) for name, source in scripts.items()}

    def _key(self, session_id: str) -> str:
        return f"{self._prefix}s:{{{session_id}}}"

    @staticmethod
    def _log_key(session_key: str) -> str:
        return f"{session_key}:log"

    @staticmethod
    def _promise_key(session_key: str) -> str:
        return f"{session_key}:promise"

    @staticmethod
    def _part_key(session_key: str, label: int, token: str, index: int) -> str:
        """Part `index` of a snapshot; `snapshot_parts` in the scripts builds the same names."""
        return f"{session_key}:snap:{label}:{token}:{index}"

    async def _call(self, coro):
        try:
            return await coro
        except MovedError as exc:
            raise SessionStoreUnavailable(f"session store is a Redis Cluster ({exc}): address it with a "
                                          "redis+cluster:// URL") from None
        except (RedisError, RedisClusterException, OSError) as exc:
            raise SessionStoreUnavailable(f"session store unreachable: {exc}") from None

    async def _script(self, name: str, keys: list[str], args: list) -> Any:
        return await self._call(self._scripts[name](keys=keys, args=args))

    async def create(self, session_id, meta, ttl_s, max_sessions) -> bool:
        ttl_ms, now_ms = int(ttl_s * 1000), _now_ms()
        admitted = await self._script("admit", [self._index], [now_ms, now_ms + ttl_ms, ttl_ms, max_sessions,
                                                               session_id])
        if admitted != 1:
            return False
        try:
            created = await self._script("create", [self._key(session_id)], [json.dumps(meta), ttl_ms,
                                                                             now_ms + ttl_ms])
        except SessionStoreUnavailable:
            await self._unadmit(session_id)
            raise
        if not created:
            await self._unadmit(session_id)
        return bool(created)

    async def _unadmit(self, session_id: str) -> None:
        """Take back an index entry whose session was not written."""
        try:
            await self._call(self._redis.zrem(self._index, session_id))
        except SessionStoreUnavailable:
            pass  # the entry leaves the index when its expiry passes

    async def load(self, session_id, response=True):
        names = _SESSION_FIELDS + (["response"] if response else [])
        fields = dict(zip(names, await self._call(self._redis.hmget(self._key(session_id), names))))
        if fields["version"] is None:
            return None
        snapshot = None
        if fields["snap_label"] is not None:
            snapshot = SnapshotRef(int(fields["snap_label"]), int(fields["snap_parts"]), int(fields["snap_bytes"]))
        return StoredSession(meta=json.loads(fields["meta"]), version=int(fields["version"]),
                             expires_at=int(fields["expires_ms"]) / 1000, response=fields.get("response") or b"",
                             snapshot=snapshot, log_bytes=int(fields["log_bytes"]))

    async def commit(self, session_id, expected_version, meta, response, ttl_s, log_put, log_drop) -> bool:
        ttl_ms, now_ms = int(ttl_s * 1000), _now_ms()
        expires_ms = now_ms + ttl_ms
        # The index first, so that an error there leaves nothing committed. Should the compare-and-set
        # then fail, the later expiry is harmless: the winner sets the same, and a session that is gone
        # is no longer listed (the touch adds no one).
        await self._script("touch", [self._index], [now_ms, expires_ms, ttl_ms, session_id])
        key = self._key(session_id)
        put = ["1", *log_put] if log_put is not None else ["0", "", ""]
        committed = await self._script("commit", [key, self._log_key(key)],
                                       [expected_version, json.dumps(meta), response, ttl_ms, expires_ms, *put,
                                        *log_drop])
        return committed == 1

    async def read_log(self, session_id, names) -> dict[str, bytes]:
        if not names:
            return {}
        values = await self._call(self._redis.hmget(self._log_key(self._key(session_id)), names))
        return {name: value for name, value in zip(names, values) if value is not None}

    async def put_snapshot(self, session_id, label, data, part_bytes) -> bool:
        key, view = self._key(session_id), memoryview(data)
        parts = [view[start:start + part_bytes] for start in part_starts(len(data), part_bytes)]
        current, ttl_ms = await self._snapshot_label_and_ttl(key)
        if ttl_ms <= 0 or (current is not None and current >= label):
            return False  # gone, or a snapshot as new is already there: skip writing the parts
        token = secrets.token_hex(8)
        part_keys = [self._part_key(key, label, token, i) for i in range(len(parts))]
        # Parts written before a failure here expire with the TTL they were written with.
        async with self._redis.pipeline(transaction=False) as pipe:
            for part_key, part in zip(part_keys, parts):
                pipe.set(part_key, part, px=ttl_ms)
            await self._call(pipe.execute())
        switched = await self._script("switch", [key, *part_keys], [label, token, len(parts), len(data)])
        return switched == 1

    async def _snapshot_label_and_ttl(self, key: str) -> tuple[int | None, int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(key, "snap_label").pttl(key)
            label, ttl_ms = await self._call(pipe.execute())
        return (None if label is None else int(label)), int(ttl_ms)

    async def read_snapshot(self, session_id):
        key = self._key(session_id)
        for _ in range(_SNAPSHOT_READ_ATTEMPTS):
            label, token, parts, nbytes = await self._call(
                self._redis.hmget(key, ["snap_label", "snap_token", "snap_parts", "snap_bytes"]))
            if label is None:
                return None
            ref = SnapshotRef(int(label), int(parts), int(nbytes))
            part_keys = [self._part_key(key, ref.label, token.decode(), i) for i in range(ref.parts)]
            values = await self._call(self._redis.mget(part_keys)) if part_keys else []
            # Parts of one token are never rewritten, so a full set is one snapshot; a missing part
            # means a newer snapshot (or a delete) removed this one mid-read.
            if all(value is not None for value in values):
                return ref, b"".join(values)
        return None

    async def delete(self, session_id) -> bool:
        key = self._key(session_id)
        existed = await self._script("delete", [key, self._log_key(key), self._promise_key(key)], [])
        await self._call(self._redis.zrem(self._index, session_id))
        return bool(existed)

    async def live(self, session_ids) -> set[str]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for session_id in session_ids:
                pipe.exists(self._key(session_id))
            found = await self._call(pipe.execute())
        return {session_id for session_id, exists in zip(session_ids, found) if exists}

    def _owner_key(self, owner: str) -> str:
        return f"{self._prefix}owner:{owner}"

    async def own(self, owner, session_id, ttl_s, limit) -> bool:
        key = self._owner_key(owner)
        owned = [m.decode() if isinstance(m, bytes) else m for m in await self._call(self._redis.smembers(key))]
        gone = set(owned) - await self.live(owned) if owned else set()
        if gone:
            await self._call(self._redis.srem(key, *gone))
        return bool(await self._script("own", [key], [limit, session_id, max(1, int(ttl_s * 1000))]))

    async def disown(self, owner, session_id) -> None:
        await self._call(self._redis.srem(self._owner_key(owner), session_id))

    async def promise_snapshot(self, session_id, label, ttl_s) -> None:
        key = self._key(session_id)
        await self._script("promise", [key, self._promise_key(key)], [label, max(1, int(ttl_s * 1000))])

    async def withdraw_promise(self, session_id) -> None:
        await self._call(self._redis.unlink(self._promise_key(self._key(session_id))))

    async def promised_snapshot(self, session_id) -> int | None:
        label = await self._call(self._redis.get(self._promise_key(self._key(session_id))))
        return None if label is None else int(label)

    async def live_count(self) -> int:
        return int(await self._script("count", [self._index], [_now_ms()]))

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def close(self) -> None:
        await self._redis.aclose()
