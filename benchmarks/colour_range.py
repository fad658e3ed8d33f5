"""Which colours a checkpoint can reproduce: flat colour swatches through reconstruct.

Each swatch is a flat clip (5 frames, 64x64) of one sRGB colour, encoded and decoded with
1 DDIM step (seed 0); the row gives, per checkpoint, the mean colour of the last frame's
centre, the clip's PSNR, and how far its latent (the posterior mean) lies from mid grey's
(L2 over the whole latent). A flat clip has no texture to lose, so a low PSNR here is a
colour the model maps wrongly, and a latent near grey's says the encoder, not the
decoder, dropped it: the probe behind the aquarium val clip's blue-to-cyan.

    .venv/bin/python -m benchmarks.colour_range --checkpoint checkpoints/cdt-tiny [--checkpoint DIR ...]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from benchmarks import report
from media.metrics import psnr
from media.video import frames_to_tensor, tensor_to_frames
from model import from_pretrained

# The code these figures describe (`python -m benchmarks.run_all --stale`).
MEASURES = ["model/", "media/", "checkpoints/cdt-tiny/", "benchmarks/colour_range.py"]

SWATCHES = {
    "deep blue": (20, 40, 160),
    "blue": (10, 60, 200),
    "cyan": (20, 170, 200),
    "green": (40, 160, 40),
    "yellow": (220, 200, 40),
    "red": (200, 40, 20),
    "magenta": (180, 40, 160),
    "skin": (220, 170, 140),
    "dark grey": (40, 40, 40),
    "mid grey": (120, 120, 120),
    "light grey": (220, 220, 220),
}


def reconstruct_swatch(model, rgb: tuple[int, int, int], frames: int = 5, size: int = 64
                       ) -> tuple[list[int], float, torch.Tensor]:
    """(mean output colour of the last frame's centre, PSNR of the whole clip in dB, latent),
    on uint8 frames as `cdt eval` scores them."""
    clip = np.full((frames, size, size, 3), rgb, dtype=np.uint8)
    with torch.inference_mode():
        latent = model.encode(frames_to_tensor(clip))
        decoded = tensor_to_frames(model.decode(latent, steps=1, seed=0))
    quarter = size // 4
    centre = decoded[-1, quarter:-quarter, quarter:-quarter].reshape(-1, 3).mean(0)
    return [int(v) for v in centre.round()], psnr(clip, decoded), latent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", required=True, help="checkpoint directory (repeatable)")
    parser.add_argument("--name", default="colour_range", help="results file name under benchmarks/results")
    args = parser.parse_args()
    models = {path: from_pretrained(path).model for path in args.checkpoint}
    results = {(name, path): reconstruct_swatch(model, rgb)
               for name, rgb in SWATCHES.items() for path, model in models.items()}
    rows = []
    for name, rgb in SWATCHES.items():
        row: dict = {"swatch": name, "rgb": str(list(rgb))}
        for path in models:
            colour, score, latent = results[name, path]
            row[f"{path}: out"], row[f"{path}: PSNR dB"] = str(colour), score
            row[f"{path}: latent to grey"] = (latent - results["mid grey", path][2]).norm().item()
        rows.append(row)
    means = {path: sum(r[f"{path}: PSNR dB"] for r in rows) / len(rows) for path in models}
    notes = "Mean PSNR over the swatches: " + ", ".join(f"`{p}` {v:.2f} dB" for p, v in means.items()) + "."
    command = "python -m benchmarks.colour_range " + " ".join(sys.argv[1:])
    path = report.write(args.name, command, {"mean_psnr_db": means}, rows, notes, measures=MEASURES)
    print(path.read_text())


if __name__ == "__main__":
    main()
