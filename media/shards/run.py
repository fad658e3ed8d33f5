"""One encode of a data set into OUTPUT, as every engine runs it: which shards are left,
writing each shard and then the index, and the progress bar.

The engines differ only in where inputs are decoded and encoded; they hand each shard's
samples and failures here in key order. A lock on OUTPUT refuses a second run into it
while one is going.
"""

from __future__ import annotations

import fcntl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .index import Index, continue_index, write_index
from .plan import EncodeOptions, Input, ModelRef, Shard, source_digest
from .sample import InputFailure, ModelTime, Sample
from .tar_io import ShardWriter, remove_temporaries

LOCK_NAME = ".lock"


class OutputBusy(ValueError):
    """Another run is writing into the same OUTPUT."""

    code = "output_busy"

    def __init__(self, message: str) -> None:
        super().__init__(f"{self.code}: {message}")


@dataclass(frozen=True)
class RunSummary:
    """What a run did: the clips and frames it encoded this time, how long it took, and how
    much of that time the models were busy (summed over models; `model_busy` is the share
    of models x seconds that went to encoding, the rest waited for decoded frames).
    `warm_seconds` is the time from the first encode's start to the end: `model_busy_warm`
    leaves out the start of the decode pool or cluster."""

    output: str
    shards: int  # finished, in all
    planned_shards: int
    samples: int  # in all finished shards
    failed: int
    encoded_clips: int  # by this run
    encoded_frames: int
    seconds: float
    warm_seconds: float
    model_seconds: float
    models: int

    @property
    def complete(self) -> bool:
        return self.shards == self.planned_shards

    def to_dict(self) -> dict:
        rate = (lambda n: n / self.seconds if self.seconds > 0 else 0.0)
        busy = (lambda seconds: self.model_seconds / (seconds * self.models) if seconds > 0 else 0.0)
        return {"output": self.output, "complete": self.complete, "shards": self.shards,
                "planned_shards": self.planned_shards, "samples": self.samples, "failed": self.failed,
                "encoded_clips": self.encoded_clips, "encoded_frames": self.encoded_frames,
                "seconds": round(self.seconds, 3), "clips_per_s": round(rate(self.encoded_clips), 3),
                "frames_per_s": round(rate(self.encoded_frames), 3), "model_busy": round(busy(self.seconds), 3),
                "warm_seconds": round(self.warm_seconds, 3), "model_busy_warm": round(busy(self.warm_seconds), 3)}


class ShardRun:
    """Open OUTPUT for `shards`: refuse it if it holds another data set, continue it if it
    holds this one. Use as a context manager (it holds OUTPUT's lock)."""

    def __init__(self, output: str | Path, shards: list[Shard], options: EncodeOptions, model: ModelRef,
                 progress: bool = True) -> None:
        self.output, self.options, self.model = Path(output), options, model
        self.output.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.output / LOCK_NAME, "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise OutputBusy(f"{self.output}: another run is writing into it") from None
        try:
            wanted = Index(options.to_dict(), model.to_dict(),
                           {"inputs": sum(len(s.inputs) for s in shards), "names_sha256": source_digest(shards)},
                           len(shards))
            self.index = continue_index(self.output, wanted)
            remove_temporaries(self.output)
            write_index(self.output, self.index)
        except BaseException:
            self.close()
            raise
        self.pending = [shard for shard in shards if shard.name not in self.index.shards]
        self._mutex = threading.Lock()
        self._clips = self._frames = 0
        self._model_seconds = 0.0
        self._failed_now = 0
        self._start = time.perf_counter()
        self._first_encode: float | None = None  # wall clock: the models may run in other processes
        self._bar = tqdm(total=sum(len(s.inputs) for s in self.pending), unit="clip", desc="encode-dataset",
                         disable=not progress, file=sys.stderr, smoothing=0.1)

    def writer(self, shard: Shard) -> "ShardOutput":
        return ShardOutput(self, shard)

    def _done(self, writer: ShardWriter, failed: list[dict]) -> None:
        record = writer.commit()
        with self._mutex:
            self.index.add(record, failed)
            write_index(self.output, self.index)

    def _count(self, sample: Sample | None, model_time: ModelTime | None) -> None:
        with self._mutex:
            if sample is None:
                self._failed_now += 1
            else:
                self._clips += 1
                self._frames += sample.frames
            if model_time is not None:
                self._model_seconds += model_time.seconds
                self._first_encode = min(self._first_encode or model_time.started, model_time.started)
            elapsed = max(time.perf_counter() - self._start, 1e-9)
            self._bar.set_postfix_str(f"{self._frames / elapsed:.1f} frames/s, done {self._clips}, "
                                      f"failed {self._failed_now}", refresh=False)
            self._bar.update(1)

    def summary(self, models: int) -> RunSummary:
        totals = self.index.to_json()["totals"]
        warm = time.time() - self._first_encode if self._first_encode is not None else 0.0
        return RunSummary(str(self.output), totals["shards"], self.index.planned, totals["samples"],
                          totals["failed"], self._clips, self._frames, time.perf_counter() - self._start, warm,
                          self._model_seconds, models)

    def close(self) -> None:
        if hasattr(self, "_bar"):
            self._bar.close()
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

    def __enter__(self) -> "ShardRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardOutput:
    """One shard being written: its samples and failures in key order, then committed
    (shard renamed into place, index rewritten) on a clean exit, discarded otherwise."""

    def __init__(self, run: ShardRun, shard: Shard) -> None:
        self._run, self._inputs = run, {item.key: item for item in shard.inputs}
        self._writer = ShardWriter(run.output / shard.name)
        self._failed: list[dict] = []

    def add(self, item: Input, result: Sample | InputFailure, model_time: ModelTime | None = None) -> None:
        if isinstance(result, InputFailure):
            self._failed.append({"key": item.key, "source": item.name, "code": result.code,
                                 "reason": result.reason})
            self._run._count(None, model_time)
        else:
            self._writer.add(result)
            self._run._count(result, model_time)
        self._inputs.pop(item.key)

    def __enter__(self) -> "ShardOutput":
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is not None:
            self._writer.discard()
            return
        if self._inputs:
            self._writer.discard()
            raise RuntimeError(f"{self._writer.path.name}: inputs {sorted(self._inputs)[:3]} were never written")
        self._run._done(self._writer, self._failed)
