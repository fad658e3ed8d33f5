"""The local engine: decoding in a pool of host processes, overlapping the models.

Each model (one per device; on the CPU, `models` threads share one copy) takes every
`models`-th pending shard and encodes its inputs in key order, while the pool decodes
the next `PREFETCH_PER_WORKER x workers` inputs ahead of it. Decoded clips cross to the
model as whole uint8 arrays, so memory holds that many clips at once.
"""

from __future__ import annotations

import collections
import multiprocessing
import threading
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Iterator

import torch

from model import Tokenizer

from .plan import EncodeOptions, Input, ModelRef, Shard
from .run import RunSummary, ShardRun
from .sample import DecodedClip, InputFailure, decode_input, encode_input

# Clips decoded ahead per decode worker: enough that a slow clip does not starve the model.
PREFETCH_PER_WORKER = 2


def encode_local(run: ShardRun, models: list[Tokenizer], ref: ModelRef, options: EncodeOptions,
                 workers: int) -> RunSummary:
    """Encode `run`'s pending shards with `models` (each on its own device, or one CPU model
    listed once per thread) and `workers` decode processes."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    lanes = [run.pending[i :: len(models)] for i in range(len(models))]
    errors: list[BaseException] = []
    # Not forked from this process: a child forked from a process whose OpenMP pool has run
    # (any torch op) can deadlock in its first parallel region. A fork server that has only
    # imported the decoder (no torch op) forks the workers, which then skip that import.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([decode_input.__module__])
    with ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        threads = [threading.Thread(target=_lane, args=(run, model, ref, options, lane, pool,
                                                        workers * PREFETCH_PER_WORKER, errors), daemon=True)
                   for model, lane in zip(models, lanes) if lane]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return run.summary(len(models))


def _lane(run: ShardRun, model: Tokenizer, ref: ModelRef, options: EncodeOptions, shards: list[Shard],
          pool: Executor, window: int, errors: list[BaseException]) -> None:
    try:
        decoded = _prefetched(pool, [item for shard in shards for item in shard.inputs], options, window)
        for shard in shards:
            if errors:  # another lane failed: stop at a shard boundary
                return
            with run.writer(shard) as out:
                for item in shard.inputs:
                    out.add(item, *encode_input(model, ref, item, next(decoded), options))
    except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
        errors.append(exc)


def _prefetched(pool: Executor, items: list[Input], options: EncodeOptions,
                window: int) -> Iterator[DecodedClip | InputFailure]:
    """Each item's decode, in order, with up to `window` decodes submitted ahead."""
    queued: collections.deque[Future] = collections.deque()
    pending = iter(items)
    while True:
        while len(queued) < window and (item := next(pending, None)) is not None:
            queued.append(pool.submit(decode_input, item.path, options))
        if not queued:
            return
        yield queued.popleft().result()
