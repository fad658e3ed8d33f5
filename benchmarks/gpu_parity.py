"""bf16 against fp32 on one device, the parity stage of `scripts/gpu_check.sh`.

The checkpoint is loaded twice on the device, in fp32 and in bf16, and each val clip of the
shared manifest (its first `--clips`, `--frames` frames at short side `--size`) runs
through both as the service runs it, streamed in 8-frame chunks:

- encode: the bf16 latents against the fp32 ones, |z_bf16 - z_fp32| / |z_fp32| at most
  BF16_TOLERANCE's rtol (tests/tolerance.py);
- decode: the fp32 latents decoded in both dtypes (1 DDIM step), so that only the decode
  differs: the bf16 reconstruction's PSNR against the input may be at most
  BF16_PSNR_DROP_DB below fp32's, and the two decodes agree to BF16_FRAMES_PSNR_DB.

The fp32 side computes in full fp32 (TF32 off), the reference the bounds are stated
against; on a CPU it runs the same, slowly (bf16 convolutions without AVX512-BF16 or AMX).

    python -m benchmarks.gpu_parity --device cuda [--clips 4] [--frames 33] [--size 256] --run-dir DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.gpu_check import FAILED, PASSED, one_device, write_stage
from media import decode_chunks, encode_chunks, latents_info, psnr, read_video, tensor_to_frames
from model import DEFAULT_CHECKPOINT, decode_chunk_latents, from_pretrained
from tests.tolerance import BF16_FRAMES_PSNR_DB, BF16_PSNR_DROP_DB, BF16_TOLERANCE, relative_error
from training.config import SHARED_VIDEOS
from training.sources import read_manifest

CHUNK_FRAMES = 8  # the service's whole-clip chunk where memory allows (service/memory.py)


def val_clips(manifest: Path, count: int) -> list[Path]:
    """The manifest's first `count` val clips."""
    rows = [row for row in read_manifest(manifest) if row.get("split") == "val"]
    if len(rows) < count:
        raise SystemExit(f"gpu_parity: error: {manifest} lists {len(rows)} val clips, {count} asked for")
    return [Path(row["path"]) for row in rows[:count]]


def encode(model, model_hash: str, frames: np.ndarray) -> torch.Tensor:
    parts = (frames[i:i + CHUNK_FRAMES] for i in range(0, len(frames), CHUNK_FRAMES))
    return torch.cat(list(encode_chunks(model, model_hash, parts)), dim=2)


def decode(model, model_hash: str, latents: torch.Tensor, frames: np.ndarray) -> np.ndarray:
    """uint8 frames of `latents`, cropped to the clip `frames` is."""
    info = latents_info(model, model_hash, *frames.shape[:3], fps=24.0)
    step = decode_chunk_latents(CHUNK_FRAMES)
    parts = (latents[:, :, i:i + step] for i in range(0, latents.shape[2], step))
    return np.concatenate([tensor_to_frames(video) for video in decode_chunks(model, model_hash, info, parts)])


def parity_row(models: dict, model_hash: str, clip: Path, frames: np.ndarray) -> dict:
    with torch.inference_mode():
        z32, z16 = (encode(models[dtype], model_hash, frames) for dtype in ("fp32", "bf16"))
        rec32, rec16 = (decode(models[dtype], model_hash, z32, frames) for dtype in ("fp32", "bf16"))
    error = relative_error(z16, z32)
    psnr32, psnr16, agree = psnr(frames, rec32), psnr(frames, rec16), psnr(rec32, rec16)
    ok = error <= BF16_TOLERANCE["rtol"] and psnr32 - psnr16 <= BF16_PSNR_DROP_DB and agree >= BF16_FRAMES_PSNR_DB
    return {"clip": clip.name, "frames": "x".join(map(str, frames.shape[:3])), "latents rel. error": error,
            "PSNR fp32 (dB)": psnr32, "PSNR bf16 (dB)": psnr16, "bf16 drop (dB)": psnr32 - psnr16,
            "bf16 vs fp32 frames (dB)": agree, "outcome": PASSED if ok else FAILED}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--manifest", type=Path, default=SHARED_VIDEOS / "MANIFEST.tsv")
    parser.add_argument("--clips", type=int, default=4, help="val clips, in the manifest's order")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--size", type=int, default=256, help="short side the clips are resized to")
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args()
    # The reference is full fp32: no TF32 tensor cores in its convolutions and matmuls.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = one_device(args.device)
    models, model_hash = {}, None
    for dtype in ("fp32", "bf16"):
        models[dtype], identity = from_pretrained(args.checkpoint, device=device, dtype=dtype)
        model_hash = identity.content_hash
    rows = []
    for clip in val_clips(args.manifest, args.clips):
        frames = read_video(clip, num_frames=args.frames, size=args.size).frames
        rows.append(parity_row(models, model_hash, clip, frames))
        print(f"{clip.name}: {rows[-1]['outcome']}", flush=True)
    notes = (f"{args.checkpoint.name} on {device}; val clips of {args.manifest.name}, streamed in {CHUNK_FRAMES}-frame "
             f"chunks, decoded with 1 DDIM step. Bounds (tests/tolerance.py): latents rel. error (L2) at most "
             f"{BF16_TOLERANCE['rtol']:g}, bf16 drop at most {BF16_PSNR_DROP_DB:g} dB, bf16 vs fp32 frames at "
             f"least {BF16_FRAMES_PSNR_DB:g} dB. The decode columns decode the fp32 latents in both dtypes.")
    return write_stage(args.run_dir, "parity", rows, notes)


if __name__ == "__main__":
    sys.exit(main())
