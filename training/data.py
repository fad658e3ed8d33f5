"""Training data: videos decoded once into a uint8 .npy cache, then random clips cut
from the cache.

Decoding an mp4 costs far more than a training step's data needs, and 2 cores cannot
afford it every step; so each video is decoded once (by a pool of decode workers) at
a reduced short side, stored as (T,H,W,3) uint8 and memory-mapped. Clips are then cut
by DataLoader workers: random temporal stride (variable fps), random square region
resized to the crop size (random scale), 1+4k frames; a configurable share of batches
are single frames (images as 1-frame videos).

Batch `i` is a pure function of (seed, i, rank): the data position after a resume is
just the step counter, whatever the number of workers.
"""

from __future__ import annotations

import csv
import hashlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from media.video import read_video

VIDEO_SUFFIXES = {".mp4", ".avi", ".webm", ".mkv", ".mov"}


def manifest_videos(manifest: str | Path, split: str) -> list[Path]:
    """Files of one split (`train` / `val`) of a MANIFEST.tsv, next to the manifest."""
    manifest = Path(manifest)
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    paths = [manifest.parent / row["file"] for row in rows if row["split"] == split]
    if not paths:
        raise ValueError(f"{manifest}: no rows with split={split!r}")
    return paths


def list_videos(items: list[str | Path]) -> list[Path]:
    """Files, and the video files inside folders, sorted within each folder."""
    out = []
    for item in map(Path, items):
        if item.is_dir():
            out += sorted(p for p in item.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        elif item.is_file():
            out.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such video file or folder")
    if not out:
        raise ValueError(f"no videos in {[str(i) for i in items]}")
    return out


def split_videos(data: dict, split: str) -> list[Path]:
    explicit = data["videos"] if split == "train" else data["val_videos"]
    return list_videos(explicit) if explicit else manifest_videos(data["manifest"], split)


def cache_path(cache_dir: Path, video: Path, short_side: int, max_frames: int) -> Path:
    """One file per (video content identity, decode options)."""
    stat = video.stat()
    key = f"{video.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{short_side}|{max_frames}"
    return cache_dir / f"{video.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npy"


def _decode_to_cache(job: tuple[Path, Path, int, int]) -> None:
    video, target, short_side, max_frames = job
    # One FFmpeg thread per decode worker: the workers already fill the cores.
    frames = read_video(video, num_frames=max_frames, size=short_side, threads=1).frames
    tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, frames)
    tmp.replace(target)  # atomic: a crashed decode never leaves a half-written cache


def build_cache(videos: list[Path], cache_dir: str | Path, short_side: int, max_frames: int,
                workers: int = 2) -> list[Path]:
    """Decode every video not cached yet; returns the cache files in `videos` order."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    targets = [cache_path(cache_dir, v, short_side, max_frames) for v in videos]
    jobs = [(v, t, short_side, max_frames) for v, t in zip(videos, targets) if not t.exists()]
    if workers > 1 and len(jobs) > 1:
        # spawn, not fork: a child forked from a process whose OpenMP pool has run
        # (any torch op) can deadlock in its first parallel region.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(1,)) as pool:
            list(pool.map(_decode_to_cache, jobs))
    else:
        for job in jobs:
            _decode_to_cache(job)
    return targets


class ClipBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item `i` is the whole micro-batch `i` of this rank.

    `stage_of(i)` gives the clip shape for micro-batch `i` (`frames`, `crop`, `batch`,
    `image_ratio`), so a multi-stage run changes shape at the right step.
    """

    def __init__(self, cache_files: list[Path], stage_of, seed: int, rank: int = 0,
                 max_stride: int = 1, min_region: float = 1.0, channel_permute: float = 0.0) -> None:
        self.cache_files = [str(p) for p in cache_files]
        self.stage_of = stage_of
        self.seed, self.rank = seed, rank
        self.max_stride, self.min_region = max_stride, min_region
        self.channel_permute = channel_permute
        self._arrays: list[np.ndarray] | None = None  # opened lazily in each worker

    def arrays(self) -> list[np.ndarray]:
        if self._arrays is None:
            self._arrays = [np.load(p, mmap_mode="r") for p in self.cache_files]
        return self._arrays

    def __len__(self) -> int:
        return 2**62  # endless; the sampler decides where to start and stop

    def __getitem__(self, index: int) -> torch.Tensor:
        stage = self.stage_of(index)
        # Image-or-video is drawn per batch without the rank, so all ranks agree on the
        # clip length (equal work per step); the clips themselves differ per rank.
        is_image = np.random.default_rng([self.seed, index, 1 << 20]).random() < stage["image_ratio"]
        frames = 1 if is_image else stage["frames"]
        rng = np.random.default_rng([self.seed, index, self.rank])
        clips = [self.random_clip(rng, frames, stage["crop"]) for _ in range(stage["batch"])]
        return torch.cat(clips)

    def random_clip(self, rng: np.random.Generator, frames: int, crop: int) -> torch.Tensor:
        arrays = self.arrays()
        video = arrays[rng.integers(len(arrays))]
        n, h, w = video.shape[:3]
        stride = int(rng.integers(1, self.max_stride + 1))
        stride = max(1, min(stride, (n - 1) // max(frames - 1, 1)))
        span = (frames - 1) * stride + 1
        if span > n:
            raise ValueError(f"a cached video has {n} frames, fewer than the {frames} a clip needs")
        start = int(rng.integers(0, n - span + 1))
        lo = min(round(crop * self.min_region), min(h, w))
        region = int(rng.integers(lo, min(h, w) + 1))
        top, left = int(rng.integers(0, h - region + 1)), int(rng.integers(0, w - region + 1))
        # np.array copies out of the read-only memmap.
        clip = np.array(video[start : start + span : stride, top : top + region, left : left + region])
        # Drawn only when enabled, so runs without it keep their exact clip sequence.
        if self.channel_permute and rng.random() < self.channel_permute:
            clip = clip[..., rng.permutation(3)]
        return resize_clip(clip, crop)


def resize_clip(clip: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (T,S,S,3) -> float (1,3,T,size,size) in [-1,1], antialiased bilinear."""
    x = torch.from_numpy(clip).permute(0, 3, 1, 2).float()
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).unsqueeze(0)


def batch_loader(dataset: ClipBatches, start: int, stop: int, workers: int) -> torch.utils.data.DataLoader:
    """Micro-batches `start..stop-1`, prefetched by `workers` processes."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start, stop), num_workers=workers,
        prefetch_factor=4 if workers else None, persistent_workers=False,
        worker_init_fn=_leave_process_group,
    )


def _leave_process_group(_worker_id: int) -> None:
    # A stop signal sent to the trainer's process group (`kill -- -PGID`, a terminal)
    # must reach only the trainer, which checkpoints and then ends its workers: a
    # worker killed first made the trainer crash without a checkpoint. Ignoring
    # SIGTERM instead would also ignore multiprocessing's own terminate() at exit.
    os.setpgrp()


def val_clips(videos: list[Path], frames: int, size: int) -> list[np.ndarray]:
    """The eval protocol at training scale: first `frames` frames, short side resized
    to `size`, centre crop size x size; uint8 (T,size,size,3)."""
    return [read_video(v, num_frames=frames, size=size, crop=size).frames for v in videos]
