"""Run by tests/test_client_no_torch.py in a venv that has the client distribution (cdt-client)
but no torch or PyAV: drives a real server through `cdt_client` and writes what it got back.

usage: python no_torch_client.py URL API_KEY FRAMES.npy OUT_DIR
"""

import asyncio
import importlib.metadata
import json
import sys
from pathlib import Path

import numpy as np

import cdt_client
from cdt_client import AsyncClient, Client

SERVER_SIDE = ("torch", "av", "media", "model", "fastapi", "service")


def loaded() -> list[str]:
    return [name for name in SERVER_SIDE if name in sys.modules]


def main(url: str, key: str, frames_path: str, out: str) -> None:
    out_dir = Path(out)
    report = {"loaded_on_import": loaded(), "client_file": cdt_client.__file__,
              "requires": importlib.metadata.requires("cdt-client")}
    frames = np.load(frames_path)
    with Client(url, api_key=key) as client:
        client.encode_file(frames_path, out_dir / "whole.safetensors")
        streamed = client.stream_encode(frames, chunk_frames=8)
        (out_dir / "streamed.safetensors").write_bytes(streamed)
        client.decode_file(out_dir / "streamed.safetensors", out_dir / "decoded.npy", steps=2, seed=3)
        np.save(out_dir / "stream_decoded.npy", client.stream_decode(streamed, chunk_latents=2, steps=2, seed=3))
        try:
            client.stream_encode(out_dir / "clip.mp4")
        except ImportError as exc:
            report["video_error"] = str(exc)

    async def run_async() -> bytes:
        async with AsyncClient(url, api_key=key) as client:
            return await client.stream_encode(frames, chunk_frames=5)

    (out_dir / "async_streamed.safetensors").write_bytes(asyncio.run(run_async()))
    report["loaded_at_end"] = loaded()
    (out_dir / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
