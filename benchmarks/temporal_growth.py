"""Temporal growth at our scale: the paper's claims (../shared/docs/progressive-growing.md)
measured side by side on the val clips.

Rows, each on the same clips (first 33 frames, short side 256, centre crop 256x256,
1 DDIM step, seed 0, uint8 output scored as `cdt eval` scores it):
- the 4x model on the full video: the ceiling;
- the 4x model on the video subsampled in time to each given model's compression (2x for
  8x: frames 0, 2, ..., 32), each decoded frame then held for the skipped frames after it,
  back to full rate: the paper's observation is that this beats an 8x encoder trained
  directly;
- each 8x (or 16x) checkpoint given, e.g. the one grown on the 4x model and the one
  trained from scratch for as many steps.
Each row gives PSNR, SSIM and the latent frames per second of video (at each clip's own
frame rate; 1 + 32/f latent frames for 33 frames at f x), which is what a generator
trained on the latents pays for.

    python -m benchmarks.temporal_growth --model grown-8x=checkpoints/cdt-tiny-t8 \\
        --model scratch-8x=runs/tiny-cdt-t8-scratch/export
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks import report
from media.metrics import psnr, ssim
from media.video import frames_to_tensor, read_video, tensor_to_frames
from model import DEFAULT_CHECKPOINT, from_pretrained
from training.config import DataSection
from training.sources import split_inputs

MEASURES = ["model/", "media/", "checkpoints/cdt-tiny/", "checkpoints/cdt-tiny-t8/", "benchmarks/temporal_growth.py"]
STEPS, SEED = 1, 0


@torch.no_grad()
def reconstruct(model, frames: np.ndarray) -> tuple[np.ndarray, int]:
    """The decoded frames of a clip and the number of latent frames it took."""
    latents = model.encode(frames_to_tensor(frames))
    return tensor_to_frames(model.decode(latents, steps=STEPS, seed=SEED)), latents.shape[2]


def subsampled(every: int):
    """The 4x model on every `every`-th frame, each decoded frame held for the skipped ones."""
    def run(model, frames: np.ndarray) -> tuple[np.ndarray, int]:
        decoded, latent_frames = reconstruct(model, frames[::every])
        return np.repeat(decoded, every, axis=0)[: len(frames)], latent_frames
    return run


def frames_count(text: str) -> int:
    """A clip length every row takes: 1+16k (the 4x model subsampled 2x or 4x takes 1+8k or 1+4k)."""
    frames = int(text)
    if frames < 17 or (frames - 1) % 16:
        raise argparse.ArgumentTypeError(f"frames must be 1+16k (17, 33, 49, ...), got {frames}")
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(DEFAULT_CHECKPOINT), help="the 4x checkpoint (default: shipped)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                        help="a grown-compression checkpoint to score (repeatable)")
    parser.add_argument("--max-clips", type=int, default=None, help="only the first N val clips")
    parser.add_argument("--frames", type=frames_count, default=33, help="first N frames (default 33)")
    parser.add_argument("--size", type=int, default=256, help="short side and centre crop (default 256)")
    parser.add_argument("--name", default="temporal_growth", help="results file name under benchmarks/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = from_pretrained(args.base).model
    # name: (model, how it reconstructs a clip, its frames per latent frame)
    rows_of = {"4x (ceiling)": (base, reconstruct, base.config.time_factor)}
    grown = {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        grown[name] = from_pretrained(path).model
    for factor in sorted({model.config.time_factor for model in grown.values()}):
        every = factor // base.config.time_factor
        rows_of[f"4x on {every}x-subsampled video, frames held"] = (base, subsampled(every), factor)
    rows_of.update({name: (model, reconstruct, model.config.time_factor) for name, model in grown.items()})
    videos = split_inputs(DataSection(), "val").videos[: args.max_clips]
    scores: dict[str, list[dict]] = {name: [] for name in rows_of}
    skipped = {}
    for path in videos:
        clip = read_video(path, num_frames=args.frames, size=args.size, crop=args.size)
        if len(clip.frames) < args.frames:
            skipped[Path(path).name] = f"{len(clip.frames)} frames"
            continue
        for name, (model, run, _) in rows_of.items():
            decoded, latent_frames = run(model, clip.frames)
            scores[name].append({"clip": Path(path).name, "psnr": psnr(clip.frames, decoded),
                                 "ssim": ssim(clip.frames, decoded),
                                 "latents_per_s": latent_frames * clip.fps / args.frames})
            print(f"{Path(path).name} {name}: {scores[name][-1]['psnr']:.2f} dB", file=sys.stderr, flush=True)
    rows = []
    for name, (_, _, factor) in rows_of.items():
        clips = scores[name]
        rows.append({"row": name, "time factor": factor,
                     f"latent frames per {args.frames}": 1 + (args.frames - 1) // factor,
                     "latents/s": float(np.mean([c["latents_per_s"] for c in clips])),
                     "PSNR dB": float(np.mean([c["psnr"] for c in clips])),
                     "SSIM": float(np.mean([c["ssim"] for c in clips]))})
    notes = (f"{len(scores[rows[0]['row']])} val clips, {args.frames}x{args.size}x{args.size}, {STEPS} DDIM step, "
             f"seed {SEED}; "
             "latents/s: latent frames per second of video at each clip's frame rate, averaged."
             + (f" Skipped (too short): {skipped}." if skipped else ""))
    command = "python -m benchmarks.temporal_growth " + " ".join(sys.argv[1:])
    data = {"protocol": {"frames": args.frames, "size": args.size, "steps": STEPS, "seed": SEED},
            "models": {"base": args.base, **dict(s.partition("=")[::2] for s in args.model)},
            "clips": scores, "skipped": skipped}
    path = report.write(args.name, command, data, rows, notes, measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
