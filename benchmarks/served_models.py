"""What serving several models costs a replica, measured against real `cdt serve` processes on
this machine's CPU (fp32, one worker):

1. Memory: the resident set (VmRSS) of an idle, ready replica serving the first model alone
   against one serving every model (`CDT_MODELS`), each in a fresh process: what holding the
   other models adds, beside the weights' bytes each model's card reports (`weights_bytes`).
2. Time: on the replica serving every model, a whole-clip encode (npy in) and a decode (1
   step, npy out) of each model, of a 17-frame clip at 256x256, alternating between the
   models; medians.

By default the models are the shipped checkpoint and a freshly initialised tiny model saved
beside it (the same architecture, another content hash: a stand-in until other checkpoints
ship); `--models` measures
any set, as CDT_MODELS takes it.

    python -m benchmarks.served_models [--models name=path,name=path] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import re
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from model import DEFAULT_CHECKPOINT, build_model, from_pretrained, save_pretrained

from . import report

from tests.servers import Server  # noqa: E402  (the tests' real-server launcher)

MEASURES = ["service/", "media/", "model/", "benchmarks/served_models.py"]
FRAMES, SIDE = 17, 256
NPY = {"content-type": "application/x-npy"}
SAFETENSORS = {"content-type": "application/x-safetensors"}


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def rss_bytes(server: Server) -> int:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def idle_rss(models: str, log: Path) -> tuple[int, list[dict]]:
    """The resident bytes of a ready replica serving `models`, and its model cards."""
    with Server(None, log, models=models, devices="cpu") as server:
        time.sleep(2)  # past the start's transient allocations
        return rss_bytes(server), httpx.get(server.url + "/v1/models").json()["models"]


def timed(http: httpx.Client, path: str, body: bytes, headers: dict, params: dict) -> tuple[float, bytes]:
    start = time.perf_counter()
    response = http.post(path, content=body, headers=headers, params=params)
    response.raise_for_status()
    return time.perf_counter() - start, response.content


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="CDT_MODELS (default: the shipped checkpoint and a fresh tiny one)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = args.models
        if models is None:
            # The shipped model's architecture, freshly initialised: its receptive field is the config's.
            shipped, identity = from_pretrained(DEFAULT_CHECKPOINT)
            save_pretrained(build_model(shipped.config, shipped.kind), tmp / "fresh-tiny",
                            receptive_field=identity.receptive_field)
            models = f"cdt-tiny={DEFAULT_CHECKPOINT},fresh-tiny={tmp / 'fresh-tiny'}"
        first = models.split(",")[0]
        alone, _ = idle_rss(first, tmp / "alone.log")
        together, cards = idle_rss(models, tmp / "together.log")
        clip = npy(np.random.default_rng(0).integers(0, 256, (FRAMES, SIDE, SIDE, 3), dtype=np.uint8))
        times: dict[tuple[str, str], list[float]] = {}
        with Server(None, tmp / "timed.log", models=models, devices="cpu") as server, \
                httpx.Client(base_url=server.url, timeout=600) as http:
            for repeat in range(args.repeats + 1):  # the first round warms up
                for card in cards:
                    name = card["name"]
                    encode_s, latents = timed(http, "/v1/encode", clip, NPY, {"model": name})
                    decode_s, _ = timed(http, "/v1/decode", latents, SAFETENSORS,
                                        {"model": name, "steps": 1, "format": "npy"})
                    if repeat:
                        times.setdefault((name, "encode"), []).append(encode_s)
                        times.setdefault((name, "decode"), []).append(decode_s)
    rows = [{"model": card["name"], "preset": card["preset"], "compression": card["compression"]["label"],
             "frames rule": card["frames_rule"], "parameters": card["parameters"],
             "weights MiB": round(card["weights_bytes"] / 2**20, 1),
             f"encode {FRAMES}x{SIDE}² s": round(statistics.median(times[card["name"], "encode"]), 3),
             f"decode {FRAMES}x{SIDE}² 1 step s": round(statistics.median(times[card["name"], "decode"]), 3)}
            for card in cards]
    added = together - alone
    weights = sum(card["weights_bytes"] for card in cards[1:])
    notes = (f"Idle replica RSS: {alone / 2**20:.0f} MiB serving `{cards[0]['name']}` alone, "
             f"{together / 2**20:.0f} MiB serving all {len(cards)} models: {added / 2**20:.0f} MiB more for the "
             f"others, whose weights are {weights / 2**20:.1f} MiB (every device holds every model). Times: "
             f"median of {args.repeats} requests per model and op on one replica, alternating between the models.")
    data = {"models": models, "rss_alone_bytes": alone, "rss_all_bytes": together, "rss_added_bytes": added,
            "added_weights_bytes": weights}
    command = "python -m benchmarks.served_models" + (f" --models {args.models}" if args.models else "") + (
        f" --repeats {args.repeats}" if args.repeats != parser.get_default("repeats") else "")
    path = report.write("served_models", command, data, rows, notes, measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
