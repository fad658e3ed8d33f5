"""Training clips: every sample a random clip of one file, cut by DataLoader workers.

Frames come from one of two readers that give the same clips:
- `stream`: PyAV decodes just the frames a clip needs (`media.read_video`), in the
  DataLoader workers, so a data set of any size needs no preparation;
- `cache`: each file is decoded once into a uint8 .npy and memory-mapped, for small sets
  whose decode would cost more than a training step (ours: 46 clips on 2 cores).
Both see a file as its first `max_frames` frames at short side `short_side`, so the
same draws cut the same clip from either (tested).

A clip: a random temporal stride 1..max_stride (variable fps), 1+4k frames from a random
start, a random square region between `min_region` x crop and the short side, resized
(antialiased) to the crop size: random-resized crops at one configured size. Images are
1-frame clips cut the same way.

Sample slot g of a pool (training/sampling.py) draws everything from (seed, pool, g), so
a batch is a pure function of its spec. A file that cannot be read (missing, not
decodable, fewer frames than its container declares) or is too short for the clip is
skipped: the sample is drawn again from another file, and the batch reports the skip;
the trainer counts and logs it. Only a data set with nearly nothing usable fails.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from media.video import VideoDecodeError, read_video

from .sampling import POOLS, BatchPlan, BatchSpec, slot_item
from .sources import is_image

# Draws per sample before giving up: a set this broken needs fixing, not training.
MAX_DRAWS = 16
READ_ERRORS = (VideoDecodeError, av.FFmpegError, OSError)


class Unusable(Exception):
    """A file that gives no clip; `broken` ones give none at all and are not tried again."""

    def __init__(self, reason: str, broken: bool) -> None:
        super().__init__(reason)
        self.reason, self.broken = reason, broken


def probe_frames(path: str, max_frames: int) -> int:
    """Frames of the file's first video stream, up to `max_frames`: the container's count,
    else its packets (demuxed, not decoded)."""
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise Unusable("no video stream", broken=True)
            stream = container.streams.video[0]
            packets = (p for p in container.demux(stream) if p.size)
            count = stream.frames or sum(1 for _ in itertools.islice(packets, max_frames))
    except READ_ERRORS as exc:
        raise Unusable(f"not decodable ({exc})", broken=True) from None
    if not count:
        raise Unusable("no video frames", broken=True)
    return min(count, max_frames)


class StreamedFrames:
    """Frames decoded on demand, at short side `short_side`."""

    def __init__(self, paths: tuple[str, ...], short_side: int, max_frames: int) -> None:
        self.paths, self.short_side, self.max_frames = paths, short_side, max_frames
        self._counts: dict[int, int] = {}  # per worker: a file is probed once

    def frame_count(self, index: int) -> int:
        if index not in self._counts:
            path = self.paths[index]
            self._counts[index] = 1 if is_image(path) else probe_frames(path, self.max_frames)
        return self._counts[index]

    def read(self, index: int, start: int, span: int) -> np.ndarray:
        try:
            # One FFmpeg thread: the DataLoader workers already fill the cores.
            frames = read_video(self.paths[index], start=start, num_frames=span, size=self.short_side,
                                threads=1).frames
        except READ_ERRORS as exc:
            raise Unusable(str(exc), broken=True) from None
        if len(frames) < span:
            raise Unusable(f"{start + len(frames)} decodable frames, fewer than its container declares", broken=True)
        return frames


class CachedFrames:
    """Frames from the .npy cache (`build_cache`); a file without a cache entry failed to decode."""

    def __init__(self, paths: tuple[str, ...], cache_files: list[Path | None]) -> None:
        self.paths = paths
        self.cache_files = [str(f) if f is not None else None for f in cache_files]
        self._arrays: dict[int, np.ndarray] = {}  # opened lazily in each worker

    def array(self, index: int) -> np.ndarray:
        if index not in self._arrays:
            if self.cache_files[index] is None:
                raise Unusable("not decodable (no cache entry)", broken=True)
            self._arrays[index] = np.load(self.cache_files[index], mmap_mode="r")
        return self._arrays[index]

    def frame_count(self, index: int) -> int:
        return self.array(index).shape[0]

    def read(self, index: int, start: int, span: int) -> np.ndarray:
        return self.array(index)[start : start + span]


class ClipDataset(torch.utils.data.Dataset):
    """Item `spec` (a BatchSpec) is (micro-batch tensor, skip report) for one rank."""

    def __init__(self, readers: dict, seed: int, max_stride: int = 1, min_region: float = 1.0,
                 channel_permute: float = 0.0) -> None:
        self.readers = readers  # pool -> StreamedFrames | CachedFrames
        self.seed, self.max_stride, self.min_region = seed, max_stride, min_region
        self.channel_permute = channel_permute
        self.broken: dict[str, str] = {}  # per worker: path -> reason

    def __getitem__(self, spec: BatchSpec) -> tuple[torch.Tensor, dict]:
        report = {"cursor": spec.cursor, "replaced": 0, "broken": {}}
        clips = [self.sample(spec, slot, report) for slot in spec.slots]
        return torch.cat(clips), report

    def sample(self, spec: BatchSpec, slot: int, report: dict) -> torch.Tensor:
        reader = self.readers[spec.pool]
        for draw in range(MAX_DRAWS):
            rng = np.random.default_rng([self.seed, POOLS.index(spec.pool), slot, draw])
            index = slot_item(self.seed, spec.pool, slot, len(reader.paths)) if draw == 0 else \
                int(rng.integers(len(reader.paths)))
            path = reader.paths[index]
            try:
                if path in self.broken:
                    raise Unusable(self.broken[path], broken=True)
                return self.cut(reader, index, rng, spec.frames, spec.crop)
            except Unusable as exc:
                report["replaced"] += 1
                if exc.broken and path not in self.broken:
                    self.broken[path] = report["broken"][path] = exc.reason
        example = next(iter(self.broken.items()), ("-", "files too short for the clip length"))
        raise ValueError(f"no usable {spec.pool} sample in {MAX_DRAWS} draws ({len(self.broken)} unreadable "
                         f"files so far, e.g. {example[0]}: {example[1]})")

    def cut(self, reader, index: int, rng: np.random.Generator, frames: int, crop: int) -> torch.Tensor:
        n = reader.frame_count(index)
        stride = int(rng.integers(1, self.max_stride + 1))
        stride = max(1, min(stride, (n - 1) // max(frames - 1, 1)))
        span = (frames - 1) * stride + 1
        if span > n:
            raise Unusable(f"{n} frames, fewer than the {frames} a clip needs", broken=False)
        start = int(rng.integers(0, n - span + 1))
        video = reader.read(index, start, span)
        h, w = video.shape[1:3]
        lo = min(round(crop * self.min_region), min(h, w))
        region = int(rng.integers(lo, min(h, w) + 1))
        top, left = int(rng.integers(0, h - region + 1)), int(rng.integers(0, w - region + 1))
        # np.array copies out of a read-only memmap.
        clip = np.array(video[::stride, top : top + region, left : left + region])
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


def batch_loader(dataset: ClipDataset, plan: BatchPlan, workers: int,
                 pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """The plan's micro-batches, prefetched by `workers` processes."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=plan, num_workers=workers, pin_memory=pin_memory,
        prefetch_factor=4 if workers else None, persistent_workers=False,
        worker_init_fn=_leave_process_group,
    )


def _leave_process_group(_worker_id: int) -> None:
    # A stop signal sent to the trainer's process group (`kill -- -PGID`, a terminal,
    # torchrun) must reach only the trainer, which checkpoints and then ends its workers:
    # a worker killed first made the trainer crash without a checkpoint. Ignoring
    # SIGTERM instead would also ignore multiprocessing's own terminate() at exit.
    os.setpgrp()


# ---------------------------------------------------------------- the .npy cache


def cache_path(cache_dir: Path, path: str, short_side: int, max_frames: int) -> Path:
    """One file per (file content identity, decode options)."""
    stat = os.stat(path)
    key = f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{short_side}|{max_frames}"
    return cache_dir / f"{Path(path).stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npy"


def _decode_to_cache(job: tuple[str, Path, int, int]) -> str | None:
    """None, or why the file could not be decoded."""
    path, target, short_side, max_frames = job
    try:
        # One FFmpeg thread per decode worker: the workers already fill the cores.
        frames = read_video(path, num_frames=max_frames, size=short_side, threads=1).frames
    except READ_ERRORS as exc:
        return str(exc)
    tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, frames)
    tmp.replace(target)  # atomic: a crashed decode never leaves a half-written cache
    return None


def build_cache(paths: tuple[str, ...], cache_dir: str | Path, short_side: int, max_frames: int,
                workers: int = 2) -> tuple[list[Path | None], dict[str, str]]:
    """Decode every file not cached yet. Returns the cache files in `paths` order (None
    where a file could not be decoded) and {path: reason} of those failures."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    targets: list[Path | None] = []
    failed: dict[str, str] = {}
    for path in paths:
        try:
            targets.append(cache_path(cache_dir, path, short_side, max_frames))
        except OSError as exc:
            targets.append(None)
            failed[path] = str(exc)
    pending = [i for i, target in enumerate(targets) if target is not None and not target.exists()]
    jobs = [(paths[i], targets[i], short_side, max_frames) for i in pending]
    if workers > 1 and len(jobs) > 1:
        # spawn, not fork: a child forked from a process whose OpenMP pool has run
        # (any torch op) can deadlock in its first parallel region.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(1,)) as pool:
            errors = list(pool.map(_decode_to_cache, jobs))
    else:
        errors = [_decode_to_cache(job) for job in jobs]
    for i, error in zip(pending, errors):
        if error is not None:
            failed[paths[i]], targets[i] = error, None
    return targets, failed


def val_clips(videos: tuple[str, ...], frames: int, size: int) -> tuple[list[np.ndarray], dict[str, str]]:
    """The eval protocol at training scale: first `frames` frames, short side resized to
    `size`, centre crop size x size; uint8 (T,size,size,3). Unreadable files are left
    out and returned as {path: reason}."""
    clips, failed = [], {}
    for path in videos:
        try:
            clip = read_video(path, num_frames=frames, size=size, crop=size).frames
        except READ_ERRORS as exc:
            failed[path] = str(exc)
            continue
        if len(clip) < frames:
            failed[path] = f"{len(clip)} frames, fewer than the {frames} validation takes"
        else:
            clips.append(clip)
    return clips, failed
