"""The service end to end: a real `cdt serve` (uvicorn) process over HTTP, tiny
checkpoint, clips cut from the shared set. Issue 5's checks 1 (round trip equals
`cdt reconstruct`), 2 (bad-input corpus), 4 (metrics) and 5 (auth) over the wire."""

from __future__ import annotations

import io
import json
import signal
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
import torch
from test_media import cut_clip

from cdt_client.client import Client, Conflict, Forbidden, InvalidInput, Unauthorized
from cli.main import main as cdt
from media import encode_frames, load_frames, read_video, write_video
from media.latents_file import latents_from_bytes, latents_to_bytes
from model import CDTConfig, build_model, content_hash
from service.memory import MAX_CHUNK_FRAMES
from tests.servers import Server, metric_sum

KEY = "test-key-1"
UPLOAD_MB = 1
STARTUP_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    with Server(tiny_checkpoint, tmp_path_factory.mktemp("server") / "log.txt", api_keys=KEY,
                max_upload_mb=str(UPLOAD_MB)) as running:
        yield running.url


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(server):
    with Client(server, api_key=KEY, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def clip(shared_videos, tmp_path_factory) -> Path:
    """6 frames (not 1+4k) of odd size 27x21: padding and crop-back on both axes."""
    return cut_clip(shared_videos, tmp_path_factory.mktemp("clip") / "odd.mp4")


def reconstruct_locally(source: Path, checkpoint: Path, output: Path, seed: int) -> np.ndarray:
    """`cdt reconstruct` in the server's chunk schedule: a clip this small runs in chunks of
    MAX_CHUNK_FRAMES frames on the server, so both sides run the same operations in the same
    order and their frames are equal by construction, on any CPU."""
    assert cdt(["reconstruct", str(source), "-o", str(output), "--checkpoint", str(checkpoint), "--seed", str(seed),
                "--chunk", str(MAX_CHUNK_FRAMES), "--quiet"]) == 0
    return load_frames(output)[0]


# --- 1. round trip -------------------------------------------------------------------------

@pytest.mark.exactness
def test_mp4_round_trip_equals_local_reconstruct(client, clip, tiny_checkpoint, tmp_path):
    client.encode_file(clip, tmp_path / "latents.safetensors")
    served = np.load(io.BytesIO(client.decode_file(tmp_path / "latents.safetensors", seed=3, format="npy")))
    local = reconstruct_locally(clip, tiny_checkpoint, tmp_path / "local.npy", seed=3)
    assert served.shape == local.shape == (6, 27, 21, 3)
    np.testing.assert_array_equal(served, local)


@pytest.mark.exactness
@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_tensor_round_trip_equals_local_reconstruct(client, clip, tiny_checkpoint, tmp_path, suffix):
    from media import save_frames

    frames = read_video(clip).frames
    source = tmp_path / f"frames{suffix}"
    save_frames(source, frames, fps=20.0)
    latents = client.encode_file(source)
    (tmp_path / "latents.safetensors").write_bytes(latents)
    served = np.load(io.BytesIO(client.decode_file(tmp_path / "latents.safetensors", seed=5, format="npy")))
    np.testing.assert_array_equal(served, reconstruct_locally(source, tiny_checkpoint, tmp_path / "local.npy", 5))


def test_decode_returns_mp4_at_original_size_and_rate(client, clip, tmp_path):
    client.encode_file(clip, tmp_path / "latents.safetensors")
    client.decode_file(tmp_path / "latents.safetensors", tmp_path / "out.mp4")
    decoded, source = read_video(tmp_path / "out.mp4"), read_video(clip)
    assert decoded.frames.shape == source.frames.shape and decoded.fps == source.fps


def test_encode_npy_format_carries_metadata_header(http, clip):
    response = http.post("/v1/encode", content=clip.read_bytes(), params={"format": "npy"},
                         headers={"content-type": "video/mp4"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-npy"
    latents = np.load(io.BytesIO(response.content), allow_pickle=False)
    meta = json.loads(response.headers["x-cdt-metadata"])
    assert latents.shape == (1, 16, 3, 4, 3) and (meta["frames"], meta["height"], meta["width"]) == ("6", "27", "21")


# --- 2. bad-input corpus -------------------------------------------------------------------

def png_bytes() -> bytes:
    """A real 2x2 RGB PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + bytes([200, 10, 10] * 2) for _ in range(2))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def empty_mp4(path: Path) -> None:
    """A well-formed mp4 with an h264 stream and no frames."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def corpus(clip, tiny_checkpoint, tmp_path_factory) -> dict[str, tuple[str, bytes, dict, int, str]]:
    """name -> (endpoint, body, headers, expected status, expected error code)."""
    tmp = tmp_path_factory.mktemp("corpus")
    mp4 = {"content-type": "video/mp4"}
    npy = {"content-type": "application/x-npy"}
    st = {"content-type": "application/x-safetensors"}
    write_video(tmp / "one_pixel.mp4", np.full((5, 1, 1, 3), 128, np.uint8), 10)
    empty_mp4(tmp / "empty.mp4")
    frames = read_video(clip).frames
    torch.manual_seed(1)  # another random init: another content hash
    other = build_model(CDTConfig.from_preset("tiny"), "cdt").eval()
    foreign = latents_to_bytes(encode_frames(other, content_hash(other), [frames], 20.0, streamed=False))
    item = latents_from_bytes(foreign)
    item.model_hash = (tiny_checkpoint / "model.sha256").read_text().strip()
    item.latents[0, 0, 0, 0, 0] = float("nan")
    objects = np.empty(2, dtype=object)
    objects[:] = [{"a": 1}, [1, 2]]
    data = clip.read_bytes()
    return {
        "empty body": ("/v1/encode", b"", mp4, 400, "empty_body"),
        "truncated mp4": ("/v1/encode", data[: len(data) // 2], mp4, 422, "undecodable_video"),
        "png": ("/v1/encode", png_bytes(), {"content-type": "image/png"}, 415, "unsupported_media_type"),
        "png as octet-stream": ("/v1/encode", png_bytes(), {"content-type": "application/octet-stream"}, 415,
                                "unsupported_media_type"),
        "png as mp4": ("/v1/encode", png_bytes(), mp4, 415, "unsupported_media_type"),
        "1x1 video": ("/v1/encode", (tmp / "one_pixel.mp4").read_bytes(), mp4, 422, "video_too_small"),
        "0-frame video": ("/v1/encode", (tmp / "empty.mp4").read_bytes(), mp4, 422, "undecodable_video"),
        "0-frame npy": ("/v1/encode", npy_bytes(np.zeros((0, 32, 32, 3), np.uint8)), npy, 422, "invalid_tensor"),
        "wrong-dtype npy": ("/v1/encode", npy_bytes(frames.astype(np.int16)), npy, 422, "invalid_tensor"),
        "pickle-bearing npy": ("/v1/encode", npy_bytes(objects, allow_pickle=True), npy, 422, "invalid_tensor"),
        "latents of another model": ("/v1/decode", foreign, st, 409, "model_mismatch"),
        "oversize body": ("/v1/encode", b"\0" * (UPLOAD_MB * 2**20 + 1), mp4, 413, "payload_too_large"),
        "NaN latents": ("/v1/decode", latents_to_bytes(item), st, 422, "invalid_latents"),
        "mp4 sent to decode": ("/v1/decode", data, mp4, 415, "unsupported_media_type"),
        "bad steps": ("/v1/decode?steps=0", foreign, st, 400, "bad_parameter"),
        "bad format": ("/v1/encode?format=gif", data, mp4, 400, "bad_parameter"),
    }


CORPUS = ["empty body", "truncated mp4", "png", "png as octet-stream", "png as mp4", "1x1 video", "0-frame video",
          "0-frame npy", "wrong-dtype npy", "pickle-bearing npy", "latents of another model", "oversize body",
          "NaN latents", "mp4 sent to decode", "bad steps", "bad format"]


@pytest.mark.parametrize("name", CORPUS)
def test_bad_input_gets_its_documented_error_and_the_server_keeps_serving(http, corpus, clip, name):
    endpoint, body, headers, status, code = corpus[name]
    response = http.post(endpoint, content=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert http.post("/v1/encode", content=clip.read_bytes(), headers={"content-type": "video/mp4"}).status_code == 200


def test_client_raises_typed_errors(client, corpus, tmp_path):
    (tmp_path / "foreign.safetensors").write_bytes(corpus["latents of another model"][1])
    with pytest.raises(Conflict) as conflict:
        client.decode_file(tmp_path / "foreign.safetensors")
    assert conflict.value.code == "model_mismatch" and conflict.value.status == 409
    (tmp_path / "bad.npy").write_bytes(corpus["wrong-dtype npy"][1])
    with pytest.raises(InvalidInput, match="invalid_tensor"):
        client.encode_file(tmp_path / "bad.npy")


# --- 4. metrics, 5. auth -------------------------------------------------------------------

def test_metrics_show_non_zero_histograms_after_requests(http, client, clip):
    client.encode_file(clip)
    text = httpx.get(str(http.base_url) + "/metrics").text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['cdt_request_seconds_count{endpoint="/v1/encode",status="200"}'] >= 1
    assert samples['cdt_queue_wait_seconds_count{device="cpu",model="tiny",op="encode"}'] >= 1
    assert samples['cdt_compute_seconds_count{device="cpu",model="tiny",op="encode",outcome="ok"}'] >= 1
    assert samples['cdt_compute_seconds_sum{device="cpu",model="tiny",op="encode",outcome="ok"}'] > 0
    assert samples['cdt_media_seconds_count{op="read_video"}'] >= 1  # container decoding, on the host pool
    assert samples['cdt_media_seconds_count{op="open_video"}'] >= 1
    assert samples['cdt_frames_processed_total{model="tiny",op="encode"}'] >= 6
    assert samples['cdt_bytes_total{direction="in",endpoint="/v1/encode"}'] >= clip.stat().st_size
    assert 'cdt_model_info{' in text and 'preset="tiny"' in text and 'model="tiny"' in text


def test_auth_missing_key_401_wrong_key_403(server, clip):
    body, headers = clip.read_bytes(), {"content-type": "video/mp4"}
    missing = httpx.post(server + "/v1/encode", content=body, headers=headers)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(server + "/v1/encode", content=body, headers={**headers, "Authorization": "Bearer nope"})
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "invalid_api_key"
    with Client(server, api_key="nope") as bad, pytest.raises(Forbidden):
        bad.models()
    with Client(server) as anonymous, pytest.raises(Unauthorized):
        anonymous.models()
    # Probes and metrics stay open for orchestrators and scrapers.
    assert all(httpx.get(server + p).status_code == 200 for p in ("/healthz", "/readyz", "/metrics"))


def test_models_and_openapi_describe_the_service(client, server, tiny_checkpoint):
    (model,) = client.models()
    assert model["hash"] == (tiny_checkpoint / "model.sha256").read_text().strip()
    assert model["preset"] == "tiny" and model["dtype"] == "fp32" and model["compression"]["ratio"] == 48
    spec = httpx.get(server + "/openapi.json").json()
    encode = spec["paths"]["/v1/encode"]["post"]
    assert {"video/mp4", "application/x-npy", "application/x-safetensors"} <= set(encode["requestBody"]["content"])
    assert "application/x-safetensors" in encode["responses"]["200"]["content"]
    assert "video/mp4" in spec["paths"]["/v1/decode"]["post"]["responses"]["200"]["content"]


# --- clean shutdown ------------------------------------------------------------------------

def metric(url: str, name: str) -> float:
    return metric_sum(httpx.get(url + "/metrics").text, name)


def test_sigterm_finishes_accepted_requests(tiny_checkpoint, tmp_path):
    server = Server(tiny_checkpoint, tmp_path / "log.txt", queue_size="4").wait_ready()
    proc, url = server.process, server.url
    body = npy_bytes(np.random.default_rng(0).integers(0, 256, (17, 64, 64, 3), dtype=np.uint8))
    post = lambda: httpx.post(url + "/v1/encode", content=body, timeout=120,  # noqa: E731
                              headers={"content-type": "application/x-npy"})
    try:
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(post) for _ in range(3)]
            deadline = time.monotonic() + 60
            while metric(url, "cdt_jobs_in_flight") + metric(url, "cdt_queue_depth") < 3:
                assert time.monotonic() < deadline, "the three jobs were never all accepted"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 3
        assert all(latents_from_bytes(r.content).frames == 17 for r in responses)
        # uvicorn re-raises the signal once the graceful shutdown is over.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Traceback" not in (tmp_path / "log.txt").read_text()
    finally:
        server.stop()
