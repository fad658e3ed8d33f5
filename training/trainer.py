"""The training loop as a run object: setup, resume, step, log, checkpoint, export.

AdamW, warmup + cosine LR, gradient clipping and accumulation, EMA, bf16 autocast,
DistributedDataParallel under torchrun (training/distributed.py), JSONL log, PNG curves,
periodic validation, and checkpoints that resume exactly.

Exact resume needs no hidden state: the LR is a function of the step, the data position
is a cursor into the sample streams (training/sampling.py) stored with the checkpoint,
and each step's noise comes from a generator seeded with (seed, step, micro-batch, rank).
A stop signal on any rank (SIGTERM, SIGINT: torchrun forwards them) stops every rank
after the same step; rank 0 writes the checkpoint, as it writes every file of the run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from media.metrics import psnr, ssim
from media.provenance import commit
from media.video import frames_to_tensor, tensor_to_frames
from model import bf16_is_fast, build_model, freeze_below, from_pretrained, load_below

from .acceleration import StepProfiler, allow_tf32, autocast, checkpoint_activations, compile_model
from .config import OptimSection, Stage, TrainingConfig
from .data import CachedFrames, ClipDataset, StreamedFrames, batch_loader, build_cache, val_clips
from .distributed import any_rank, barrier, gather_to_all, init_distributed, local_rank, rank_and_world, \
    resolve_device
from .export import export
from .losses import Objective, build_lpips
from .plot import plot_log
from .sampling import BatchPlan, fresh_cursor
from .sources import split_inputs
from .state import CONFIG_FILE, LOG_FILE, PLOT_FILE, STATE_FILE, load_state, read_run_config, rng_state, \
    save_state, set_rng_state, truncate_log

# A run whose gradients stay non-finite this long is broken, not unlucky.
MAX_NONFINITE_STEPS = 20


def lr_at(step: int, optim: OptimSection, total: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at the last step."""
    if step < optim.warmup:
        return optim.lr * (step + 1) / optim.warmup
    progress = min(1.0, (step - optim.warmup) / max(1, total - optim.warmup))
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))


def step_generator(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    """Noise, timesteps and latent samples of one micro-batch: reproducible from its index."""
    mixed = np.random.default_rng([seed, step, micro, rank, 7]).integers(2**62)
    return torch.Generator(device=device).manual_seed(int(mixed))


def stage_of_batch(config: TrainingConfig, accum: int, index: int) -> Stage:
    return config.stage_at(index // accum)


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
        video = frames_to_tensor(frames).to(model.device)
        out = tensor_to_frames(model.decode(model.encode(video), steps=steps))
        scores.append((psnr(frames, out), ssim(frames, out)))
    return {"psnr": float(np.mean([s[0] for s in scores])), "ssim": float(np.mean([s[1] for s in scores]))}


def warm_start(checkpoint: str | Path, model) -> None:
    """Start `model` from a checkpoint of the same config and kind, or of the config it was
    grown from (its levels but the top one: model/growth.py), in float32."""
    source = from_pretrained(checkpoint).model
    if source.kind == model.kind and source.config == model.config:
        model.load_state_dict(source.state_dict())
    elif source.kind == model.kind and model.config.levels and source.config == model.config.below():
        load_below(model, source.state_dict())
    else:
        raise ValueError(f"init_from {checkpoint}: a {_described(source)} checkpoint cannot start a "
                         f"{_described(model)} run (same model, or the one it was grown from)")


def _described(model) -> str:
    return f"{model.config.preset} {model.config.time_factor}x {model.kind}"


def prepare_run(run_dir: str | Path, config: TrainingConfig) -> Path:
    """Create the run directory holding the resolved config (rank 0; the others wait).

    A directory already holding a run of this same config is continued: torchrun's
    restarts and a retried Kubernetes pod rerun the command that started it. A run of
    another config is refused."""
    run_dir = Path(run_dir)
    if rank_and_world()[0] == 0:
        if (run_dir / STATE_FILE).exists() or (run_dir / LOG_FILE).exists():
            if read_run_config(run_dir) != config:
                raise FileExistsError(f"{run_dir} already holds a run of another config; continue it with "
                                      f"`cdt train --resume {run_dir}` or give another --run-dir")
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / CONFIG_FILE).write_text(json.dumps(config.to_data(), indent=2) + "\n")
    barrier()
    return run_dir


@dataclass
class Options:
    """How this process trains: properties of the machine, so a resumed run may change them.

    `threads` and `bf16` default to the config's `train.threads` and `train.bf16` (whose
    "auto" is on for CUDA, off for CPUs: see docs/results.md, 'Speed'); `device` to cuda
    when available."""

    device: str | None = None
    threads: int | None = None
    bf16: bool | None = None
    compile: bool = False
    activation_checkpointing: bool = False
    profile: bool = False
    progress: bool = True


class Run:
    """One process's share of a run: built from the run directory, continued from its
    checkpoint if there is one, trained by `train()`."""

    def __init__(self, run_dir: str | Path, options: Options | None = None) -> None:
        self.run_dir, self.options = Path(run_dir), options or Options()
        self.config = read_run_config(self.run_dir)
        self.device = resolve_device(self.options.device)
        self.rank, self.world = init_distributed(self.device)
        self.total, self.accum = self.config.total_steps, self.config.optim.accum
        self.steps_done, self.wall, self.cursor = 0, 0.0, fresh_cursor()
        self.replaced, self.unreadable, self.pending = 0, {}, {"replaced": 0, "broken": {}}
        self.skipped_updates, self.bad_in_a_row, self.stats, self.saved_world = 0, 0, {}, self.world
        self.starts: list[dict] = []  # where and by which code each (re)start ran
        self.setup_compute()
        self.setup_model()
        self.resume()
        self.setup_objective()
        self.setup_data()

    # --- setup -----------------------------------------------------------------------------
    def setup_compute(self) -> None:
        train_cfg = self.config.train
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))  # the ranks sharing this CPU
        torch.set_num_threads(max(1, (self.options.threads or train_cfg.threads) // per_machine))
        auto_bf16 = self.device.type == "cuda" and bf16_is_fast(self.device) if train_cfg.bf16 == "auto" \
            else train_cfg.bf16
        self.bf16 = auto_bf16 if self.options.bf16 is None else self.options.bf16
        if self.device.type == "cuda":
            allow_tf32()

    def setup_model(self) -> None:
        config = self.config
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        model = build_model(config.model.cdt_config(), config.model.kind)
        if config.model.init_from:
            warm_start(config.model.init_from, model)
        ema = build_model(model.config, model.kind).requires_grad_(False)
        ema.load_state_dict(model.state_dict())
        if config.model.train == "top_level":
            # Frozen weights get no gradient, so AdamW leaves them (and their decay) alone.
            freeze_below(model)
        self.model, self.ema = model.to(self.device), ema.to(self.device)
        optim = config.optim
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=optim.lr, betas=optim.betas,
                                     weight_decay=optim.weight_decay)

    def setup_objective(self) -> None:
        if self.options.activation_checkpointing:
            checkpoint_activations(self.model)
        if self.options.compile:
            compile_model(self.model)
        self.lpips = build_lpips(self.config.loss.lpips_weights)  # it follows its inputs' device
        self.objective = Objective(self.model, self.config.loss, self.lpips)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.objective = torch.nn.parallel.DistributedDataParallel(self.objective, device_ids=ids)

    def setup_data(self) -> None:
        data = self.config.data
        self.inputs = split_inputs(data, "train")
        pools = {"video": self.inputs.videos, "image": self.inputs.images}
        if data.decode == "cache":
            files = self.inputs.videos + self.inputs.images
            if local_rank() != 0:
                barrier()  # the machine's first rank decodes, the others then find the cache built
            targets, failed = build_cache(files, data.cache_dir, data.short_side, data.max_frames,
                                          data.decode_workers)
            if local_rank() == 0:
                barrier()
            self.pending["broken"].update(failed)
            split = len(self.inputs.videos)
            readers = {"video": CachedFrames(pools["video"], targets[:split]),
                       "image": CachedFrames(pools["image"], targets[split:])}
        else:
            readers = {pool: StreamedFrames(paths, data.short_side, data.max_frames)
                       for pool, paths in pools.items()}
        self.dataset = ClipDataset(readers, self.config.seed, data.max_stride, data.min_region,
                                   data.channel_permute)
        val = self.config.val
        self.val_set = []
        if self.rank == 0:
            videos = split_inputs(data, "val").videos[: val.max_clips]
            self.val_set, failed = val_clips(videos, val.frames, val.size)
            for path, reason in failed.items():
                print(f"validation skips {path}: {reason}", flush=True)

    def batches(self, stop: int):
        plan = BatchPlan(self.config.seed, functools.partial(stage_of_batch, self.config, self.accum),
                         {"video": len(self.inputs.videos), "image": len(self.inputs.images)}, self.rank,
                         self.world, self.steps_done * self.accum, stop * self.accum, self.cursor)
        return iter(batch_loader(self.dataset, plan, self.config.data.workers,
                                 pin_memory=self.device.type == "cuda"))

    # --- resume and checkpoint -------------------------------------------------------------
    def resume(self) -> None:
        """Continue from the checkpoint, if any. Another world size continues the data
        streams where they stopped, with per-rank batches as configured."""
        if (self.run_dir / STATE_FILE).exists():
            state = load_state(self.run_dir)
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
            self.steps_done, self.wall, self.saved_world = state["step"], state["wall_seconds"], state["world"]
            self.starts = state["starts"]
            data = state["data"]
            self.cursor, self.replaced, self.unreadable = data["cursor"], data["replaced"], data["unreadable"]
        if self.rank == 0:
            truncate_log(self.run_dir / LOG_FILE, self.steps_done)

    def checkpoint(self) -> None:
        if self.rank != 0:
            return
        data = {"cursor": self.cursor, "replaced": self.replaced, "unreadable": self.unreadable,
                "inputs": self.inputs.summary()}
        save_state(self.run_dir, {"step": self.steps_done, "wall_seconds": self.wall, "world": self.world,
                                  "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                                  "optimizer": self.opt.state_dict(), "rng": rng_state(), "data": data,
                                  "starts": self.starts})
        try:
            plot_log(self.run_dir / LOG_FILE, self.run_dir / PLOT_FILE, title=self.config.name)
        except ImportError:
            print("plot skipped: matplotlib missing (pip install -e '.[train]')")

    def export(self, out_dir: str | Path, dtype: str = "bf16") -> dict:
        """The served checkpoint of the last checkpoint's EMA weights (rank 0)."""
        return export(self.run_dir, out_dir, dtype)

    # --- one step ----------------------------------------------------------------------------
    def step(self, batches) -> dict:
        """One optimizer step over `accum` micro-batches; returns what the log needs."""
        stage = self.config.stage_at(self.steps_done)
        lr = lr_at(self.steps_done, self.config.optim, self.total)
        for group in self.opt.param_groups:
            group["lr"] = lr
        micro_stats, waited, samples = [], 0.0, 0
        for micro in range(self.accum):
            tick = time.perf_counter()
            video, report = next(batches)
            waited += time.perf_counter() - tick
            self.take_report(report)
            video = video.to(self.device, non_blocking=True)
            samples += video.shape[0] * self.world
            generator = step_generator(self.config.seed, self.steps_done, micro, self.rank, self.device)
            sync = self.world == 1 or micro == self.accum - 1
            with contextlib.nullcontext() if sync else self.objective.no_sync():
                with autocast(self.device, self.bf16):
                    loss, stats = self.objective(video, generator, stage.lpips_weight)
                (loss / self.accum).backward()
            micro_stats.append(stats)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip).item()
        self.update(grad_norm)
        self.opt.zero_grad(set_to_none=True)
        self.steps_done += 1
        return {"micro": micro_stats, "lr": lr, "grad_norm": grad_norm, "stage": stage.name, "samples": samples,
                "data_seconds": waited, "frames": int(video.shape[2]), "crop": int(video.shape[-1])}

    def update(self, grad_norm: float) -> None:
        if math.isfinite(grad_norm):  # the same on every rank: DDP has averaged the gradients
            self.opt.step()
            ema_update(self.ema, self.model, self.config.optim.ema_decay, self.steps_done)
            self.bad_in_a_row = 0
            return
        # Skip the update, as loss scaling does: one bad batch must not turn the weights,
        # the EMA and the next checkpoint into NaN.
        self.bad_in_a_row, self.skipped_updates = self.bad_in_a_row + 1, self.skipped_updates + 1
        if self.bad_in_a_row >= MAX_NONFINITE_STEPS:
            raise FloatingPointError(
                f"gradients were not finite for {self.bad_in_a_row} steps in a row (up to step "
                f"{self.steps_done + 1}); stopped without saving, {self.run_dir} keeps its last good checkpoint. "
                "One known cause: bf16 autocast on a CPU (train.bf16 / --bf16 on; see docs/results.md, 'Speed')")

    def take_report(self, report: dict) -> None:
        self.cursor = report["cursor"]
        self.pending["replaced"] += report["replaced"]
        self.pending["broken"].update(report["broken"])

    # --- log ---------------------------------------------------------------------------------
    def write_log(self, row: dict) -> None:
        if self.rank == 0:
            with (self.run_dir / LOG_FILE).open("a") as log:
                log.write(json.dumps(row) + "\n")

    def log_data(self) -> int:
        """Merge every rank's skipped samples and unreadable files since the last log (a
        collective); rank 0 names each new unreadable file once. Returns the samples replaced."""
        replaced = 0
        for report in gather_to_all(self.pending):
            replaced += report["replaced"]
            for path, reason in report["broken"].items():
                if path not in self.unreadable and self.rank == 0:
                    print(f"data: skipping unreadable {path}: {reason}", flush=True)
                self.unreadable.setdefault(path, reason)
        self.pending = {"replaced": 0, "broken": {}}
        self.replaced += replaced
        return replaced

    def log_train(self, window: list[dict]) -> None:
        micro = [s for result in window for s in result["micro"]]
        keys = sorted({key for s in micro for key in s})
        stats = {key: float(np.mean([s[key] for s in micro if key in s])) for key in keys}
        seconds, last = sum(r["seconds"] for r in window), window[-1]
        stats.update(kind="train", step=self.steps_done, stage=last["stage"], lr=last["lr"],
                     grad_norm=last["grad_norm"], skipped=self.skipped_updates, wall_seconds=round(self.wall, 1),
                     frames=last["frames"], crop=last["crop"], global_batch=last["samples"],
                     samples_per_s=round(sum(r["samples"] for r in window) / max(seconds, 1e-9), 3),
                     step_seconds=round(seconds / len(window), 4),
                     data_seconds=round(sum(r["data_seconds"] for r in window) / len(window), 4),
                     replaced_samples=self.log_data(), unreadable_files=len(self.unreadable))
        if self.device.type == "cuda":
            stats["max_memory_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        self.write_log(stats)
        self.stats, self.skipped_updates = stats, 0

    def log_start(self, stop: int) -> None:
        """The run's shape, printed and logged by rank 0 at every (re)start."""
        stage, config = self.config.stage_at(self.steps_done), self.config
        global_batch = stage.batch * self.world * self.accum
        row = {"kind": "start", "step": self.steps_done, "stop": stop, "world": self.world,
               "device": str(self.device), "bf16": self.bf16, "per_rank_batch": stage.batch, "accum": self.accum,
               "global_batch": global_batch, "compile": self.options.compile,
               "activation_checkpointing": self.options.activation_checkpointing, **self.inputs.summary()}
        if self.rank != 0:
            return
        self.write_log(row)
        self.starts.append({"step": self.steps_done, "world": self.world, "device": self.device.type,
                            "commit": commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        lpips_note = "on" if self.lpips is not None else "off (loss.lpips_weights not set)"
        print(f"{config.name}: {config.model.preset} {self.model.kind}, "
              f"{self.model.parameter_counts()['parameters']:,} params, {self.device} x world {self.world}, "
              f"steps {self.steps_done}->{stop} of {self.total}, batch {stage.batch} per rank x {self.world} "
              f"x accum {self.accum} = global batch {global_batch}, bf16 autocast {'on' if self.bf16 else 'off'}, "
              f"LPIPS {lpips_note}, data {self.inputs.summary()['videos']} videos + "
              f"{self.inputs.summary()['images']} images ({config.data.decode})", flush=True)
        if self.saved_world != self.world:
            print(f"resuming a world-{self.saved_world} run with world {self.world}: the global batch is now "
                  f"{global_batch}; the data streams continue where they stopped", flush=True)

    # --- the loop ----------------------------------------------------------------------------
    def train(self, stop_at: int | None = None, export_to: str | Path | None = None) -> dict:
        """Train up to `stop_at` (or the config's last step), then write the served
        checkpoint to `export_to` if given. SIGTERM/SIGINT on any rank stop every rank at
        the next step boundary after a checkpoint (and no export). Returns the last
        logged train stats of this rank."""
        stop = min(self.total, stop_at if stop_at is not None else self.total)
        signalled: list[int] = []
        handlers = {s: signal.signal(s, lambda *_: signalled.append(1)) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = tqdm(total=stop, initial=self.steps_done, disable=self.rank != 0 or not self.options.progress,
                   mininterval=10, dynamic_ncols=True)
        stopping, window, last_save, tick = False, [], time.time(), time.time()
        train_cfg, val = self.config.train, self.config.val
        try:
            self.log_start(stop)
            batches = self.batches(stop)
            with StepProfiler(self.run_dir / "profile", self.device, self.options.profile and self.rank == 0) as prof:
                self.model.train()
                while self.steps_done < stop and not stopping:
                    window.append(self.step(batches))
                    prof.step()
                    bar.update(1)
                    now = time.time()
                    window[-1]["seconds"], self.wall = now - tick, self.wall + now - tick
                    stopping = any_rank(bool(signalled), self.device)
                    done = self.steps_done == stop or stopping
                    if self.steps_done % train_cfg.log_every == 0 or done:
                        self.log_train(window)
                        window = []
                        bar.set_postfix(loss=f"{self.stats['loss']:.4f}", lr=f"{self.stats['lr']:.2e}")
                    if self.val_set and (self.steps_done % val.every == 0 or self.steps_done == self.total):
                        self.write_log({"kind": "val", "step": self.steps_done, "steps": val.steps,
                                        "size": val.size, "frames": val.frames,
                                        **validate(self.ema, self.val_set, val.steps)})
                    due = self.steps_done % train_cfg.ckpt_every_steps == 0 or \
                        now - last_save > 60 * train_cfg.ckpt_every_minutes
                    if due or done:
                        self.checkpoint()
                        last_save = time.time()
                    tick = time.time()  # validation and checkpoint time is not training wall time
        finally:  # also when the run fails: the caller gets its signal handlers back
            bar.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        if export_to is not None and not stopping and self.rank == 0:
            print(json.dumps({"export": self.export(export_to)}), flush=True)
        return self.stats


def train(run_dir: str | Path, stop_at: int | None = None, export_to: str | Path | None = None, **options):
    """Run (or continue) the run in `run_dir`; `options` are `Options` fields.
    Returns (model, last logged train stats of this rank)."""
    run = Run(run_dir, Options(**options))
    stats = run.train(stop_at, export_to)
    return run.model, stats
