"""Streaming sessions in process (in-memory store): equivalence with the whole-clip
endpoints, exactly-once chunks, ownership, limits and errors, and rebuilds of evicted
streams from the input log and from snapshots."""

import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.servers import metric_sum
from tests.session_helpers import chunk_info, latents_of, npy_array, npy_bytes, real_frames, split
from tests.tolerance import assert_float_close, assert_uint8_close

NPY = {"content-type": "application/x-npy"}


def make_client(checkpoint, **overrides) -> TestClient:
    return TestClient(create_app(Settings(checkpoint=checkpoint, **overrides)))


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    with make_client(tiny_checkpoint) as c:
        yield c


@pytest.fixture(scope="module")
def frames(shared_videos):
    return real_frames(shared_videos, 23)  # not 1+4k: finish pads the tail


@pytest.fixture(scope="module")
def whole_latents(client, frames):
    r = client.post("/v1/encode", content=npy_bytes(frames), headers=NPY)
    assert r.status_code == 200, r.text
    return latents_of(r.content)


def stream_encode(client, frames, sizes, headers=None):
    sid = client.post("/v1/sessions", json={"kind": "encode"}, headers=headers).json()["id"]
    parts = []
    for seq, (a, b) in enumerate(split(len(frames), sizes)):
        r = client.post(f"/v1/sessions/{sid}/chunks/{seq}", content=npy_bytes(frames[a:b]),
                        headers={**NPY, **(headers or {})})
        assert r.status_code == 200, r.text
        parts.append(latents_of(r.content))
    r = client.post(f"/v1/sessions/{sid}/finish", headers=headers)
    assert r.status_code == 200, r.text
    parts.append(latents_of(r.content))
    return sid, torch.cat(parts, dim=2), chunk_info(r)


@pytest.mark.exactness
@pytest.mark.parametrize("sizes", [[1, 3, 4, 7, 9], [5], [23]], ids=["1-3-4-7-9", "fives", "one-chunk"])
def test_encode_session_equals_whole_clip(client, frames, whole_latents, sizes):
    _, streamed, info = stream_encode(client, frames, sizes)
    assert_float_close(streamed, whole_latents)  # other chunkings: within float rounding
    assert info["finished"] and info["frames"] == 23 and info["pad_frames"] == 2
    assert (info["height"], info["width"]) == frames.shape[1:3]


@pytest.mark.exactness
def test_decode_session_equals_whole_clip(client, frames):
    encoded = client.post("/v1/encode", content=npy_bytes(frames), headers=NPY).content
    whole = client.post("/v1/decode?steps=2&seed=5&format=npy", content=encoded,
                        headers={"content-type": "application/x-safetensors"})
    assert whole.status_code == 200, whole.text
    latents = latents_of(encoded)
    h, w = frames.shape[1:3]
    sid = client.post("/v1/sessions", json={"kind": "decode", "steps": 2, "seed": 5, "height": h, "width": w,
                                             "frames": len(frames)}).json()["id"]
    parts, done = [], 0
    for seq, (a, b) in enumerate(split(latents.shape[2], [1, 2])):
        r = client.post(f"/v1/sessions/{sid}/chunks/{seq}?format=npy", content=npy_bytes(latents[:, :, a:b]),
                        headers=NPY)
        assert r.status_code == 200, r.text
        assert chunk_info(r)["frame_start"] == done
        parts.append(npy_array(r.content))
        done += len(parts[-1])
    assert client.post(f"/v1/sessions/{sid}/finish").json()["frames_out"] == len(frames)
    streamed, reference = np.concatenate(parts), npy_array(whole.content)
    assert streamed.shape == frames.shape
    assert_uint8_close(streamed, reference)  # other chunkings


def test_retry_replays_the_same_bytes_and_gaps_conflict(client, frames):
    sid = client.post("/v1/sessions", json={"kind": "encode"}).json()["id"]
    first = client.post(f"/v1/sessions/{sid}/chunks/0", content=npy_bytes(frames[:5]), headers=NPY)
    again = client.post(f"/v1/sessions/{sid}/chunks/0", content=npy_bytes(frames[:5]), headers=NPY)
    assert first.status_code == again.status_code == 200
    assert again.content == first.content and again.headers.get("x-cdt-replayed") == "1"
    state = client.get(f"/v1/sessions/{sid}").json()
    assert state["next_seq"] == 1 and state["frames_in"] == 5
    assert state["log_chunks"] == 1 and state["log_bytes"] == len(npy_bytes(frames[:5]))
    gap = client.post(f"/v1/sessions/{sid}/chunks/2", content=npy_bytes(frames[5:9]), headers=NPY)
    assert gap.status_code == 409 and gap.json()["error"]["code"] == "seq_out_of_order"
    assert gap.headers["x-cdt-expected-seq"] == "1"
    client.post(f"/v1/sessions/{sid}/chunks/1", content=npy_bytes(frames[5:9]), headers=NPY)
    old = client.post(f"/v1/sessions/{sid}/chunks/0", content=npy_bytes(frames[:5]), headers=NPY)
    assert old.status_code == 409 and old.json()["error"]["code"] == "seq_out_of_order"
    finish = client.post(f"/v1/sessions/{sid}/finish")
    assert client.post(f"/v1/sessions/{sid}/finish").content == finish.content
    late = client.post(f"/v1/sessions/{sid}/chunks/2", content=npy_bytes(frames[9:13]), headers=NPY)
    assert late.status_code == 409 and late.json()["error"]["code"] == "session_finished"
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    assert client.get(f"/v1/sessions/{sid}").json()["error"]["code"] == "session_not_found"


def test_sessions_are_owned_by_their_key(tiny_checkpoint, frames):
    with make_client(tiny_checkpoint, api_keys=("alpha", "beta")) as c:
        alpha, beta = {"authorization": "Bearer alpha"}, {"authorization": "Bearer beta"}
        assert c.post("/v1/sessions", json={"kind": "encode"}).status_code == 401
        sid = c.post("/v1/sessions", json={"kind": "encode"}, headers=alpha).json()["id"]
        assert c.get(f"/v1/sessions/{sid}", headers=alpha).status_code == 200
        for response in (c.get(f"/v1/sessions/{sid}", headers=beta),
                         c.post(f"/v1/sessions/{sid}/chunks/0", content=npy_bytes(frames[:1]),
                                headers={**NPY, **beta}),
                         c.delete(f"/v1/sessions/{sid}", headers=beta)):
            assert response.status_code == 404 and response.json()["error"]["code"] == "session_not_found"


def test_session_limits(tiny_checkpoint, frames):
    with make_client(tiny_checkpoint, max_sessions=1, max_session_log_mb=0.01) as c:
        sid = c.post("/v1/sessions", json={"kind": "encode"}).json()["id"]
        full = c.post("/v1/sessions", json={"kind": "encode"})
        assert full.status_code == 429 and full.json()["error"]["code"] == "too_many_sessions"
        big = c.post(f"/v1/sessions/{sid}/chunks/0", content=npy_bytes(frames[:5]), headers=NPY)
        assert big.status_code == 413 and big.json()["error"]["code"] == "session_log_too_large"
        assert c.get(f"/v1/sessions/{sid}").json()["next_seq"] == 0  # nothing was applied


def test_bad_session_requests(client, frames):
    assert client.post("/v1/sessions", json={"kind": "sideways"}).status_code == 400
    assert client.post("/v1/sessions", json={"kind": "decode", "steps": 0}).status_code == 400
    assert client.post("/v1/sessions", json={"kind": "encode", "dtype": "bf16"}).json()["error"]["code"] == \
        "model_mismatch"
    sid = client.post("/v1/sessions", json={"kind": "encode"}).json()["id"]
    assert client.post(f"/v1/sessions/{sid}/finish").json()["error"]["code"] == "empty_session"
    png = client.post(f"/v1/sessions/{sid}/chunks/0", content=b"\x89PNG\r\n\x1a\n" + b"0" * 64,
                      headers={"content-type": "application/octet-stream"})
    assert png.status_code == 415
    assert client.post(f"/v1/sessions/{sid}/chunks/0", content=npy_bytes(frames[:1]), headers=NPY).status_code == 200
    other = client.post(f"/v1/sessions/{sid}/chunks/1", content=npy_bytes(frames[:4, :, :-8]), headers=NPY)
    assert other.status_code == 422 and other.json()["error"]["code"] == "chunk_shape_mismatch"
    assert client.post(f"/v1/sessions/{sid}/chunks/1?format=mp4", content=npy_bytes(frames[1:5]),
                       headers=NPY).status_code == 400
    assert client.get("/v1/sessions/not-a-real-session-id").status_code == 404
    dec = client.post("/v1/sessions", json={"kind": "decode"}).json()["id"]
    nan = torch.full((1, 16, 1, 4, 4), float("nan")).numpy()
    bad = client.post(f"/v1/sessions/{dec}/chunks/0", content=npy_bytes(nan), headers=NPY)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_latents"
    latents = lambda h: npy_bytes(torch.zeros(1, 16, 1, h, h).numpy())  # noqa: E731
    assert client.post(f"/v1/sessions/{dec}/chunks/0", content=latents(2), headers=NPY).status_code == 200
    failed_jobs = metric(client, "cdt_compute_seconds_count", outcome="error")
    wider = client.post(f"/v1/sessions/{dec}/chunks/1", content=latents(3), headers=NPY)
    assert wider.status_code == 422 and wider.json()["error"]["code"] == "invalid_input"
    assert "2x2" in wider.json()["error"]["message"]
    assert metric(client, "cdt_compute_seconds_count", outcome="error") == failed_jobs  # refused before the model


def metric(client, name: str, **labels) -> float:
    return metric_sum(client.get("/metrics").text, name, **labels)


def wait_for_snapshot(client, sid: str, seq: int) -> None:
    deadline = time.monotonic() + 30
    while client.get(f"/v1/sessions/{sid}").json()["snapshot_seq"] != seq:
        assert time.monotonic() < deadline, "snapshot not written"
        time.sleep(0.05)


def stream_with_rebuilds(client, frames, sizes, snapshot: bool) -> tuple[torch.Tensor, list[str]]:
    """Encode in chunks (waiting for each chunk's snapshot when on); the latents and each
    chunk's X-CDT-Rebuild header."""
    sid = client.post("/v1/sessions", json={"kind": "encode"}).json()["id"]
    parts, rebuilds = [], []
    for seq, (a, b) in enumerate(split(len(frames), sizes)):
        r = client.post(f"/v1/sessions/{sid}/chunks/{seq}", content=npy_bytes(frames[a:b]), headers=NPY)
        assert r.status_code == 200, r.text
        parts.append(latents_of(r.content))
        rebuilds.append(r.headers.get("x-cdt-rebuild", ""))
        if snapshot:
            wait_for_snapshot(client, sid, seq)
    r = client.post(f"/v1/sessions/{sid}/finish")
    rebuilds.append(r.headers.get("x-cdt-rebuild", ""))
    parts.append(latents_of(r.content))
    return torch.cat(parts, dim=2), rebuilds


@pytest.fixture(scope="module")
def long_frames(shared_videos):
    return real_frames(shared_videos, 87)  # past the tiny encoder's receptive field: the log is trimmed


@pytest.mark.exactness
def test_evicted_streams_are_rebuilt_from_the_log_window(tiny_checkpoint, client, long_frames):
    whole = latents_of(client.post("/v1/encode", content=npy_bytes(long_frames), headers=NPY).content)
    with make_client(tiny_checkpoint, session_hot_mb=0.001, session_snapshot_mb=0) as c:  # every chunk rebuilds
        streamed, rebuilds = stream_with_rebuilds(c, long_frames, [9, 30, 13, 35], snapshot=False)
        assert_float_close(streamed, whole)  # rebuilt by replaying a window: within float rounding
        assert rebuilds == ["", "evicted", "evicted", "evicted", "evicted"]
        assert metric(c, "cdt_session_evictions_total") == 4
        assert metric(c, "cdt_session_rebuilds_total", reason="evicted", source="start") >= 1
        assert metric(c, "cdt_session_rebuilds_total", reason="evicted", source="window") >= 1
        assert metric(c, "cdt_session_hot_hits_total") == 0


@pytest.mark.exactness
def test_snapshot_rebuilds_are_bit_identical(tiny_checkpoint, client, long_frames):
    """A snapshot restores the stream's exact state, and the chunks after it run with the
    reference's boundaries: the same operations in the same order, so equal on any CPU."""
    sizes = [1, 8, 5, 11, 7]
    chunks = len(split(40, sizes))
    with make_client(tiny_checkpoint, session_hot_mb=0.001, session_snapshot_mb=64, session_rebuild_target=1,
                     session_snapshot_part_mb=0.05) as c:
        streamed, rebuilds = stream_with_rebuilds(c, long_frames[:40], sizes, snapshot=True)
        _, reference, _ = stream_encode(client, long_frames[:40], sizes)
        assert torch.equal(streamed, reference)
        assert rebuilds[1:] == ["evicted"] * chunks
        assert metric(c, "cdt_session_rebuilds_total", source="snapshot") == chunks
        assert metric(c, "cdt_session_snapshot_bytes_count") == chunks


@pytest.mark.exactness
def test_evicted_decode_streams_are_rebuilt_from_a_resumed_window(tiny_checkpoint):
    # 75 latent frames of 2x2: past the tiny decoder's receptive field at 1 step, so the last
    # chunks rebuild from a stream resumed mid-video (noise indexing continues).
    latents = torch.randn(1, 16, 75, 2, 2, generator=torch.Generator().manual_seed(1))
    sizes = [10, 50, 10, 5]
    with make_client(tiny_checkpoint, session_hot_mb=0.001, session_snapshot_mb=0) as c:
        outputs = {}
        for name, chunks in (("whole", [75]), ("chunked", sizes)):
            sid = c.post("/v1/sessions", json={"kind": "decode", "seed": 2}).json()["id"]
            parts = []
            for seq, (a, b) in enumerate(split(75, chunks)):
                body = npy_bytes(latents[:, :, a:b].numpy())
                r = c.post(f"/v1/sessions/{sid}/chunks/{seq}?format=npy", content=body, headers=NPY)
                assert r.status_code == 200, r.text
                parts.append(npy_array(r.content))
            outputs[name] = np.concatenate(parts)
        assert metric(c, "cdt_session_rebuilds_total", reason="evicted", source="window") >= 1
    assert outputs["whole"].shape == (1 + 4 * 74, 16, 16, 3)
    assert_uint8_close(outputs["chunked"], outputs["whole"])


def test_a_record_in_the_previous_release_layout_is_continued(tiny_checkpoint, frames):
    """A rolling deploy: a replica of cdt-tokenizer 0.1.0 wrote the session's record (log entries
    with the body's kind and content type, the last answer's headers); this release replays the
    last chunk from it and rebuilds the stream from its log."""
    with make_client(tiny_checkpoint, session_hot_mb=0.001, session_snapshot_mb=0) as c:  # the log is replayed
        sid = c.post("/v1/sessions", json={"kind": "encode"}).json()["id"]
        first = c.post(f"/v1/sessions/{sid}/chunks/0", content=npy_bytes(frames[:5]), headers=NPY)
        assert first.status_code == 200, first.text
        stored = c.app.state.store._sessions[sid]
        for entry in stored.meta["log"]:
            entry["body_kind"], entry["content_type"] = entry.pop("format"), NPY["content-type"]
        last = stored.meta["last"]
        last["headers"] = {"X-CDT-Chunk": first.headers["x-cdt-chunk"]}
        del last["chunk"]
        again = c.post(f"/v1/sessions/{sid}/chunks/0", content=npy_bytes(frames[:5]), headers=NPY)
        assert again.content == first.content and again.headers["x-cdt-replayed"] == "1"
        assert again.headers["x-cdt-chunk"] == first.headers["x-cdt-chunk"]
        second = c.post(f"/v1/sessions/{sid}/chunks/1", content=npy_bytes(frames[5:9]), headers=NPY)
        assert second.status_code == 200 and second.headers["x-cdt-rebuild"] == "evicted"
        _, reference, _ = stream_encode(c, frames[:9], [5, 4])
        assert_float_close(torch.cat([latents_of(first.content), latents_of(second.content)], dim=2),
                           reference[:, :, :3])
