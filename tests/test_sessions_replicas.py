"""Sessions across real server processes sharing the real Redis (and a 3-master Redis
Cluster): handoff between replicas (stale hot streams rebuilt), a replica killed in the
middle of a chunk, racing duplicates, model pinning, expiry, and Redis going away."""

import concurrent.futures
import threading
import time

import httpx
import numpy as np
import pytest
import redis
import torch

from model import CDTConfig, build_model, save_pretrained
from tests.redis_cluster import redis_cluster  # noqa: F401 (fixture)
from tests.servers import SHARED_REDIS_URL, RedisServer, Server, metric_sum, start_replicas, wait_for
from tests.session_helpers import latents_of, npy_array, npy_bytes, real_frames, split
from tests.tolerance import assert_float_close, assert_uint8_close

NPY = {"content-type": "application/x-npy"}
SIZES = [1, 3, 4, 7, 9]


@pytest.fixture(scope="module")
def replicas(tiny_checkpoint, tmp_path_factory, redis_prefix):
    servers = start_replicas(tiny_checkpoint, tmp_path_factory.mktemp("logs"), redis_url=SHARED_REDIS_URL,
                             session_key_prefix=redis_prefix)
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def cluster_replicas(tiny_checkpoint, tmp_path_factory, redis_cluster):  # noqa: F811 (fixture)
    servers = start_replicas(tiny_checkpoint, tmp_path_factory.mktemp("cluster-logs"), redis_url=redis_cluster.url,
                             session_key_prefix="cdt:")
    yield servers
    for s in servers:
        s.stop()


STORES = ["replicas", "cluster_replicas"]  # the two-replica tests run on a single Redis and on a cluster


@pytest.fixture(scope="module")
def frames(shared_videos):
    return real_frames(shared_videos, 33)


@pytest.fixture(scope="module")
def whole(replicas, frames):
    r = httpx.post(replicas[0].url + "/v1/encode", content=npy_bytes(frames), headers=NPY, timeout=120)
    assert r.status_code == 200, r.text
    return r.content


def push(url, sid, seq, data, fmt="safetensors"):
    return httpx.post(f"{url}/v1/sessions/{sid}/chunks/{seq}?format={fmt}", content=npy_bytes(data),
                      headers=NPY, timeout=120)


def rebuild_of(response) -> str:
    return response.headers.get("x-cdt-rebuild", "")


@pytest.mark.parametrize("store", STORES)
def test_encode_handoff_alternating_replicas(request, store, frames, whole):
    replicas = request.getfixturevalue(store)
    sid = httpx.post(replicas[0].url + "/v1/sessions", json={"kind": "encode"}).json()["id"]
    parts, rebuilds = [], []
    for seq, (a, b) in enumerate(split(len(frames), SIZES)):
        r = push(replicas[seq % 2].url, sid, seq, frames[a:b])
        assert r.status_code == 200, r.text
        parts.append(latents_of(r.content))
        rebuilds.append(rebuild_of(r))
    parts.append(latents_of(httpx.post(f"{replicas[1].url}/v1/sessions/{sid}/finish", timeout=60).content))
    streamed = torch.cat(parts, dim=2)
    assert_float_close(streamed, latents_of(whole))
    # Chunk 1 lands where the session never was; every later one where the other replica advanced it.
    assert rebuilds == ["", "missing"] + ["stale"] * (len(rebuilds) - 2)


@pytest.mark.parametrize("store,steps", [("replicas", 1), ("replicas", 3), ("cluster_replicas", 1)])
def test_decode_handoff_alternating_replicas(request, store, steps, frames, whole):
    replicas = request.getfixturevalue(store)
    reference = httpx.post(f"{replicas[0].url}/v1/decode?steps={steps}&seed=3&format=npy", content=whole,
                           headers={"content-type": "application/x-safetensors"}, timeout=120)
    assert reference.status_code == 200, reference.text
    latents = latents_of(whole)
    h, w = frames.shape[1:3]
    spec = {"kind": "decode", "steps": steps, "seed": 3, "height": h, "width": w, "frames": len(frames)}
    sid = httpx.post(replicas[1].url + "/v1/sessions", json=spec).json()["id"]
    parts = []
    for seq, (a, b) in enumerate(split(latents.shape[2], [1, 3, 2])):
        r = push(replicas[seq % 2].url, sid, seq, latents[:, :, a:b].numpy(), fmt="npy")
        assert r.status_code == 200, r.text
        assert rebuild_of(r) == ("" if seq == 0 else "missing" if seq == 1 else "stale")
        parts.append(npy_array(r.content))
    assert_uint8_close(np.concatenate(parts), npy_array(reference.content))  # other chunkings


def metric(url: str, name: str) -> float:
    return metric_sum(httpx.get(url + "/metrics").text, name)


def test_a_replica_continues_on_its_hot_stream(replicas, frames, whole):
    hits = [metric(r.url, "cdt_session_hot_hits_total") for r in replicas]
    sid = httpx.post(replicas[0].url + "/v1/sessions", json={"kind": "encode"}).json()["id"]
    parts, rebuilds = [], []
    chunks = split(len(frames), [1, 8, 8, 8, 8])
    assert len(chunks) == 5
    for seq, ((a, b), replica) in enumerate(zip(chunks, [0, 0, 0, 1, 0])):
        r = push(replicas[replica].url, sid, seq, frames[a:b])
        assert r.status_code == 200, r.text
        parts.append(latents_of(r.content))
        rebuilds.append(rebuild_of(r))
    finish = httpx.post(f"{replicas[0].url}/v1/sessions/{sid}/finish", timeout=60)
    parts.append(latents_of(finish.content))
    assert_float_close(torch.cat(parts, dim=2), latents_of(whole))
    assert rebuilds + [rebuild_of(finish)] == ["", "", "", "missing", "stale", ""]
    # Replica 0 computed chunks 1, 2 and the finish on its hot stream.
    assert [metric(r.url, "cdt_session_hot_hits_total") - h for r, h in zip(replicas, hits)] == [3, 0]


@pytest.mark.parametrize("kind,steps", [("encode", 1), ("decode", 1), ("decode", 3)])
def test_replica_killed_in_the_middle_of_a_chunk(kind, steps, tiny_checkpoint, tmp_path, redis_prefix, replicas, frames,
                                                 whole):
    if kind == "encode":
        spec, fmt, chunks = {"kind": "encode"}, "safetensors", split(len(frames), [1, 4, 28])
        inputs = lambda a, b: frames[a:b]  # noqa: E731
        output = lambda r: latents_of(r.content)  # noqa: E731
    else:
        h, w = frames.shape[1:3]
        spec = {"kind": "decode", "steps": steps, "seed": 3, "height": h, "width": w, "frames": len(frames)}
        latents = latents_of(whole)
        fmt, chunks = "npy", split(latents.shape[2], [1, 4, 4])
        inputs = lambda a, b: latents[:, :, a:b].numpy()  # noqa: E731
        output = lambda r: npy_array(r.content)  # noqa: E731
    doomed = Server(tiny_checkpoint, tmp_path / "doomed.log", redis_url=SHARED_REDIS_URL,
                    session_key_prefix=redis_prefix).wait_ready()
    try:
        sid = httpx.post(doomed.url + "/v1/sessions", json=spec).json()["id"]
        parts = [output(push(doomed.url, sid, seq, inputs(a, b), fmt)) for seq, (a, b) in enumerate(chunks[:2])]
        (a, b), lost = chunks[2], []
        sender = threading.Thread(target=lambda: lost.append(_try_push(doomed.url, sid, 2, inputs(a, b), fmt)))
        sender.start()
        wait_for(doomed.computing, "chunk 2 never started computing")
        doomed.kill()  # SIGKILL while chunk 2 computes on the hot stream
        sender.join(30)
    finally:
        doomed.stop()
    assert lost == [None]  # the client saw the connection drop
    r = push(replicas[0].url, sid, 2, inputs(a, b), fmt)  # the client's retry, on the other replica
    assert r.status_code == 200, r.text
    assert rebuild_of(r) == "missing" and "x-cdt-replayed" not in r.headers
    parts.append(output(r))
    if kind == "encode":
        parts.append(latents_of(httpx.post(f"{replicas[0].url}/v1/sessions/{sid}/finish", timeout=60).content))
        assert_float_close(torch.cat(parts, dim=2), latents_of(whole))
        return
    reference = httpx.post(f"{replicas[0].url}/v1/decode?steps={steps}&seed=3&format=npy", content=whole,
                           headers={"content-type": "application/x-safetensors"}, timeout=120)
    assert_uint8_close(np.concatenate(parts), npy_array(reference.content))  # other chunkings


def _try_push(url, sid, seq, data, fmt):
    try:
        return push(url, sid, seq, data, fmt)
    except httpx.TransportError:
        return None


def test_concurrent_duplicates_apply_once(replicas, frames):
    sid = httpx.post(replicas[0].url + "/v1/sessions", json={"kind": "encode"}).json()["id"]
    assert push(replicas[0].url, sid, 0, frames[:1]).status_code == 200
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: push(replicas[i % 2].url, sid, 1, frames[1:9]), range(4)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert len({a.content for a in answers}) == 1
    state = httpx.get(f"{replicas[1].url}/v1/sessions/{sid}").json()
    assert state["next_seq"] == 2 and state["frames_in"] == 9 and state["latents_out"] == 3


def test_session_is_pinned_to_its_model(tmp_path, redis_prefix, replicas, frames):
    torch.manual_seed(123)
    other_ckpt = tmp_path / "other"
    save_pretrained(build_model(CDTConfig.from_preset("tiny"), "cdt"), other_ckpt)
    sid = httpx.post(replicas[0].url + "/v1/sessions", json={"kind": "encode"}).json()["id"]
    assert push(replicas[0].url, sid, 0, frames[:1]).status_code == 200
    with Server(other_ckpt, tmp_path / "other.log", redis_url=SHARED_REDIS_URL,
                session_key_prefix=redis_prefix) as other:
        r = push(other.url, sid, 1, frames[1:5])
        assert r.status_code == 409 and r.json()["error"]["code"] == "model_mismatch"
    assert push(replicas[1].url, sid, 1, frames[1:5]).status_code == 200


def test_expired_and_deleted_sessions_leave_no_keys(replicas, redis_prefix, frames):
    url = replicas[0].url
    short = httpx.post(url + "/v1/sessions", json={"kind": "encode", "ttl_s": 1}).json()["id"]
    assert push(url, short, 0, frames[:5]).status_code == 200
    gone = httpx.post(url + "/v1/sessions", json={"kind": "encode"}).json()["id"]
    assert push(url, gone, 0, frames[:5]).status_code == 200
    assert httpx.delete(f"{url}/v1/sessions/{gone}").status_code == 204
    time.sleep(1.5)
    for sid in (short, gone):
        r = httpx.get(f"{url}/v1/sessions/{sid}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
        assert push(url, sid, 1, frames[5:9]).status_code == 404
    keys = [k.decode() for k in redis.Redis.from_url(SHARED_REDIS_URL).scan_iter(f"{redis_prefix}*")]
    assert not [k for k in keys if short in k or gone in k]


def test_redis_stopped_gives_503_and_whole_clips_keep_working(tiny_checkpoint, tmp_path, frames):
    with RedisServer(tmp_path) as store, Server(tiny_checkpoint, tmp_path / "s.log", redis_url=store.url) as server:
        sid = httpx.post(server.url + "/v1/sessions", json={"kind": "encode"}).json()["id"]
        store.stop()
        for response in (push(server.url, sid, 0, frames[:5]),
                         httpx.post(server.url + "/v1/sessions", json={"kind": "encode"}),
                         httpx.get(f"{server.url}/v1/sessions/{sid}")):
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "session_store_unavailable"
        assert httpx.get(server.url + "/readyz").status_code == 503
        encoded = httpx.post(server.url + "/v1/encode", content=npy_bytes(frames[:5]), headers=NPY, timeout=60)
        assert encoded.status_code == 200
        store.start()
        sid = httpx.post(server.url + "/v1/sessions", json={"kind": "encode"}).json()["id"]
        assert push(server.url, sid, 0, frames[:5]).status_code == 200
        assert httpx.get(server.url + "/readyz").status_code == 200


class LoseResponses(httpx.HTTPTransport):
    """Delivers every request, but drops the response of the chosen chunk pushes, as a
    connection cut after the server answered would."""

    def __init__(self, lose: set[int]) -> None:
        super().__init__()
        self.lose, self.seen = lose, 0

    def handle_request(self, request):
        response = super().handle_request(request)
        if "/chunks/" in request.url.path:
            self.seen += 1
            if self.seen in self.lose:
                response.read()
                raise httpx.ReadError("connection lost after the server answered", request=request)
        return response


def test_client_streams_and_retries_lost_answers_with_the_same_seq(replicas, shared_videos, tmp_path):
    from media import write_video
    from cdt_client.client import Client
    from cdt_client.retry import Retrying
    from tests.session_helpers import real_frames

    clip = tmp_path / "clip.mp4"
    source = real_frames(shared_videos, 21)
    write_video(clip, source, fps=20)
    url = replicas[0].url
    whole = httpx.post(url + "/v1/encode", content=clip.read_bytes(), headers={"content-type": "video/mp4"},
                       timeout=60)
    transport = LoseResponses(lose={2, 4})
    with Client(url, transport=transport, retry=Retrying(backoff_s=0.01)) as client:
        streamed = client.stream_encode(clip, chunk_frames=6)
        assert transport.seen == 6  # 4 chunks + 2 retries
        assert_float_close(latents_of(streamed), latents_of(whole.content))
        frames = client.stream_decode(streamed, chunk_latents=2, seed=4)
    reference = httpx.post(url + "/v1/decode?seed=4&format=npy", content=whole.content,
                           headers={"content-type": "application/x-safetensors"}, timeout=60)
    assert frames.shape == source.shape
    assert_uint8_close(frames, npy_array(reference.content))  # other chunkings
