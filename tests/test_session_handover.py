"""Sessions moving between real replicas with snapshots in a directory they share (the file
snapshot store) and records in the real Redis:

- a replica SIGTERMed while it holds live encode and decode sessions hands them over: their
  next chunks, sent through the real nginx, are computed on the other replica from the
  snapshots the drain wrote, replaying no chunk, bit for bit as if nothing had happened;
- a replica SIGKILLed mid-session under the snapshot policy: the other replica replays at
  most the policy's chunks since the latest snapshot, bit for bit;
- expired and deleted sessions leave no snapshot files and no keys.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import numpy as np
import pytest
import redis
import torch

from cdt_client.retry import Retrying
from tests.nginx import Nginx
from tests.servers import SHARED_REDIS_URL, Server, metric_sum, start_replicas, wait_for
from tests.session_helpers import latents_of, npy_array, npy_bytes, real_frames

NPY = {"content-type": "application/x-npy"}
REBUILD_TARGET = 3  # chunk computes: snapshots every 1 or 2 chunks here
CHUNKS = 6  # per session before the move


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("snapshots")


@pytest.fixture(scope="module")
def settings(snapshot_dir, redis_prefix):
    """What every replica of these tests runs with."""
    return {"redis_url": SHARED_REDIS_URL, "session_key_prefix": redis_prefix,
            "session_snapshot_store": f"file://{snapshot_dir}", "session_rebuild_target": REBUILD_TARGET,
            "session_snapshot_sweep_s": 0.5}


@pytest.fixture(scope="module")
def replicas(tiny_checkpoint, tmp_path_factory, settings):
    servers = start_replicas(tiny_checkpoint, tmp_path_factory.mktemp("logs"), **settings)
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture
def doomed(tiny_checkpoint, tmp_path, settings):
    """A third replica, which the test stops."""
    server = Server(tiny_checkpoint, tmp_path / "doomed.log", **settings).wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def frames(shared_videos):
    return real_frames(shared_videos, 4 * CHUNKS + 4)


def session_dirs(snapshot_dir, prefix) -> list[str]:
    root = snapshot_dir / prefix.replace(":", "-").strip("-")
    return sorted(os.listdir(root)) if root.exists() else []


class Stream:
    """A session's inputs, chunk by chunk, and how to read its answers."""

    def __init__(self, kind: str, frames: np.ndarray) -> None:
        self.kind = kind
        if kind == "encode":
            self.spec, self.fmt = {"kind": "encode"}, "safetensors"
            self.chunks = [frames[4 * i:4 * i + 4] for i in range(CHUNKS + 1)]
        else:
            h, w = frames.shape[1:3]
            self.spec, self.fmt = {"kind": "decode", "seed": 5, "height": h, "width": w}, "npy"
            generator = torch.Generator().manual_seed(1)
            self.chunks = [torch.randn(1, 16, 1, (h + 7) // 8, (w + 7) // 8, generator=generator).numpy()
                           for _ in range(CHUNKS + 1)]

    def create(self, url: str) -> str:
        r = httpx.post(url + "/v1/sessions", json=self.spec)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def push(self, url: str, sid: str, seq: int) -> httpx.Response:
        return httpx.post(f"{url}/v1/sessions/{sid}/chunks/{seq}?format={self.fmt}", content=npy_bytes(self.chunks[seq]),
                          headers=NPY, timeout=120)

    def output(self, response: httpx.Response) -> torch.Tensor:
        assert response.status_code == 200, response.text
        return latents_of(response.content) if self.kind == "encode" else torch.from_numpy(npy_array(response.content))

    def run(self, url: str, chunks: int) -> tuple[str, list[torch.Tensor]]:
        sid = self.create(url)
        return sid, [self.output(self.push(url, sid, seq)) for seq in range(chunks)]


def snapshot_seq(url: str, sid: str) -> int | None:
    return httpx.get(f"{url}/v1/sessions/{sid}").json()["snapshot_seq"]


@pytest.mark.exactness
def test_sigterm_hands_every_session_over_through_the_balancer(doomed, replicas, frames, tmp_path):
    survivor = replicas[0]
    streams = [Stream(kind, frames) for kind in ("encode", "decode", "encode", "decode")]
    # What each session answers uninterrupted: the same chunks on one replica.
    references = [stream.run(survivor.url, CHUNKS + 1)[1] for stream in streams]
    sessions = []
    for stream, reference in zip(streams, references):
        sid, outputs = stream.run(doomed.url, CHUNKS)
        assert all(torch.equal(a, b) for a, b in zip(outputs, reference))
        sessions.append(sid)
    lb = Nginx([doomed.port, survivor.port], tmp_path).wait_ready()
    try:
        before = survivor.metrics()
        doomed.process.send_signal(signal.SIGTERM)
        wait_for(lambda: not _ready(doomed.url), "the replica never stopped being ready", timeout_s=10)
        retrying = Retrying(backoff_s=0.05)  # a chunk sent while the listener was still open: 503 draining
        answers = [retrying.send(lambda s=s, sid=sid: s.push(lb.url, sid, CHUNKS))
                   for s, sid in zip(streams, sessions)]
        after = survivor.metrics()
    finally:
        lb.stop()
    for stream, answer, reference in zip(streams, answers, references):
        assert answer.headers.get("x-cdt-rebuild") == "missing"
        assert torch.equal(stream.output(answer), reference[CHUNKS])  # exact: the state itself moved

    def delta(name, **labels):
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    # Each rebuilt from its drain snapshot, taken after its last chunk: no chunk replayed, so the
    # stall is the snapshot's read and restore, no compute.
    assert delta("cdt_session_rebuilds_total", source="snapshot") == len(streams)
    assert delta("cdt_session_snapshot_age_chunks_count") == len(streams)
    assert delta("cdt_session_snapshot_age_chunks_sum") == 0
    assert doomed.process.wait(timeout=60) in (0, -signal.SIGTERM)
    log = doomed.log_path.read_text()
    assert f"{len(streams)} hot streams snapshotted, 0 left to rebuild from the log" in log, log[-2000:]
    assert "Traceback" not in log


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.exactness
@pytest.mark.parametrize("kind", ["encode", "decode"])
def test_sigkill_mid_session_replays_at_most_the_policy_interval(kind, doomed, replicas, frames, snapshot_dir,
                                                                  redis_prefix):
    survivor = replicas[1]
    stream = Stream(kind, frames)
    _, reference = stream.run(survivor.url, CHUNKS + 1)
    sid, outputs = stream.run(doomed.url, CHUNKS)
    assert all(torch.equal(a, b) for a, b in zip(outputs, reference))
    time.sleep(0.5)  # the policy's last snapshot, written off the response path
    latest = snapshot_seq(doomed.url, sid)
    assert latest is not None and CHUNKS - 1 - latest < REBUILD_TARGET
    assert sid in session_dirs(snapshot_dir, redis_prefix)  # in the directory the replicas share
    doomed.kill()
    before = survivor.metrics()
    answer = stream.push(survivor.url, sid, CHUNKS)
    after = survivor.metrics()
    assert answer.headers.get("x-cdt-rebuild") == "missing"
    assert torch.equal(stream.output(answer), reference[CHUNKS])
    replayed = (metric_sum(after, "cdt_session_snapshot_age_chunks_sum")
                - metric_sum(before, "cdt_session_snapshot_age_chunks_sum"))
    assert replayed == CHUNKS - 1 - latest <= REBUILD_TARGET - 1
    assert (metric_sum(after, "cdt_session_rebuilds_total", source="snapshot")
            - metric_sum(before, "cdt_session_rebuilds_total", source="snapshot")) == 1


def test_expired_and_deleted_sessions_leave_no_snapshot_files_or_keys(replicas, frames, snapshot_dir, redis_prefix):
    url = replicas[0].url
    stream = Stream("encode", frames)

    def snapshotted(sid: str) -> str:
        for seq in range(REBUILD_TARGET):
            stream.output(stream.push(url, sid, seq))
        wait_for(lambda: snapshot_seq(url, sid) is not None, "no snapshot written", timeout_s=10)
        return sid

    deleted, finished = snapshotted(stream.create(url)), snapshotted(stream.create(url))
    assert {deleted, finished} <= set(session_dirs(snapshot_dir, redis_prefix))  # the directory they share
    assert httpx.delete(f"{url}/v1/sessions/{deleted}").status_code == 204
    assert httpx.post(f"{url}/v1/sessions/{finished}/finish").status_code == 200
    assert not {deleted, finished} & set(session_dirs(snapshot_dir, redis_prefix))  # at once
    # One that expires: its files go with a sweep, on whichever replica runs one first.
    short = snapshotted(httpx.post(f"{url}/v1/sessions", json={"kind": "encode", "ttl_s": 4}).json()["id"])
    wait_for(lambda: short not in session_dirs(snapshot_dir, redis_prefix), "the expired session's snapshot "
             "was never swept", timeout_s=15, every_s=0.1)
    keys = [k.decode() for k in redis.Redis.from_url(SHARED_REDIS_URL).scan_iter(f"{redis_prefix}*")]
    assert not [k for k in keys if short in k or deleted in k]
