"""Encode and decode throughput of model presets on one device, the throughput stage of
`scripts/gpu_check.sh`.

For each preset and frame size, a model of that preset (random weights: the time does not
depend on them) in `--dtype` on the device streams `--frames` random frames through
`media.ClipEncoder` in chunks of 8 frames (the service's whole-clip chunk), then their latents
through `media.ClipDecoder` (1 DDIM step), as the service's model jobs do: frames go up as
uint8, and every call returns its result on the host, so each call's time includes the
device's work. Frames per second = frames / the clip's total time, after an untimed warm-up
clip at the same size (kernel selection, allocator growth). Per preset, two more rows: `--sessions`
decode sessions' chunks at the first size, one stream at a time and batched as the service batches
them (`CDT_BATCH_MAX`), the figure that sets a GPU's batching default. A size that runs the device out
of memory at 8-frame chunks is retried at 4 (the service's smallest chunk); rows say which
chunk ran, and the device's peak allocated memory, or that even 4-frame chunks ran out of
memory (a capacity of that device, reported; the service stage checks the failure's handling).

    python -m benchmarks.gpu_throughput --device cuda [--presets tiny small]
        [--sizes 256x256 512x512 720x1280] [--frames 33] [--sessions 8] [--session-chunks 4] [--run-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.gpu_check import PASSED, one_device, write_stage
from media import ClipDecoder, ClipEncoder, latents_info, push_outputs
from model import CDTConfig, build_model, content_hash, decode_chunk_latents
from service.memory import MAX_CHUNK_FRAMES, MIN_CHUNK_FRAMES
from service.devices import release_device_cache

WARMUP_FRAMES = 2 * MAX_CHUNK_FRAMES + 1  # a first chunk and a steady one, as the timed clip has
OUT_OF_MEMORY = "out of memory"  # a capacity, not a failure: reported, and the stage goes on


def size(text: str) -> tuple[int, int]:
    """HEIGHTxWIDTH."""
    height, width = text.split("x")
    return int(height), int(width)


class Clip:
    """One clip's streamed encode and decode on a model, timed call by call."""

    def __init__(self, model, model_hash: str, frames: np.ndarray, chunk: int) -> None:
        self.model, self.model_hash, self.frames, self.chunk = model, model_hash, frames, chunk

    def encode(self) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        encoder = ClipEncoder(self.model, self.model_hash)
        parts = [encoder.push(self.frames[i:i + self.chunk]) for i in range(0, len(self.frames), self.chunk)]
        latents = torch.cat([*parts, encoder.finish()], dim=2)
        return latents, time.perf_counter() - start

    def decode(self, latents: torch.Tensor) -> float:
        start = time.perf_counter()
        info = latents_info(self.model, self.model_hash, *self.frames.shape[:3], fps=24.0)
        decoder = ClipDecoder(self.model, self.model_hash, info)
        step = decode_chunk_latents(self.chunk)
        for i in range(0, latents.shape[2], step):
            decoder.frames(latents[:, :, i:i + step])
        return time.perf_counter() - start


def measure(model, model_hash: str, frames: np.ndarray, chunk: int, device: torch.device) -> list[tuple]:
    """(op, seconds, peak bytes) of encode and decode, after a warm-up clip."""
    with torch.inference_mode():
        warmup = Clip(model, model_hash, frames[:WARMUP_FRAMES], chunk)
        warmup.decode(warmup.encode()[0])
        clip = Clip(model, model_hash, frames, chunk)
        _reset_peak(device)
        latents, encode_s = clip.encode()
        encode_peak = _peak(device)
        _reset_peak(device)
        decode_s = clip.decode(latents)
        return [("encode", encode_s, encode_peak), ("decode", decode_s, _peak(device))]


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def sessions(model, model_hash: str, height: int, width: int, streams: int, chunks: int, batched: bool) -> float:
    """Seconds for `streams` decode streams to take `chunks` chunks of 1 latent frame each (4 frames, as a
    live session sends), after each stream's first: one stream at a time, or every chunk of a round
    as one batched forward (`media.push_outputs`, as the service batches session chunks)."""
    latents = torch.randn(1, 16, 1 + chunks, height // 8, width // 8, generator=torch.Generator().manual_seed(0))
    info = latents_info(model, model_hash, 1 + 4 * chunks, height, width, fps=24.0)
    with torch.inference_mode():
        decoders = [ClipDecoder(model, model_hash, info, seed=i) for i in range(streams)]
        for decoder in decoders:
            decoder.frames(latents[:, :, :1])
        start = time.perf_counter()
        for i in range(1, 1 + chunks):
            pushes = [decoder.step(latents[:, :, i:i + 1]) for decoder in decoders]
            if batched:
                for push, output in zip(pushes, push_outputs(pushes)):
                    push.finish(output)
            else:
                for push in pushes:
                    push.run()
        return time.perf_counter() - start


def session_rows(preset: str, model, model_hash: str, dtype: str, height: int, width: int, streams: int = 8,
                 chunks: int = 4) -> list[dict]:
    """Decode sessions' chunks one stream at a time and batched: what CDT_BATCH_MAX buys on this device."""
    rows = []
    sessions(model, model_hash, height, width, streams, 1, batched=True)  # warm-up
    for batched in (False, True):
        seconds = sessions(model, model_hash, height, width, streams, chunks, batched)
        frames = 4 * streams * chunks
        rows.append({"preset": preset, "size": f"{height}x{width}",
                     "op": f"{streams} decode sessions, {'batched' if batched else 'one at a time'}", "dtype": dtype,
                     "frames": frames, "chunk frames": 4, "seconds": seconds, "frames/s": frames / seconds,
                     "peak GiB": "n/a", "outcome": PASSED})
        print(f"{preset} {rows[-1]['op']}: {rows[-1]['frames/s']}", flush=True)
    return rows


def rows_for(preset: str, sizes: list[tuple[int, int]], frame_count: int, dtype: str, device: torch.device,
             sessions: int, session_chunks: int) -> list:
    torch.manual_seed(0)
    model = build_model(CDTConfig.from_preset(preset), "cdt").set_precision(dtype).to(device).eval()
    model_hash = content_hash(model)
    rows = []
    for height, width in sizes:
        frames = np.random.default_rng(0).integers(0, 256, (frame_count, height, width, 3), dtype=np.uint8)
        measured = [(op, None, None) for op in ("encode", "decode")]
        for chunk in (MAX_CHUNK_FRAMES, MIN_CHUNK_FRAMES):
            try:
                measured = measure(model, model_hash, frames, chunk, device)
                break
            except torch.OutOfMemoryError:
                pass
            # Past the except block the failed clip's tensors are freed, and their blocks can go back.
            release_device_cache(device)
        for op, seconds, peak in measured:
            rows.append({"preset": preset, "size": f"{height}x{width}", "op": op, "dtype": dtype,
                         "frames": frame_count, "chunk frames": chunk if seconds is not None else "",
                         "seconds": seconds if seconds is not None else "",
                         "frames/s": frame_count / seconds if seconds is not None else "out of memory",
                         "peak GiB": peak / 2**30 if peak is not None else "n/a",
                         "outcome": PASSED if seconds is not None else OUT_OF_MEMORY})
            print(f"{preset} {height}x{width} {op}: {rows[-1]['frames/s']}", flush=True)
    rows += session_rows(preset, model, model_hash, dtype, *sizes[0], sessions, session_chunks)
    del model
    release_device_cache(device)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--sizes", nargs="+", type=size, default=[(256, 256), (512, 512), (720, 1280)],
                        help="HEIGHTxWIDTH")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--sessions", type=int, default=8, help="decode sessions of the batching rows")
    parser.add_argument("--session-chunks", type=int, default=4, help="chunks each session sends, timed")
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args()
    device = one_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # where allocations without a device go, as on the service's model thread
    sessions = (args.sessions, args.session_chunks)
    rows = [row for preset in args.presets for row in rows_for(preset, args.sizes, args.frames, args.dtype, device,
                                                               *sessions)]
    notes = (f"On {device}, {args.dtype}, random weights, 1 DDIM step; frames/s = frames / the whole clip's streamed "
             "time (uint8 up, results copied to the host by every call), after a warm-up clip of "
             f"{min(WARMUP_FRAMES, args.frames)} frames at the same size; one timed clip per row. Peak GiB: "
             "torch.cuda.max_memory_allocated over the op.")
    return write_stage(args.run_dir, "throughput", rows, notes)


if __name__ == "__main__":
    sys.exit(main())
