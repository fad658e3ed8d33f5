"""The device pool and the host pool, measured on this machine's CPU against real `cdt serve`
processes (tiny preset, random init, fp32, 128x128 frames):

1. Sessions: 8 concurrent encode sessions, then 8 concurrent decode sessions, of 4-frame
   chunks: throughput (frames/s over all sessions) of one worker with every core
   (`CDT_DEVICES=cpu`) against two workers with half the cores each (`CDT_DEVICES=cpu,cpu`).
2. A 257-frame whole-clip decode to mp4, where rendering overlaps the model on the host
   pool, against the same request on the service before the host pool (`--base`, by default
   the commit before service/host.py was added), whose model thread rendered each chunk.
3. Single-request latency, the same two services: one encode (npy in) and one decode (mp4
   out) of 17 frames.

The two servers of a comparison run side by side, each idle but for the request being
timed; runs alternate between them and medians are reported.

    python -m benchmarks.device_pool [--base REF] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np
import torch

from model import CDTConfig, build_model, save_pretrained

from . import report

from tests.servers import Server  # noqa: E402  (the tests' real-server launcher)

# The code these figures describe (`python -m benchmarks.run_all --stale`).
MEASURES = ["service/", "media/", "model/", "benchmarks/device_pool.py"]

REPO = Path(__file__).resolve().parents[1]
SIDE = 128
CHUNK_FRAMES = 4
SESSIONS = 8
SESSION_CHUNKS = 6
CLIP_FRAMES = 257
LATENCY_FRAMES = 17
LATENCY_PAIRS = 15  # single requests per side: cheap, and the figure a target is set on
NPY = {"content-type": "application/x-npy"}


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def default_base() -> str:
    added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "service/host.py"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    return f"{added[-1]}^"


@contextmanager
def serving(checkpoint: Path, log: Path, repo: Path = REPO, **env: str):
    server = Server(checkpoint, log, repo=repo, **env).wait_ready()
    try:
        with httpx.Client(base_url=server.url, timeout=600) as http:
            yield http
    finally:
        server.stop()


def session_run(http: httpx.Client, kind: str, payloads: list[bytes]) -> None:
    """One session pushing every payload as a chunk, then finishing."""
    spec = {"kind": kind} if kind == "encode" else {"kind": kind, "height": SIDE, "width": SIDE}
    sid = http.post("/v1/sessions", json=spec).raise_for_status().json()["id"]
    headers = NPY if kind == "encode" else {"content-type": "application/x-safetensors"}
    for seq, payload in enumerate(payloads):
        http.post(f"/v1/sessions/{sid}/chunks/{seq}", content=payload, headers=headers,
                  params={"format": "npy"}).raise_for_status()
    http.post(f"/v1/sessions/{sid}/finish").raise_for_status()


def sessions_fps(url: str, kind: str, payloads: list[bytes], frames: int) -> float:
    """Frames/s of SESSIONS concurrent sessions, each sending `payloads` (`frames` frames in all)."""
    def one(_):
        with httpx.Client(base_url=url, timeout=600) as http:
            session_run(http, kind, payloads)

    start = time.perf_counter()
    with ThreadPoolExecutor(SESSIONS) as pool:
        list(pool.map(one, range(SESSIONS)))
    return SESSIONS * frames / (time.perf_counter() - start)


def latent_chunks(http: httpx.Client, clip: np.ndarray) -> list[bytes]:
    """A clip's latents from the service, cut into one-latent-frame chunk bodies (safetensors)."""
    from safetensors.torch import save

    from media.latents_file import latents_from_bytes

    latents = latents_from_bytes(http.post("/v1/encode", content=npy(clip), headers=NPY).raise_for_status()
                                 .content).latents
    return [save({"latents": latents[:, :, i:i + 1].contiguous()}) for i in range(latents.shape[2])]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="the git revision to compare the host pool against")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base = subprocess.run(["git", "rev-parse", "--short", args.base or default_base()], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout.strip()
    rng = np.random.default_rng(0)
    session_clip = rng.integers(0, 256, (CHUNK_FRAMES * SESSION_CHUNKS, SIDE, SIDE, 3), dtype=np.uint8)
    long_clip = rng.integers(0, 256, (CLIP_FRAMES, SIDE, SIDE, 3), dtype=np.uint8)
    short_clip = long_clip[:LATENCY_FRAMES]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = tmp / "tiny"
        torch.manual_seed(0)
        save_pretrained(build_model(CDTConfig.from_preset("tiny"), "cdt"), checkpoint)
        base_tree = tmp / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), base], cwd=REPO, check=True,
                       capture_output=True)
        try:
            # Alternating runs between servers side by side: drifts in the machine's load hit both alike.
            # 1. sessions: one worker vs two
            encode_payloads = [npy(session_clip[i:i + CHUNK_FRAMES]) for i in range(0, len(session_clip), CHUNK_FRAMES)]
            fps: dict[str, dict[str, list[float]]] = {"cpu": {"encode": [], "decode": []},
                                                      "cpu,cpu": {"encode": [], "decode": []}}
            with ExitStack() as stack:
                clients = {devices: stack.enter_context(serving(checkpoint, tmp / f"sessions-{devices}.log",
                                                                devices=devices)) for devices in fps}
                decode_payloads = latent_chunks(clients["cpu"], session_clip)
                for http in clients.values():
                    session_run(http, "encode", encode_payloads[:2])  # warm-up
                for repeat in range(args.repeats):
                    for devices in sorted(fps, reverse=bool(repeat % 2)):
                        url = str(clients[devices].base_url)
                        fps[devices]["encode"].append(sessions_fps(url, "encode", encode_payloads, len(session_clip)))
                        fps[devices]["decode"].append(sessions_fps(url, "decode", decode_payloads,
                                                                   CHUNK_FRAMES * len(decode_payloads) - 3))
            # 2, 3. the host pool vs the service before it
            times: dict[str, dict[str, list[float]]] = {side: {"clip_decode": [], "encode": [], "decode": []}
                                                        for side in ("base", "current")}
            with ExitStack() as stack:
                clients = {side: stack.enter_context(serving(checkpoint, tmp / f"{side}.log",
                                                             repo=base_tree if side == "base" else REPO,
                                                             devices="cpu")) for side in times}
                current = clients["current"]
                latents = current.post("/v1/encode", content=npy(long_clip), headers=NPY).raise_for_status().content
                short = current.post("/v1/encode", content=npy(short_clip), headers=NPY).raise_for_status().content

                def decode(http: httpx.Client, body: bytes) -> None:
                    http.post("/v1/decode", content=body, params={"format": "mp4"},
                              headers={"content-type": "application/x-safetensors"}).raise_for_status()

                def encode(http: httpx.Client) -> None:
                    http.post("/v1/encode", content=npy(short_clip), headers=NPY).raise_for_status()

                for http in clients.values():
                    decode(http, short)  # warm-up
                for repeat in range(args.repeats):
                    for side in sorted(times, reverse=bool(repeat % 2)):
                        times[side]["clip_decode"].append(timed(lambda: decode(clients[side], latents)))
                for repeat in range(LATENCY_PAIRS):
                    for side in sorted(times, reverse=bool(repeat % 2)):
                        times[side]["encode"].append(timed(lambda: encode(clients[side])))
                        times[side]["decode"].append(timed(lambda: decode(clients[side], short)))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, check=False,
                           capture_output=True)
    med = lambda values: statistics.median(values)  # noqa: E731
    rows = []
    for kind in ("encode", "decode"):
        one, two = med(fps["cpu"][kind]), med(fps["cpu,cpu"][kind])
        rows.append({"measure": f"{SESSIONS} {kind} sessions, {CHUNK_FRAMES}-frame chunks: frames/s",
                     "baseline": "1 worker x 2 threads", "baseline value": round(one, 2),
                     "compared": "2 workers x 1 thread", "compared value": round(two, 2), "ratio": round(two / one, 3)})
    labels = {"clip_decode": f"{CLIP_FRAMES}-frame decode to mp4: s", "encode": f"{LATENCY_FRAMES}-frame encode: s",
              "decode": f"{LATENCY_FRAMES}-frame decode to mp4: s"}
    for key, label in labels.items():
        before, after = med(times["base"][key]), med(times["current"][key])
        rows.append({"measure": label, "baseline": f"before the host pool ({base})", "baseline value": round(before, 3),
                     "compared": "host pool", "compared value": round(after, 3), "ratio": round(after / before, 3)})
    latency_ratio = max(med(times["current"][k]) / med(times["base"][k]) for k in ("encode", "decode"))
    notes = (f"Tiny preset (random init), fp32, {SIDE}x{SIDE} frames, on this machine's CPU. Sessions: "
             f"{SESSIONS} at once, each {SESSION_CHUNKS} chunks. The two servers of each comparison run side by side "
             f"and the runs alternate between them; medians of {args.repeats} runs per side (sessions, the "
             f"{CLIP_FRAMES}-frame decode) and of {LATENCY_PAIRS} (single requests). Ratios: compared / baseline "
             "(frames/s: above 1 is faster; seconds: below 1 is faster).")
    path = report.write("device_pool", "python -m benchmarks.device_pool",
                        {"fps": fps, "times": times, "base": base, "latency_ratio": latency_ratio}, rows, notes,
                        measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
