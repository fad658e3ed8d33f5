"""Faults through the real load balancer: Debian's nginx with deploy/nginx.conf in front of
two `cdt serve` replicas and Redis (tests/nginx.py), driven by the service's own client.
Each fault is bounded in time and traffic, on loopback:

- a replica SIGKILLed while it computes a session chunk: nginx answers 502, the client
  repeats the seq, nginx sends it to the other replica, which rebuilds the stream; the
  streamed latents equal the whole clip's;
- a replica SIGTERMed during a whole-clip request: that request completes, new requests go
  to the other replica, and the replica exits cleanly;
- Redis down in the middle of a chunk, then back: 503 `session_store_unavailable` while it
  is down, and the chunk is not applied; a Redis that kept its data lets the session go on
  (equal to the uninterrupted stream), and one run as the deploy files run it (no
  persistence) has lost the session, which every call reports (404 `session_not_found`);
- 4x overload: 429 with Retry-After, no 5xx, and every request succeeds through the
  client's backoff.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np
import pytest

from cdt_client.client import AsyncClient, Client, NotFound
from cdt_client.retry import Retrying
from tests.nginx import CONFIG, Deployment, loopback_config
from tests.servers import SHARED_REDIS_URL, RedisServer, Server, metric_sum, wait_for
from tests.session_helpers import latents_of, npy_bytes, real_frames
from tests.tolerance import assert_float_close

KEY = "lb-faults-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NPY = {**AUTH, "content-type": "application/x-npy"}
QUEUE_SIZE = 1  # per replica: 1 running + 1 waiting
SIDE = 64  # short side of the frames; the clip is portrait, so 64x83


def deployment(checkpoint, scratch, redis_url, prefix) -> Deployment:
    return Deployment(checkpoint, scratch, redis_url, prefix, api_keys=KEY, queue_size=QUEUE_SIZE)


@pytest.fixture
def fresh(tiny_checkpoint, tmp_path, redis_prefix):
    """A deployment of its own, for a test that breaks it."""
    with deployment(tiny_checkpoint, tmp_path, SHARED_REDIS_URL, redis_prefix) as running:
        yield running


@pytest.fixture(scope="module")
def frames(shared_videos):
    return real_frames(shared_videos, 33, size=SIDE)


def encode(url: str, frames: np.ndarray) -> bytes:
    r = httpx.post(url + "/v1/encode", content=npy_bytes(frames), headers=NPY, timeout=120)
    assert r.status_code == 200, r.text
    return r.content


# --- watching the traffic and the replicas --------------------------------------------------

@dataclass
class Exchange:
    method: str
    path: str
    status: int | None  # None: no answer (a connection error)
    headers: httpx.Headers
    body: bytes  # error answers only


def exchange(request: httpx.Request, response: httpx.Response, body: bytes) -> Exchange:
    return Exchange(request.method, request.url.path, response.status_code, response.headers, body)


class Recording(httpx.HTTPTransport):
    """Passes every request through and records each answer the client gets."""

    def __init__(self) -> None:
        super().__init__()
        self.exchanges: list[Exchange] = []

    def handle_request(self, request):
        try:
            response = super().handle_request(request)
        except httpx.TransportError:
            self.exchanges.append(Exchange(request.method, request.url.path, None, httpx.Headers(), b""))
            raise
        self.exchanges.append(exchange(request, response, response.read() if response.status_code >= 400 else b""))
        return response


class AsyncRecording(httpx.AsyncHTTPTransport):
    """`Recording` for the async client."""

    def __init__(self) -> None:
        super().__init__()
        self.exchanges: list[Exchange] = []

    async def handle_async_request(self, request):
        response = await super().handle_async_request(request)
        body = await response.aread() if response.status_code >= 400 else b""
        self.exchanges.append(exchange(request, response, body))
        return response


def jobs(replica: Server, op: str) -> tuple[float, float] | None:
    """Jobs of `op` finished, and jobs running, on a replica (None once it is gone)."""
    try:
        text = replica.metrics()
    except httpx.TransportError:
        return None
    return metric_sum(text, "cdt_compute_seconds_count", op=op), metric_sum(text, "cdt_jobs_in_flight")


def when_computing(replicas: list[Server], op: str, job: int, act) -> Future:
    """In a thread: wait until a replica computes its job number `job` (from 0, counted from
    now) of `op`, then `act(replica)`. The future gives the replica's index."""
    start = [jobs(r, op)[0] for r in replicas]
    found: list[int] = []
    future: Future = Future()

    def computing() -> bool:
        for i, replica in enumerate(replicas):
            state = jobs(replica, op)
            if state is not None and state[0] - start[i] == job and state[1] > 0:
                found.append(i)
                return True
        return False

    def watch() -> None:
        try:
            wait_for(computing, f"no replica computed {op} job {job}", timeout_s=60)
            act(replicas[found[0]])
            future.set_result(found[0])
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=watch, daemon=True).start()
    return future


def error_code(exchange: Exchange) -> str:
    return json.loads(exchange.body)["error"]["code"]


# --- the balancer under test ----------------------------------------------------------------

def test_the_balancer_runs_the_shipped_config_with_only_addresses_and_paths_rewritten(tmp_path):
    shipped = CONFIG.read_text()
    rewritten = loopback_config(shipped, [8101, 8102], 8100, tmp_path)
    diff = list(difflib.ndiff(shipped.splitlines(), rewritten.splitlines()))
    removed = [line[2:].strip() for line in diff if line.startswith("- ")]
    added = [line[2:].strip() for line in diff if line.startswith("+ ")]
    # Changed: each upstream's two servers and the listen line, nothing else in them.
    swapped = [line.replace("cdt-1:8000", "127.0.0.1:8101").replace("cdt-2:8000", "127.0.0.1:8102")
               .replace("listen 8080;", "listen 127.0.0.1:8100;") for line in removed]
    assert len(removed) == 5 and all(new != old and new in added for new, old in zip(swapped, removed)), diff
    # Added: where nginx writes, and as whom its workers run.
    assert all(str(tmp_path) in line or line.startswith("user ") for line in added if line not in swapped), added
    # A config the rewrite no longer fits fails instead of running something else.
    for changed in (shipped.replace("listen 8080;", "listen 80;"),
                    shipped.replace("server cdt-2:8000", "server cdt-3:8000")):
        with pytest.raises(AssertionError, match="deploy/nginx.conf"):
            loopback_config(changed, [8101, 8102], 8100, tmp_path)


# --- faults ---------------------------------------------------------------------------------

def test_replica_killed_mid_chunk_the_client_repeats_the_seq_on_the_other_replica(fresh, frames):
    whole = encode(fresh.url, frames)
    recording = Recording()
    killed = when_computing(fresh.replicas, "session_encode", 2, Server.kill)  # chunk 2 of 5
    with Client(fresh.url, api_key=KEY, transport=recording) as client:
        streamed = client.stream_encode(frames, chunk_frames=8)
    victim = killed.result(timeout=5)
    survivor = fresh.replicas[1 - victim]
    assert_float_close(latents_of(streamed), latents_of(whole))
    # The balancer did not resend the POST whose body had gone out: the client saw 502 for
    # chunk 2 and repeated it; everything else was answered first time.
    failed = [(e.path, e.status) for e in recording.exchanges if e.status not in (200, 201)]
    chunk2 = session_of(recording) + "/chunks/2"
    assert failed == [(chunk2, 502)], failed
    retried = [e for e in recording.exchanges if e.path == chunk2][1]
    assert retried.status == 200 and retried.headers["x-cdt-rebuild"] == "missing"
    assert "x-cdt-replayed" not in retried.headers  # computed by the survivor, not replayed
    # The survivor rebuilt once (from the latest snapshot, or the log, which starts at chunk 0),
    # then kept the stream hot.
    assert survivor.metric("cdt_session_rebuilds_total", reason="missing") == 1
    assert survivor.metric("cdt_session_hot_hits_total") == 3  # chunks 3 and 4, and the finish


def test_replica_sigterm_during_a_whole_clip_request_completes_it(fresh, frames, tmp_path):
    latents = tmp_path / "clip.safetensors"
    latents.write_bytes(encode(fresh.url, frames[:17]))
    reference = httpx.post(fresh.url + "/v1/decode?format=npy&seed=2", content=latents.read_bytes(), timeout=120,
                           headers={**AUTH, "content-type": "application/x-safetensors"})
    assert reference.status_code == 200, reference.text
    recording = Recording()
    terminated = when_computing(fresh.replicas, "decode", 0, lambda r: r.process.send_signal(signal.SIGTERM))
    with Client(fresh.url, api_key=KEY, transport=recording) as client, ThreadPoolExecutor(1) as background:
        decoding = background.submit(client.decode_file, latents, format="npy", seed=2)
        index = terminated.result(timeout=60)
        draining, other = fresh.replicas[index], fresh.replicas[1 - index]
        # A request sent after the signal goes to the other replica.
        served = {"endpoint": "/v1/encode", "status": "200"}
        before = other.metric("cdt_request_seconds_count", **served)
        client.encode_file(_npy_file(tmp_path, frames[:5]))
        assert other.metric("cdt_request_seconds_count", **served) == before + 1
        decoded = decoding.result(timeout=120)
    # One attempt, answered in full: the accepted request was not cut and silently retried.
    assert [(e.path, e.status) for e in recording.exchanges if e.path == "/v1/decode"] == [("/v1/decode", 200)]
    assert decoded == reference.content
    # uvicorn re-raises the signal once the graceful shutdown is over.
    assert draining.process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Traceback" not in draining.log_path.read_text()


def _npy_file(directory, frames):
    path = directory / "frames.npy"
    path.write_bytes(npy_bytes(frames))
    return path


@pytest.fixture(scope="module")
def private(tiny_checkpoint, tmp_path_factory):
    """A deployment on a Redis of its own, which its tests stop and restart."""
    scratch = tmp_path_factory.mktemp("private")
    store = RedisServer(scratch).start(persistent=True)
    try:
        with deployment(tiny_checkpoint, scratch, store.url, "cdt:") as running:
            yield running, store
    finally:
        store.stop()


def assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def session_of(recording: Recording) -> str:
    """The URL path of the session the client streams through."""
    chunk = next(e.path for e in recording.exchanges if "/chunks/" in e.path)
    return chunk[: chunk.index("/chunks/")]


def test_redis_killed_mid_chunk_503_until_it_is_back_then_the_session_continues(private, frames):
    lb, store = private
    frames = frames[:25]
    whole = encode(lb.url, frames)
    recording = Recording()

    def outage(_):
        store.kill()  # while chunk 2 computes: its commit will fail
        wait_for(lambda: any(e.status == 503 for e in recording.exchanges), "the client saw no 503", 60)
        session = lb.url + session_of(recording)
        assert_error(httpx.get(session, headers=AUTH), 503, "session_store_unavailable")
        assert_error(httpx.post(lb.url + "/v1/sessions", json={"kind": "encode"}, headers=AUTH), 503,
                     "session_store_unavailable")
        assert all(httpx.get(r.url + "/readyz").status_code == 503 for r in lb.replicas)
        encode(lb.url, frames[:5])  # whole clips do not need the store
        store.start(persistent=True)  # every acknowledged write was on disk

    restarted = when_computing(lb.replicas, "session_encode", 2, outage)
    with Client(lb.url, api_key=KEY, transport=recording) as client:
        streamed = client.stream_encode(frames, chunk_frames=8)  # chunks of 8, 8, 8, 1 frames
    restarted.result(timeout=5)
    assert_float_close(latents_of(streamed), latents_of(whole))
    # Chunk 2 was not applied before Redis died (its stream was dropped with it); the client
    # repeated it through the outage until it was computed again and committed once.
    chunk2 = [e for e in recording.exchanges if e.path.endswith("/chunks/2")]
    assert [e.status for e in chunk2[:-1]] == [503] * (len(chunk2) - 1) and len(chunk2) >= 2
    assert all(error_code(e) == "session_store_unavailable" for e in chunk2[:-1])
    assert chunk2[-1].status == 200 and chunk2[-1].headers["x-cdt-rebuild"] == "missing"
    assert "x-cdt-replayed" not in chunk2[-1].headers
    assert all(e.status in (200, 201) for e in recording.exchanges if e not in chunk2)


def test_redis_restarted_without_persistence_every_call_reports_the_session_lost(private, frames):
    lb, store = private
    recording = Recording()

    def restart(_):
        store.stop()
        store.start(persistent=False)  # as the deploy files run it: nothing survives a restart

    restarted = when_computing(lb.replicas, "session_encode", 1, restart)
    with Client(lb.url, api_key=KEY, transport=recording) as client, pytest.raises(NotFound) as lost:
        client.stream_encode(frames[:17], chunk_frames=8)
    restarted.result(timeout=5)
    assert lost.value.code == "session_not_found"
    session = lb.url + session_of(recording)
    for answer in (httpx.get(session, headers=AUTH), httpx.post(session + "/finish", headers=AUTH),
                   httpx.delete(session, headers=AUTH)):
        assert_error(answer, 404, "session_not_found")
    with Client(lb.url, api_key=KEY) as client:  # a new session works
        assert latents_of(client.stream_encode(frames[:5], chunk_frames=4)).shape[2] == 2


@pytest.fixture(scope="module")
def shared(tiny_checkpoint, tmp_path_factory, redis_prefix):
    with deployment(tiny_checkpoint, tmp_path_factory.mktemp("lb"), SHARED_REDIS_URL, redis_prefix) as running:
        yield running


def test_four_times_overload_gets_429_with_retry_after_and_the_client_backs_off_to_success(shared, frames,
                                                                                          tmp_path):
    capacity = len(shared.replicas) * (1 + QUEUE_SIZE)
    inputs = []
    for i in range(4):
        path = tmp_path / f"clip{i}.npy"
        path.write_bytes(npy_bytes(frames[i : i + 5]))
        inputs.append((path, encode(shared.url, frames[i : i + 5])))
    requests = [inputs[i % len(inputs)] for i in range(4 * capacity)]
    rejected_before = sum(r.metric("cdt_jobs_rejected_total", reason="queue_full") for r in shared.replicas)
    recording = AsyncRecording()

    async def burst():
        # Attempts enough that the test is about backing off, not about how slow a shared machine
        # makes the queue (the default of 8 is for a client's own budget).
        async with AsyncClient(shared.url, api_key=KEY, transport=recording, retry=Retrying(attempts=40)) as client:
            return await asyncio.gather(*(client.encode_file(path) for path, _ in requests))

    results = asyncio.run(burst())
    for result, (_, reference) in zip(results, requests):  # requests waiting together run batched
        assert_float_close(latents_of(result), latents_of(reference))
    statuses = [e.status for e in recording.exchanges]
    refused = [e for e in recording.exchanges if e.status == 429]
    assert statuses.count(200) == len(requests) and len(refused) + len(requests) == len(statuses), statuses
    assert len(refused) >= len(requests) - capacity  # at least all but the first `capacity` were refused once
    assert all(error_code(e) == "overloaded" and int(e.headers["retry-after"]) >= 1 for e in refused)
    # Every refusal came from a replica's queue, none from the balancer.
    rejected = sum(r.metric("cdt_jobs_rejected_total", reason="queue_full") for r in shared.replicas)
    assert rejected - rejected_before == len(refused)
