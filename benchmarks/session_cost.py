"""Cost of keeping a streaming session's state in Redis between chunks.

For encode and decode sessions at each size and chunk length: the exported
FeatureCache size after a steady-state chunk, the chunk's compute time, and the
time to save then load that state against a real Redis, as a fraction of the compute:
once as when another replica takes the next chunk (`RedisSessionStore`: the state is
read back), once as when the same replica does (`LocalStateCache` in front: only the
metadata is read back). Medians of --repeats runs.

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
from service.session_store import LocalStateCache, RedisSessionStore, SessionRecord, SessionStore


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


async def store_round_trip(store: SessionStore, state: bytes, repeats: int) -> float:
    sid = secrets.token_hex(8)
    assert await store.create(sid, SessionRecord({"bench": True}), ttl_s=60, max_sessions=10**6)
    times = []
    for version in range(1, repeats + 1):
        start = time.perf_counter()
        assert await store.save(sid, SessionRecord({"bench": True}, state, b""), version, ttl_s=60)
        loaded = await store.load(sid)
        times.append(time.perf_counter() - start)
        assert len(loaded.state) == len(state)
    await store.delete(sid)
    return sorted(times)[len(times) // 2]


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
    same_replica = LocalStateCache(store, max_bytes=2**31)
    rows = []
    loop = asyncio.new_event_loop()
    for size in args.sizes:
        for frames in args.chunk_frames:
            for kind, stream, push in chunk_streams(model, size, frames):
                with torch.inference_mode():
                    compute = report.median_time(push, args.repeats)
                state = stream.export_state()
                other_s = loop.run_until_complete(store_round_trip(store, state, args.repeats))
                same_s = loop.run_until_complete(store_round_trip(same_replica, state, args.repeats))
                rows.append({"kind": kind, "size": f"{size}x{size}", "chunk_frames": frames,
                             "state_mb": len(state) / 2**20, "chunk_compute_s": compute,
                             "save_load_s": other_s, "store_share": other_s / compute,
                             "save_load_same_replica_s": same_s, "store_share_same_replica": same_s / compute})
    loop.run_until_complete(same_replica.close())
    largest = max(args.chunk_frames)
    summary = {"preset": args.preset}
    for suffix in ("", "_same_replica"):
        summary["worst_share" + suffix] = max(r["store_share" + suffix] for r in rows)
        summary["worst_share_largest_chunk" + suffix] = max(r["store_share" + suffix] for r in rows
                                                            if r["chunk_frames"] == largest)
    notes = (f"{args.preset} preset, fp32 state, decode with 1 DDIM step. The state's size does not depend on "
             f"the chunk's length, so its cost is amortised by longer chunks. Store time = one compare-and-set "
             f"save plus one load on loopback (reply parser: {'hiredis' if HIREDIS_AVAILABLE else 'pure Python'}): "
             f"`save_load_s` when another replica continues the session (the state is read back), "
             f"`save_load_same_replica_s` when the replica that wrote it does (LocalStateCache: only the "
             f"metadata is read). Worst store share of chunk compute, other replica / same replica: "
             f"**{summary['worst_share']:.1%}** / **{summary['worst_share_same_replica']:.1%}** over all rows, "
             f"**{summary['worst_share_largest_chunk']:.1%}** / "
             f"**{summary['worst_share_largest_chunk_same_replica']:.1%}** with {largest}-frame chunks "
             f"(target < 10%).")
    command = "python -m benchmarks.session_cost " + " ".join(sys.argv[1:])
    path = report.write("session_cost", command.strip(), summary, rows, notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
