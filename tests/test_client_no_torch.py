"""The client distribution (client/) installed alone by pip into a venv without torch or PyAV,
against a real server: whole-clip and streamed encodes and decodes agree with the server's own
/v1 answers, and nothing of the server side is imported."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
from safetensors.numpy import load as st_load

from cdt_client import Client
from cdt_client.formats.tensors import safetensors_metadata
from cdt_client.streaming import VIDEO_EXTRA
from media import write_video
from tests.servers import REPO, Server
from tests.session_helpers import npy_array, npy_bytes, real_frames
from tests.tolerance import assert_float_close, assert_uint8_close

KEY = "no-torch-key"


@pytest.fixture(scope="session")
def client_venv(tmp_path_factory):
    """A venv holding the client distribution and what pip installs with it. The client is
    built from a copy, so that the build leaves nothing in the source tree."""
    root = tmp_path_factory.mktemp("client-venv")
    source = shutil.copytree(REPO / "client", root / "client", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(source)], capture_output=True,
                             text=True)
    assert install.returncode == 0, install.stderr
    modules = subprocess.run([str(python), "-c", "import importlib.util as u; print([m for m in ('torch', 'av', "
                              "'media', 'model', 'service') if u.find_spec(m)])"], cwd=root, check=True,
                             capture_output=True, text=True).stdout
    assert modules.strip() == "[]", f"the client venv has {modules}"
    return python


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    with Server(tiny_checkpoint, tmp_path_factory.mktemp("server") / "server.log", api_keys=KEY) as running:
        yield running


@pytest.fixture(scope="module")
def frames(shared_videos):
    return real_frames(shared_videos, 17)  # 36x47: padded in time and space


def test_client_without_torch_encodes_decodes_and_streams(client_venv, server, frames, tmp_path):
    (tmp_path / "frames.npy").write_bytes(npy_bytes(frames))
    script = shutil.copy(REPO / "tests" / "no_torch_client.py", tmp_path)  # run outside the source tree
    run = subprocess.run([str(client_venv), script, server.url, KEY, str(tmp_path / "frames.npy"), str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    auth = {"Authorization": f"Bearer {KEY}"}
    whole = httpx.post(server.url + "/v1/encode", content=npy_bytes(frames), timeout=60,
                       headers={**auth, "content-type": "application/x-npy"})
    streamed = (tmp_path / "streamed.safetensors").read_bytes()
    decoded = httpx.post(server.url + "/v1/decode", params={"steps": 2, "seed": 3, "format": "npy"},
                         content=streamed, timeout=60,
                         headers={**auth, "content-type": "application/x-safetensors"})
    assert whole.status_code == decoded.status_code == 200, (whole.text, decoded.text)

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["loaded_on_import"] == [] and report["loaded_at_end"] == []
    assert report["client_file"].startswith(str(client_venv.parents[1])), report["client_file"]
    # The extra the error names is the distribution's, and it brings PyAV.
    assert f"cdt-client[{VIDEO_EXTRA}]" in report["video_error"] and "PyAV" in report["video_error"]
    assert any(r.startswith("av") and f'extra == "{VIDEO_EXTRA}"' in r for r in report["requires"]), report["requires"]

    assert (tmp_path / "whole.safetensors").read_bytes() == whole.content
    reference = st_load(whole.content)["latents"]
    for name in ("streamed.safetensors", "async_streamed.safetensors"):
        data = (tmp_path / name).read_bytes()
        assert safetensors_metadata(data) == safetensors_metadata(whole.content), name
        latents = st_load(data)["latents"]
        assert_float_close(latents, reference)

    # The streamed latents file decodes like any /v1/encode file, cropped to the clip's size.
    assert (tmp_path / "decoded.npy").read_bytes() == decoded.content
    reference_frames = npy_array(decoded.content)
    assert reference_frames.shape == frames.shape
    stream_decoded = np.load(tmp_path / "stream_decoded.npy")
    assert stream_decoded.shape == frames.shape
    assert_uint8_close(stream_decoded, reference_frames)  # other chunkings


def test_stream_encode_of_a_video_file_reads_the_frames_the_server_reads(server, frames, tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, frames, fps=24)  # odd-sized: the file records its display size
    with Client(server.url, api_key=KEY) as client:
        streamed = client.stream_encode(path, chunk_frames=8)
        whole = client.encode_file(path)
    assert safetensors_metadata(streamed) == safetensors_metadata(whole)
    assert safetensors_metadata(whole)["fps"] == "24.0"
    assert_float_close(st_load(streamed)["latents"], st_load(whole)["latents"])
