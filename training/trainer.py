"""The training loop: AdamW, warmup + cosine LR, gradient clipping and accumulation, EMA,
optional bf16 autocast, DDP through torchrun (gloo on CPU), JSONL log, PNG curves,
periodic validation, and checkpoints that resume exactly.

Exact resume needs no hidden state: the LR is a function of the step, batch `i` is a
function of (seed, i, rank), and each step's noise comes from a generator seeded with
(seed, step, micro-batch, rank). The checkpoint holds the weights, EMA, AdamW moments,
the step, and the global RNG states for anything else that draws from them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from media.metrics import psnr, ssim
from media.video import frames_to_tensor, tensor_to_frames
from model import CDTConfig, build_model, from_pretrained, save_pretrained

from .config import DEFAULTS, merge, stage_at, total_steps
from .data import ClipBatches, batch_loader, build_cache, split_videos, val_clips
from .losses import Objective, build_lpips
from .plot import plot_log

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"
# A run whose gradients stay non-finite this long is broken, not unlucky.
MAX_NONFINITE_STEPS = 20


def lr_at(step: int, optim: dict, total: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at the last step."""
    if step < optim["warmup"]:
        return optim["lr"] * (step + 1) / optim["warmup"]
    progress = min(1.0, (step - optim["warmup"]) / max(1, total - optim["warmup"]))
    return optim["min_lr"] + 0.5 * (optim["lr"] - optim["min_lr"]) * (1 + math.cos(math.pi * progress))


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """Noise, timesteps and latent samples of one micro-batch: reproducible from its index."""
    mixed = np.random.default_rng([seed, step, micro, rank, 7]).integers(2**62)
    return torch.Generator().manual_seed(int(mixed))


def stage_of_batch(config: dict, accum: int, index: int) -> dict:
    return stage_at(config, index // accum)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    # The warmup keeps early EMA weights from being dominated by the random init.
    decay = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


@torch.no_grad()
def validate(model, clips: list[np.ndarray], steps: int) -> dict:
    """Encode (posterior mean) and decode each uint8 val clip with `steps` DDIM steps,
    seed 0, and score the uint8 output as `cdt eval` does."""
    model.eval()
    scores = []
    for frames in clips:
        out = tensor_to_frames(model.decode(model.encode(frames_to_tensor(frames)), steps=steps))
        scores.append((psnr(frames, out), ssim(frames, out)))
    return {"psnr": float(np.mean([s[0] for s in scores])), "ssim": float(np.mean([s[1] for s in scores]))}


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def save_state(run_dir: Path, state: dict) -> None:
    tmp = run_dir / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(run_dir / STATE_FILE)  # atomic: a kill mid-save keeps the previous state


def load_state(run_dir: Path) -> dict:
    # weights_only: the state holds tensors and plain Python data, nothing to unpickle.
    return torch.load(run_dir / STATE_FILE, map_location="cpu", weights_only=True)


def warm_start_weights(checkpoint: str | Path, model) -> dict:
    """The weights of a checkpoint of the same preset and kind, in float32."""
    source = from_pretrained(checkpoint)
    if source.kind != model.kind or source.config != model.config:
        raise ValueError(f"init_from {checkpoint}: a {source.config.preset} {source.kind} checkpoint cannot start "
                         f"a {model.config.preset} {model.kind} run")
    return source.state_dict()


def truncate_log(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint: a killed run redoes those steps on resume."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(row + "\n" for row in rows))


def init_distributed() -> tuple[int, int]:
    """(rank, world size); a gloo process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def prepare_run(run_dir: str | Path, config: dict) -> Path:
    """Create a fresh run directory holding the resolved config (rank 0; others wait)."""
    run_dir = Path(run_dir)
    rank, world = init_distributed()
    if rank == 0:
        if (run_dir / STATE_FILE).exists() or (run_dir / LOG_FILE).exists():
            raise FileExistsError(f"{run_dir} already holds a run; continue it with `cdt train --resume {run_dir}`")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if world > 1:
        dist.barrier()
    return run_dir


def read_run_config(run_dir: Path) -> dict:
    """The run's config over today's defaults: a run directory written before an option
    existed resumes with that option's default, which keeps its old behaviour."""
    return merge(DEFAULTS, json.loads((run_dir / CONFIG_FILE).read_text()))


def train(run_dir: str | Path, stop_at: int | None = None, progress: bool = True, threads: int | None = None,
          bf16: bool | None = None):
    """Run (or continue) the run in `run_dir` up to `stop_at` or the config's last step,
    on `threads` CPU threads and with bf16 autocast or not (defaults: the config's
    `train.threads` and `train.bf16`; both are properties of the machine, so a resumed
    run may change them).

    Returns (model, last logged train stats of this rank). SIGTERM/SIGINT stop at the
    next step boundary after writing a checkpoint. On CPUs shared with other work, start
    it with OMP_WAIT_POLICY=PASSIVE (see docs/results.md: 3x less CPU per step)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    rank, world = init_distributed()
    train_cfg, optim, data = config["train"], config["optim"], config["data"]
    torch.set_num_threads(max(1, (threads or train_cfg["threads"]) // world))
    total = total_steps(config)
    stop = min(total, stop_at if stop_at is not None else total)
    accum = optim["accum"]

    torch.manual_seed(config["seed"])  # identical initial weights on every rank
    model = build_model(CDTConfig.from_preset(config["model"]["preset"]), config["model"]["kind"])
    if config["model"]["init_from"]:
        model.load_state_dict(warm_start_weights(config["model"]["init_from"], model))
    ema = build_model(model.config, model.kind).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=optim["lr"], betas=tuple(optim["betas"]),
                            weight_decay=optim["weight_decay"])
    step, wall = 0, 0.0
    if (run_dir / STATE_FILE).exists():
        state = load_state(run_dir)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        step, wall = state["step"], state["wall_seconds"]
        if rank == 0:
            truncate_log(run_dir / LOG_FILE, step)

    lpips = build_lpips(config["loss"]["lpips_weights"])
    objective = Objective(model, config["loss"], lpips)
    if world > 1:
        objective = torch.nn.parallel.DistributedDataParallel(objective)
    use_bf16 = train_cfg["bf16"] if bf16 is None else bf16
    autocast = torch.autocast("cpu" if model.device.type == "cpu" else "cuda", dtype=torch.bfloat16,
                              enabled=use_bf16)

    cache = build_cache(split_videos(data, "train"), data["cache_dir"], data["short_side"], data["max_frames"],
                        data["decode_workers"])
    dataset = ClipBatches(cache, functools.partial(stage_of_batch, config, accum), config["seed"], rank,
                          data["max_stride"], data["min_region"], data["channel_permute"])
    batches = iter(batch_loader(dataset, step * accum, stop * accum, data["workers"]))
    val = config["val"]
    val_set = val_clips(split_videos(data, "val")[: val["max_clips"]], val["frames"], val["size"]) if rank == 0 else []

    log = (run_dir / LOG_FILE).open("a") if rank == 0 else None

    def write_log(row: dict) -> None:
        if log is not None:
            log.write(json.dumps(row) + "\n")
            log.flush()

    def checkpoint() -> None:
        if rank == 0:
            save_state(run_dir, {"step": step, "wall_seconds": wall, "model": model.state_dict(),
                                 "ema": ema.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state()})
            try:
                plot_log(run_dir / LOG_FILE, run_dir / PLOT_FILE, title=config["name"])
            except ImportError:
                print("plot skipped: matplotlib missing (pip install -e '.[train]')")

    stop_requested = []
    previous_handlers = {s: signal.signal(s, lambda *_: stop_requested.append(True))
                         for s in (signal.SIGTERM, signal.SIGINT)}
    if rank == 0:
        kind, preset = model.kind, config["model"]["preset"]
        lpips_note = "on" if lpips is not None else "off (loss.lpips_weights not set)"
        print(f"{config['name']}: {preset} {kind}, {model.parameter_counts()['parameters']:,} params, "
              f"world {world}, steps {step}->{stop} of {total}, bf16 autocast {'on' if use_bf16 else 'off'}, "
              f"LPIPS {lpips_note}", flush=True)
    bar = tqdm(total=stop, initial=step, disable=rank != 0 or not progress, mininterval=10, dynamic_ncols=True)
    last_save, tick, window, stats = time.time(), time.time(), [], {}
    bad_in_a_row, skipped = 0, 0

    try:
        model.train()
        while step < stop and not stop_requested:
            stage = stage_at(config, step)
            lr = lr_at(step, optim, total)
            for group in opt.param_groups:
                group["lr"] = lr
            for micro in range(accum):
                video = next(batches)
                sync = world == 1 or micro == accum - 1
                with contextlib.nullcontext() if sync else objective.no_sync():
                    with autocast:
                        loss, micro_stats = objective(video, step_generator(config["seed"], step, micro, rank),
                                                      stage["lpips_weight"])
                    (loss / accum).backward()
                window.append(micro_stats)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim["grad_clip"]).item()
            if math.isfinite(grad_norm):  # the same on every rank: DDP has averaged the gradients
                opt.step()
                ema_update(ema, model, optim["ema_decay"], step)
                bad_in_a_row = 0
            else:
                # Skip the update, as loss scaling does: one bad batch must not turn the
                # weights, the EMA and the next checkpoint into NaN.
                bad_in_a_row, skipped = bad_in_a_row + 1, skipped + 1
                if bad_in_a_row >= MAX_NONFINITE_STEPS:
                    raise FloatingPointError(
                        f"gradients were not finite for {bad_in_a_row} steps in a row (up to step {step + 1}); "
                        f"stopped without saving, {run_dir} keeps its last good checkpoint. One known cause: bf16 "
                        "autocast on a CPU (train.bf16 / --bf16 on; see docs/results.md, 'Speed')")
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)

            now = time.time()
            wall, tick = wall + now - tick, now
            if step % train_cfg["log_every"] == 0 or step == stop:
                keys = sorted({key for s in window for key in s})
                stats = {key: float(np.mean([s[key] for s in window if key in s])) for key in keys}
                stats.update(kind="train", step=step, stage=stage["name"], lr=lr, grad_norm=grad_norm, skipped=skipped,
                             wall_seconds=round(wall, 1), frames=int(video.shape[2]), crop=int(video.shape[-1]))
                write_log(stats)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{lr:.2e}")
                window, skipped = [], 0
            if rank == 0 and (step % val["every"] == 0 or step == total):
                write_log({"kind": "val", "step": step, "steps": val["steps"], "size": val["size"],
                           "frames": val["frames"], **validate(ema, val_set, val["steps"])})
            due = step % train_cfg["ckpt_every_steps"] == 0 or now - last_save > 60 * train_cfg["ckpt_every_minutes"]
            if due or step == stop or stop_requested:
                checkpoint()
                last_save = time.time()
            tick = time.time()  # validation and checkpoint time is not training wall time
    finally:  # also when the run fails: the caller gets its signal handlers back
        bar.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if log is not None:
            log.close()
    return model, stats


def export(run_dir: str | Path, out_dir: str | Path, dtype: str = "bf16") -> dict:
    """Write the run's EMA weights as a served checkpoint (`from_pretrained` loads it)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    state = load_state(run_dir)
    model = build_model(CDTConfig.from_preset(config["model"]["preset"]), config["model"]["kind"])
    model.load_state_dict(state["ema"])
    model.refresh_hash()
    digest = save_pretrained(model.eval(), out_dir, dtype=dtype)
    return {"checkpoint": str(out_dir), "run": str(run_dir), "step": state["step"], "kind": model.kind,
            "preset": config["model"]["preset"], "dtype": dtype, "hash": digest}
