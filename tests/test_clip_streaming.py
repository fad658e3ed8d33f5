"""Whole-clip requests stream through the model against a real `cdt serve` process:
long clips equal the CLI's chunked reconstruct, responses stream (mp4 included),
a client that leaves stops the work, hostile headers allocate nothing, and memory
admission refuses what can never fit."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import av
import httpx
import numpy as np
import pytest

from cdt_client.formats.tensors import npy_header
from cdt_client.formats.video import DISPLAY_SIZE_TAG
from media import read_video
from service.memory import MAX_CHUNK_FRAMES
from tests.servers import Server

pytestmark = pytest.mark.timeout(600)

CLIP = "mmaction2__test.mp4"  # 300 frames, 340x256
CDT = Path(sys.executable).parent / "cdt"


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    with Server(tiny_checkpoint, tmp_path_factory.mktemp("logs") / "server.log") as s:
        yield s


def test_a_257_frame_round_trip_equals_the_cli_chunked_reconstruct(server, tiny_checkpoint, shared_videos, tmp_path):
    video = shared_videos / CLIP
    with httpx.Client(base_url=server.url, timeout=300) as http:
        latents = http.post("/v1/encode", params={"frames": 257, "size": 24}, content=video.read_bytes(),
                            headers={"content-type": "video/mp4"})
        assert latents.status_code == 200, latents.text
        frames = http.post("/v1/decode", params={"format": "npy"}, content=latents.content,
                           headers={"content-type": "application/x-safetensors"})
        assert frames.status_code == 200, frames.text
        assert int(frames.headers["content-length"]) == len(frames.content)
    served = np.load(io.BytesIO(frames.content))
    out = tmp_path / "cli.npy"
    subprocess.run([CDT, "reconstruct", video, "-o", out, "--checkpoint", tiny_checkpoint, "--frames", "257",
                    "--size", "24", "--chunk", str(MAX_CHUNK_FRAMES), "--quiet"], check=True, capture_output=True)
    cli = np.load(out)
    assert served.shape == cli.shape == (257, 24, 32, 3)
    # The server runs a clip this small in chunks of MAX_CHUNK_FRAMES frames, as the CLI here:
    # the same operations in the same order, so the frames are equal on any CPU.
    np.testing.assert_array_equal(served, cli)


def test_a_streamed_mp4_response_is_a_valid_file_with_every_frame(server, shared_videos, tmp_path):
    with httpx.Client(base_url=server.url, timeout=300) as http:
        latents = http.post("/v1/encode", params={"frames": 45, "size": 21},
                            content=(shared_videos / CLIP).read_bytes(), headers={"content-type": "video/mp4"})
        assert latents.status_code == 200, latents.text
        with http.stream("POST", "/v1/decode", content=latents.content,
                         headers={"content-type": "application/x-safetensors"}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "video/mp4"
            assert "content-length" not in response.headers  # sent as it is made
            parts = list(response.iter_bytes())
    path = tmp_path / "out.mp4"
    path.write_bytes(b"".join(parts))
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert container.metadata.get(DISPLAY_SIZE_TAG) == "28x21"  # odd height: padded, size recorded
    assert len(decoded) == 45
    assert read_video(path).frames.shape == (45, 21, 28, 3)


def test_a_client_that_disconnects_stops_the_decode(server, shared_videos):
    with httpx.Client(base_url=server.url, timeout=300) as http:
        latents = http.post("/v1/encode", params={"frames": 9, "size": 128},
                            content=(shared_videos / CLIP).read_bytes(), headers={"content-type": "video/mp4"})
        assert latents.status_code == 200, latents.text
    # Long latents (1,021 frames of 128x170, zeros): hundreds of chunks of 0.5 MB each, far
    # more than the socket buffers between server and client hold.
    item = latents_with_frames(latents.content, 1021)
    jobs_before = server.metric("cdt_compute_seconds_count", op="decode", outcome="ok")
    with httpx.Client(base_url=server.url, timeout=300) as http:
        with http.stream("POST", "/v1/decode", params={"format": "npy"}, content=item,
                         headers={"content-type": "application/x-safetensors"}) as response:
            assert response.status_code == 200
            next(response.iter_raw())  # the first chunk arrived: the stream is running
    deadline = time.monotonic() + 60
    while server.metric("cdt_requests_cancelled_total", op="decode") < 1:
        assert time.monotonic() < deadline, "the disconnect was never noticed"
        time.sleep(0.2)
    # The job in flight when the disconnect was noticed may still finish; then nothing runs.
    while server.metric("cdt_jobs_in_flight") > 0:
        assert time.monotonic() < deadline, "a job is still running"
        time.sleep(0.2)
    settled = server.metric("cdt_compute_seconds_count", op="decode", outcome="ok")
    time.sleep(2)
    assert server.metric("cdt_compute_seconds_count", op="decode", outcome="ok") == settled
    total_chunks = 1 + (1021 - 1) // 8  # chunks of 2 latent frames at most
    assert settled - jobs_before < total_chunks / 4


def latents_with_frames(latents_file: bytes, frames: int) -> bytes:
    """A latents file like `latents_file` whose clip is `frames` frames long (zeros)."""
    import torch

    from media.latents_file import LatentsFile, latents_from_bytes, latents_to_bytes
    from media.padding import Padding

    item = latents_from_bytes(latents_file)
    fields = {**vars(item.info), "frames": frames, "padding": Padding.for_shape(frames, item.height, item.width,
                                                                               item.time_factor)}
    shape = (1, 16, 1 + (frames - 1) // 4, *item.latents.shape[3:])
    return latents_to_bytes(LatentsFile(latents=torch.zeros(shape), **fields))


def test_a_hostile_npy_header_is_refused_without_allocating(server):
    body = npy_header(np.uint8, (100000, 4096, 4096, 3)) + b"\0" * 1000
    before = server.peak_rss_bytes()
    start = time.perf_counter()
    response = httpx.post(server.url + "/v1/encode", content=body, headers={"content-type": "application/x-npy"})
    elapsed = time.perf_counter() - start
    assert response.status_code in (413, 422), response.text
    assert response.json()["error"]["code"] in ("invalid_tensor", "clip_too_large")
    assert elapsed < 2
    assert server.peak_rss_bytes() - before < 20_000 * 1024  # under 20 MB: nothing of the claimed size touched


def test_a_request_over_the_memory_budget_gets_413_with_the_largest_size_that_fits(tiny_checkpoint, tmp_path):
    with Server(tiny_checkpoint, tmp_path / "server.log", memory_budget_mb=600) as small:
        frames = np.random.default_rng(0).integers(0, 256, (5, 512, 512, 3), dtype=np.uint8)
        body = io.BytesIO()
        np.save(body, frames)
        refused = httpx.post(small.url + "/v1/encode", content=body.getvalue(),
                             headers={"content-type": "application/x-npy"}, timeout=120)
        assert refused.status_code == 413, refused.text
        error = refused.json()["error"]
        assert error["code"] == "clip_too_large"
        details = error["details"]
        assert details["estimate_bytes"] > details["budget_bytes"] == 600 * 2**20
        side = details["max_square_side"]
        assert 8 <= side < 512
        body = io.BytesIO()
        np.save(body, frames[:, :side, :side])
        fits = httpx.post(small.url + "/v1/encode", content=body.getvalue(),
                          headers={"content-type": "application/x-npy"}, timeout=300)
        assert fits.status_code == 200, fits.text
