"""diffusers' own remote VAE helpers (`diffusers.utils.remote_utils`) against a real server's
/v1/diffusers endpoints, compared with /v1/encode and /v1/decode for the same frames, latents,
steps and seed."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from diffusers.utils import remote_utils
from diffusers.video_processor import VideoProcessor
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cdt_client.formats.tensors import safetensors_metadata
from media import read_video
from tests.servers import Server
from tests.session_helpers import npy_array, npy_bytes, real_frames
from tests.tolerance import assert_uint8_close


# Both routes of each comparison run the same admission and the same chunked coder on the same
# server: equal by construction, except where diffusers quantises float frames itself.
STEPS, SEED = 2, 3
NPY = {"content-type": "application/x-npy"}
SAFETENSORS = {"content-type": "application/x-safetensors"}


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    with Server(tiny_checkpoint, tmp_path_factory.mktemp("diffusers") / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def frames(shared_videos):
    """17 real frames of 48x40: on the latent grid, so /v1/decode's crop keeps every pixel."""
    return np.ascontiguousarray(real_frames(shared_videos, 17, size=40)[:, :48])


def encode(server, frames: np.ndarray) -> bytes:
    response = httpx.post(server.url + "/v1/encode", content=npy_bytes(frames), headers=NPY, timeout=60)
    assert response.status_code == 200, response.text
    return response.content


def decode(server, latents_file: bytes) -> np.ndarray:
    response = httpx.post(server.url + "/v1/decode", params={"steps": STEPS, "seed": SEED, "format": "npy"},
                          content=latents_file, headers=SAFETENSORS, timeout=60)
    assert response.status_code == 200, response.text
    return npy_array(response.content)


def with_latents(latents_file: bytes, latents: torch.Tensor) -> bytes:
    """The latents file with other latents of the same shape."""
    return st_save({"latents": latents.float().contiguous()}, metadata=safetensors_metadata(latents_file))


def decode_endpoint(server) -> str:
    return f"{server.url}/v1/diffusers/decode?steps={STEPS}&seed={SEED}"


def test_remote_decode_returns_the_frames_of_v1_decode(server, frames, tmp_path):
    latents_file = encode(server, frames)
    latents = st_load(latents_file)["latents"]
    reference = decode(server, latents_file)
    endpoint = decode_endpoint(server)

    exact = remote_utils.remote_decode(endpoint, latents, output_type="pt", partial_postprocess=True,
                                       return_type="pt")
    assert exact.dtype == torch.uint8 and np.array_equal(exact.numpy(), reference)

    # diffusers' normalisation, undone by the service: latents * 0.5 sent with scaling_factor 0.5
    # (a power of two: the round trip is exact), float frames in [-1,1] back.
    video = remote_utils.remote_decode(endpoint, latents * 0.5, scaling_factor=0.5, output_type="pt",
                                       return_type="pt")
    assert video.shape == (1, 3, *frames.shape[:3]) and video.dtype == torch.float32
    postprocessed = VideoProcessor().postprocess_video(video, output_type="np")[0]  # (T,H,W,3) in [0,1]
    # Float frames quantised here rather than by the service: one rounding apart.
    assert_uint8_close((postprocessed * 255).round().astype(np.uint8), reference)

    # Half-precision latents; "pil" with a video processor answers frames in [0,1].
    images = remote_utils.remote_decode(endpoint, latents.half(), output_type="pil", processor=VideoProcessor())
    half_reference = decode(server, with_latents(latents_file, latents.half()))
    assert_uint8_close(np.stack([np.asarray(image) for image in images]), half_reference)

    mp4 = remote_utils.remote_decode(endpoint, latents, output_type="mp4", return_type="mp4")
    ours = httpx.post(server.url + "/v1/decode", params={"steps": STEPS, "seed": SEED}, content=latents_file,
                      headers=SAFETENSORS, timeout=60)
    (tmp_path / "remote.mp4").write_bytes(mp4)
    (tmp_path / "ours.mp4").write_bytes(ours.content)
    clip = read_video(tmp_path / "remote.mp4")
    assert clip.frames.shape == frames.shape and clip.fps == 30
    assert np.array_equal(clip.frames, read_video(tmp_path / "ours.mp4").frames)


def test_remote_encode_returns_the_latents_of_v1_encode(server, frames):
    reference = st_load(encode(server, frames))["latents"]
    endpoint = f"{server.url}/v1/diffusers/encode"
    # (1,3,T,H,W) in [-1,1], contiguous: remote_encode sends a non-contiguous tensor's bytes from a freed copy.
    video = (torch.from_numpy(frames).permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1).contiguous()
    latents = remote_utils.remote_encode(endpoint, video)
    assert latents.shape == reference.shape and torch.equal(latents, reference)
    scaled = remote_utils.remote_encode(endpoint, video, scaling_factor=0.5, shift_factor=0.25)
    assert torch.equal(scaled, (reference - 0.25) * 0.5)


def test_an_image_round_trips_through_remote_encode_and_remote_decode(server, frames):
    image_file = encode(server, frames[:1])
    latents = remote_utils.remote_encode(f"{server.url}/v1/diffusers/encode", Image.fromarray(frames[0]))
    reference = st_load(image_file)["latents"]
    assert latents.shape == reference.shape[:2] + reference.shape[3:]  # (1,16,h,w): an image's latents
    assert torch.equal(latents, reference[:, :, 0])
    image = remote_utils.remote_decode(decode_endpoint(server), latents, output_type="pil", image_format="png")
    assert image.format == "png" and np.array_equal(np.asarray(image), decode(server, image_file)[0])


def test_bad_requests_raise_the_service_json_error(server):
    endpoint = decode_endpoint(server)
    with pytest.raises(RuntimeError, match="invalid_latents"):
        remote_utils.remote_decode(endpoint, torch.zeros(1, 4, 2, 3, 3), output_type="mp4", return_type="mp4")
    with pytest.raises(RuntimeError, match="invalid_input"):  # an image answer of 5 frames
        remote_utils.remote_decode(endpoint, torch.zeros(1, 16, 2, 3, 3))
    response = httpx.post(endpoint, params={"shape": [1, 16, 1, 2, 2], "dtype": "float32"}, content=b"\0" * 12)
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_parameter"
    response = httpx.post(endpoint, params={"shape": [1, 16, 1, 1, 1], "dtype": "float32"},
                          content=np.full(16, np.nan, np.float32).tobytes())
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_latents"
    response = httpx.post(f"{server.url}/v1/diffusers/encode", content=b"GIF89a" + b"\0" * 20)
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"
