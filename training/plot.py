"""Loss and validation curves from a run's log.jsonl, drawn into a PNG (matplotlib is
the optional `train` extra; without it the trainer skips the plot and says so)."""

from __future__ import annotations

import json
from pathlib import Path


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_log(log_path: str | Path, png_path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "val"]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "mse", "mse_terminal"):
        points = [(r["step"], r[key]) for r in train if key in r]
        if points:
            steps, values = zip(*points)
            ax_loss.plot(steps, smooth(list(values), 20), label=f"{key} (avg of 20 logs)")
    ax_loss.set(xlabel="step", ylabel="train loss", yscale="log", title=title or "training loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if val:
        ax_val.plot([r["step"] for r in val], [r["psnr"] for r in val], "o-", label="val PSNR (EMA, dB)")
        ax_ssim = ax_val.twinx()
        ax_ssim.plot([r["step"] for r in val], [r["ssim"] for r in val], "s--", color="tab:orange", label="val SSIM")
        ax_ssim.set_ylabel("SSIM")
        ax_val.legend(loc="lower right")
    ax_val.set(xlabel="step", ylabel="PSNR (dB)", title="validation")
    ax_val.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
