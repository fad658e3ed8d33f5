"""Overhead of the HTTP service over the direct model call, for one whole-clip
reconstruct (encode then decode) of 17x256x256 uint8 frames.

Direct: `media.encode_frames` + `media.decode_frames` streamed in the service's default chunks (8 frames,
2 latent frames) in this process.
HTTP: the same clip as npy to /v1/encode, the latents to /v1/decode (npy frames back),
against a real `cdt serve` process on this machine. Both use a random-init tiny-preset
checkpoint in fp32 on the CPU, with torch's default thread count in each process.
Runs alternate direct/HTTP so that load from other processes on the shared machine
drifts into both columns alike; medians are reported.

    python -m benchmarks.http_overhead [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from media import decode_frames, encode_frames
from model import CDTConfig, build_model, from_pretrained, save_pretrained
from service.memory import MAX_CHUNK_FRAMES

from . import report

from tests.servers import Server  # noqa: E402  (the tests' real-server launcher)

# The code these figures describe (`python -m benchmarks.run_all --stale`).
MEASURES = ["model/", "media/", "service/", "benchmarks/http_overhead.py"]

SHAPE = (17, 256, 256)
SEED = 0


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def compute_seconds(http: httpx.Client) -> float:
    """Total model-job time the server has recorded (`cdt_compute_seconds_sum`)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in http.get("/metrics").text.splitlines()
               if line.startswith("cdt_compute_seconds_sum{"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    frames = np.random.default_rng(0).integers(0, 256, (*SHAPE, 3), dtype=np.uint8)
    body = npy(frames)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "tiny"
        torch.manual_seed(0)
        save_pretrained(build_model(CDTConfig.from_preset("tiny"), "cdt"), checkpoint)
        model, identity = from_pretrained(checkpoint)

        def direct() -> np.ndarray:
            with torch.inference_mode():
                chunks = (frames[i : i + MAX_CHUNK_FRAMES] for i in range(0, len(frames), MAX_CHUNK_FRAMES))
                item = encode_frames(model, identity.content_hash, chunks, 30.0, streamed=True)
                decoded = decode_frames(model, identity.content_hash, item, 1, SEED, chunk=MAX_CHUNK_FRAMES // 4)
                return np.concatenate(list(decoded))

        server = Server(checkpoint, Path(tmp) / "server.log").wait_ready()
        url = server.url
        try:
            with httpx.Client(base_url=url, timeout=600) as http:
                def over_http() -> np.ndarray:
                    latents = http.post("/v1/encode", content=body, headers={"content-type": "application/x-npy"})
                    latents.raise_for_status()
                    decoded = http.post("/v1/decode", content=latents.content, params={"seed": SEED, "format": "npy"},
                                        headers={"content-type": "application/x-safetensors"})
                    decoded.raise_for_status()
                    return np.load(io.BytesIO(decoded.content), allow_pickle=False)

                np.testing.assert_array_equal(direct(), over_http())  # also the warm-up of both
                times: dict[str, list[float]] = {"direct": [], "http": [], "server_compute": []}
                for i in range(args.repeats):
                    # Alternate which path goes first, so a load change hits both alike.
                    for name, fn in sorted((("direct", direct), ("http", over_http)), reverse=bool(i % 2)):
                        compute_before = compute_seconds(http)
                        start = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - start)
                        if name == "http":
                            times["server_compute"].append(compute_seconds(http) - compute_before)
        finally:
            server.stop()
    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = median["http"] / median["direct"]
    # Wall time of the HTTP run outside the model jobs (transfer, codecs, queueing), per run:
    # immune to how fast the model happened to compute during that run.
    outside = statistics.median(h - c for h, c in zip(times["http"], times["server_compute"]))
    outside_ratio = outside / median["server_compute"]
    rows = [{"path": "direct model call", "seconds": median["direct"], "ratio": 1.0},
            {"path": "HTTP (npy in, npy out)", "seconds": median["http"], "ratio": ratio},
            {"path": "HTTP: of which model jobs (server metrics)", "seconds": median["server_compute"], "ratio": ""},
            {"path": "HTTP: of which outside the model jobs", "seconds": outside, "ratio": 1 + outside_ratio}]
    notes = (f"One whole-clip reconstruct of {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} uint8 frames, tiny preset "
             f"(random init), fp32, CPU, 1 DDIM step. Medians of {args.repeats} alternating runs after a warm-up "
             f"(which also checked that both paths give identical frames). End-to-end ratio HTTP/direct: "
             f"**{ratio:.3f}**; time spent outside the model jobs (HTTP wall minus the server's "
             f"`cdt_compute_seconds`): **{outside:.3f} s = {outside_ratio * 100:.2f}%** of compute (target < 5%). "
             f"The end-to-end ratio carries the noise of a shared machine (load average "
             f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end); the second figure does not. "
             f"All runs (s): direct {[round(t, 2) for t in times['direct']]}, "
             f"HTTP {[round(t, 2) for t in times['http']]}, "
             f"server compute {[round(t, 2) for t in times['server_compute']]}.")
    path = report.write("http_overhead", "python -m benchmarks.http_overhead",
                        {"times": times, "ratio": ratio, "outside_model_s": outside, "outside_ratio": outside_ratio},
                        rows, notes, measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
