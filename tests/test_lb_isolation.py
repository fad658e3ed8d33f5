"""Who may see what, over the real Redis across two replicas behind the real load balancer
(tests/nginx.py): a session belongs to the key that created it on every replica; session
ids are unguessable; the session limit is store-wide; every route but the probes needs a key."""

from __future__ import annotations

import base64
import re
import secrets
import time

import httpx
import pytest
import redis

from tests.nginx import Deployment
from tests.servers import SHARED_REDIS_URL
from tests.session_helpers import npy_bytes, real_frames

KEY_A, KEY_B = "lb-isolation-key-a", "lb-isolation-key-b"
MAX_SESSIONS = 6
PROBES = {"/healthz", "/readyz", "/metrics"}
ID_BYTES = 24  # docs/sessions.md's 192 random bits


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def lb(tiny_checkpoint, tmp_path_factory, redis_prefix):
    with Deployment(tiny_checkpoint, tmp_path_factory.mktemp("lb"), SHARED_REDIS_URL, redis_prefix,
                    api_keys=f"{KEY_A},{KEY_B}", max_sessions=MAX_SESSIONS) as running:
        yield running


@pytest.fixture(scope="module")
def frames(shared_videos):
    return real_frames(shared_videos, 9)


def create(url: str, key: str) -> httpx.Response:
    return httpx.post(url + "/v1/sessions", json={"kind": "encode"}, headers=auth(key))


def push(url: str, sid: str, seq: int, key: str, frames) -> httpx.Response:
    return httpx.post(f"{url}/v1/sessions/{sid}/chunks/{seq}", content=npy_bytes(frames), timeout=60,
                      headers={**auth(key), "content-type": "application/x-npy"})


def calls(url: str, sid: str, key: str, frames) -> dict[str, httpx.Response]:
    session = f"{url}/v1/sessions/{sid}"
    return {"GET": httpx.get(session, headers=auth(key)),
            "chunk": push(url, sid, 1, key, frames),
            "finish": httpx.post(session + "/finish", headers=auth(key), timeout=60),
            "DELETE": httpx.delete(session, headers=auth(key))}


def test_another_keys_session_is_not_found_on_any_replica(lb, frames):
    created = create(lb.url, KEY_A)
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    assert push(lb.url, sid, 0, KEY_A, frames[:1]).status_code == 200
    unknown = secrets.token_urlsafe(ID_BYTES)
    for url in [r.url for r in lb.replicas] + [lb.url]:
        # Key B gets exactly the answer an unknown id gets, from the replica holding the
        # session hot, from the other one, and through the balancer.
        for call, answer in calls(url, sid, KEY_B, frames[1:5]).items():
            assert answer.status_code == 404, (url, call, answer.text)
            assert answer.json()["error"]["code"] == "session_not_found", (url, call)
        assert {c: (r.status_code, r.json()["error"]["code"])
                for c, r in calls(url, unknown, KEY_B, frames[1:5]).items()} == \
            {c: (404, "session_not_found") for c in ("GET", "chunk", "finish", "DELETE")}
    # Nothing B tried touched the session: key A continues it on either replica.
    for replica in lb.replicas:
        state = httpx.get(f"{replica.url}/v1/sessions/{sid}", headers=auth(KEY_A))
        assert state.status_code == 200 and state.json()["next_seq"] == 1 and state.json()["state"] == "open"
    assert push(lb.replicas[1].url, sid, 1, KEY_A, frames[1:5]).status_code == 200
    assert push(lb.replicas[0].url, sid, 2, KEY_A, frames[5:9]).status_code == 200
    assert httpx.post(f"{lb.url}/v1/sessions/{sid}/finish", headers=auth(KEY_A), timeout=60).status_code == 200
    assert httpx.delete(f"{lb.url}/v1/sessions/{sid}", headers=auth(KEY_A)).status_code == 204


def test_session_ids_are_192_random_bits(lb):
    ids = []
    for _ in range(32):
        r = create(lb.url, KEY_A)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
        assert httpx.delete(f"{lb.url}/v1/sessions/{ids[-1]}", headers=auth(KEY_A)).status_code == 204
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{32}", sid) for sid in ids), ids  # base64url of 24 bytes
    raw = [base64.urlsafe_b64decode(sid) for sid in ids]
    assert len(set(raw)) == len(raw) and all(len(r) == ID_BYTES for r in raw)
    bits = [[(byte >> k) & 1 for byte in r for k in range(8)] for r in raw]
    # No bit is fixed across ids (as a counter's, a timestamp's or a version field's would
    # be: for random bits the chance of any of the 192 being equal in all 32 ids is 2^-24),
    # and ones are half of all bits (6,144 bits: 0.5 +- 0.04 is 6 standard deviations).
    assert all(0 < sum(column) < len(bits) for column in zip(*bits))
    assert abs(sum(map(sum, bits)) / (len(bits) * 8 * ID_BYTES) - 0.5) < 0.04


def live_sessions(prefix: str) -> int:
    now_ms = int(time.time() * 1000)
    return redis.Redis.from_url(SHARED_REDIS_URL).zcount(prefix + "sessions", now_ms + 1, "+inf")


def test_the_session_limit_is_store_wide_across_replicas(lb, redis_prefix):
    free = MAX_SESSIONS - live_sessions(redis_prefix)
    assert free >= 2, "sessions left over by another test"
    made = []
    for i in range(free):
        r = create(lb.replicas[i % 2].url, (KEY_A, KEY_B)[i % 2])
        assert r.status_code == 201, r.text
        made.append((i % 2, r.json()["id"], (KEY_A, KEY_B)[i % 2]))
    try:
        for url in [r.url for r in lb.replicas] + [lb.url]:
            for key in (KEY_A, KEY_B):
                full = create(url, key)
                assert full.status_code == 429, full.text
                assert full.json()["error"]["code"] == "too_many_sessions" and int(full.headers["retry-after"]) > 0
        # A session deleted on one replica frees its place for the other.
        where, sid, key = made.pop(0)
        assert httpx.delete(f"{lb.replicas[1 - where].url}/v1/sessions/{sid}", headers=auth(key)).status_code == 204
        again = create(lb.replicas[where].url, KEY_A)
        assert again.status_code == 201, again.text
        made.append((where, again.json()["id"], KEY_A))
    finally:
        for _, sid, key in made:
            httpx.delete(f"{lb.url}/v1/sessions/{sid}", headers=auth(key))


def test_every_route_but_the_probes_needs_a_key(lb):
    spec = httpx.get(lb.url + "/openapi.json").json()
    routes = [(method.upper(), path) for path, item in spec["paths"].items() for method in item
              if method in ("get", "post", "put", "patch", "delete")]
    guarded = [(method, path) for method, path in routes if path not in PROBES]
    assert {("POST", "/v1/encode"), ("POST", "/v1/decode"), ("GET", "/v1/models"), ("POST", "/v1/sessions"),
            ("GET", "/v1/sessions/{session_id}"), ("DELETE", "/v1/sessions/{session_id}"),
            ("POST", "/v1/sessions/{session_id}/chunks/{seq}"), ("POST", "/v1/sessions/{session_id}/finish")} \
        <= set(guarded)
    for method, path in guarded:
        url = lb.url + path.format(session_id=secrets.token_urlsafe(ID_BYTES), seq=0)
        missing = httpx.request(method, url)
        assert missing.status_code == 401, (method, path, missing.text)
        assert missing.json()["error"]["code"] == "missing_api_key" and missing.headers["www-authenticate"] == "Bearer"
        wrong = httpx.request(method, url, headers=auth("not-a-key"))
        assert wrong.status_code == 403, (method, path, wrong.text)
        assert wrong.json()["error"]["code"] == "invalid_api_key"
    # Probes answer anyone; metrics are for the scraper on each replica, not through the balancer.
    assert PROBES <= {path for _, path in routes}
    assert all(httpx.get(lb.url + path).status_code == 200 for path in ("/healthz", "/readyz"))
    assert all(httpx.get(r.url + "/metrics").status_code == 200 for r in lb.replicas)
    assert httpx.get(lb.url + "/metrics").status_code == 404
