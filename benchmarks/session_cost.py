"""Cost of a streaming session's store traffic between chunks.

For encode and decode sessions at each size and chunk length: a steady-state chunk's
compute time, and the synchronous store time of a chunk on the replica that holds the
session's hot stream (one load, one commit of the chunk input, response and metadata)
against a real Redis, as a fraction of the compute; plus the FeatureCache size and the
time to write it as a snapshot (off the response path). Medians of --repeats runs.

    .venv/bin/python -m benchmarks.session_cost [--sizes 256 512] [--preset tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time

import torch
from redis.utils import HIREDIS_AVAILABLE

from benchmarks import report
from model import CDTConfig, StreamingDecoder, StreamingEncoder, build_model
from service.session_store import RedisSessionStore, SessionStore

SNAPSHOT_PART_BYTES = 64 * 2**20


def chunk_streams(model, size: int, frames: int):
    """(kind, stream primed with its first chunk, function pushing one steady-state chunk
    of `frames` pixel frames)."""
    enc = StreamingEncoder(model)
    enc.push(torch.rand(1, 3, 1, size, size) * 2 - 1)
    dec = StreamingDecoder(model, steps=1, seed=0)
    dec.push(torch.randn(1, 16, 1, size // 8, size // 8))
    return [
        ("encode", enc, lambda: enc.push(torch.rand(1, 3, frames, size, size) * 2 - 1)),
        ("decode", dec, lambda: dec.push(torch.randn(1, 16, frames // 4, size // 8, size // 8))),
    ]


def chunk_bytes(tensor: torch.Tensor) -> bytes:
    """A stand-in for a chunk body or response of the tensor's size."""
    return tensor.float().numpy().tobytes()


async def chunk_store_time(store: SessionStore, chunk: bytes, response: bytes, repeats: int) -> float:
    """Median time of one chunk's synchronous store traffic: load, then commit."""
    sid = secrets.token_hex(8)
    assert await store.create(sid, {"bench": True}, ttl_s=60, max_sessions=10**6)
    times = []
    for version in range(1, repeats + 1):
        start = time.perf_counter()
        loaded = await store.load(sid)
        assert await store.commit(sid, loaded.version, {"bench": True}, response, 60, (str(version), chunk),
                                  [str(version - 1)])
        times.append(time.perf_counter() - start)
    await store.delete(sid)
    return sorted(times)[len(times) // 2]


async def snapshot_time(store: SessionStore, state: bytes) -> float:
    sid = secrets.token_hex(8)
    assert await store.create(sid, {"bench": True}, ttl_s=60, max_sessions=10**6)
    start = time.perf_counter()
    assert await store.put_snapshot(sid, 0, state, SNAPSHOT_PART_BYTES)
    elapsed = time.perf_counter() - start
    await store.delete(sid)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--chunk-frames", type=int, nargs="+", default=[4, 16],
                        help="pixel frames per steady-state chunk (multiples of 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(CDTConfig.from_preset(args.preset), "cdt").eval()
    store = RedisSessionStore(args.redis_url, prefix=f"cdt-bench-{secrets.token_hex(4)}:")
    rows = []
    loop = asyncio.new_event_loop()
    for size in args.sizes:
        for frames in args.chunk_frames:
            for kind, stream, push in chunk_streams(model, size, frames):
                with torch.inference_mode():
                    compute = report.median_time(push, args.repeats)
                    output = push()
                inputs = (torch.rand(1, 3, frames, size, size) if kind == "encode"
                          else torch.randn(1, 16, frames // 4, size // 8, size // 8))
                chunk, response = chunk_bytes(inputs), chunk_bytes(output)
                store_s = loop.run_until_complete(chunk_store_time(store, chunk, response, args.repeats))
                state = stream.export_state()
                rows.append({"kind": kind, "size": f"{size}x{size}", "chunk_frames": frames,
                             "chunk_mb": len(chunk) / 2**20, "response_mb": len(response) / 2**20,
                             "chunk_compute_s": compute, "store_s": store_s, "store_share": store_s / compute,
                             "state_mb": len(state) / 2**20,
                             "snapshot_s": loop.run_until_complete(snapshot_time(store, state))})
    loop.run_until_complete(store.close())
    summary = {"preset": args.preset, "worst_store_share": max(r["store_share"] for r in rows)}
    notes = (f"{args.preset} preset, fp32, decode with 1 DDIM step. Store time = one load plus one "
             f"compare-and-set commit of the chunk input (float32 stand-in), the response and the metadata, on "
             f"loopback (reply parser: {'hiredis' if HIREDIS_AVAILABLE else 'pure Python'}), when the replica "
             f"holding the hot stream continues the session. Worst store share of chunk compute: "
             f"**{summary['worst_store_share']:.1%}**. `snapshot_s`: writing the FeatureCache as a snapshot in "
             f"{SNAPSHOT_PART_BYTES >> 20} MB parts, off the response path.")
    command = "python -m benchmarks.session_cost " + " ".join(sys.argv[1:])
    path = report.write("session_cost", command.strip(), summary, rows, notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
