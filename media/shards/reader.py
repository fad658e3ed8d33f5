"""Reading the shards back for training: `LatentShards`, a PyTorch IterableDataset.

The finished shards listed in OUTPUT/index.json are split over the data-parallel ranks
and, within a rank, over the DataLoader's workers: shard i goes to the reader numbered
i mod (ranks x workers). So every sample is yielded once per epoch across all of them,
with no shard read twice. With fewer shards than readers some readers get none (their
rank then yields fewer batches): write shards of a size that gives every reader several.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from ..latents_file import latents_from_bytes
from .index import read_index
from .sample import JSON_SUFFIX, LATENTS_SUFFIX
from .tar_io import read_samples


class LatentShards(IterableDataset):
    """Samples of an encoded data set as dicts: `key` (str), `latents` (float32
    (16,T',H'/8,W'/8), validated against its metadata) and `meta` (the sample's JSON).

    `rank`/`world_size` default to torch.distributed's when it is initialised, else 0/1.
    `model_hash` refuses latents of another model. Samples come in shard then key order;
    shuffle downstream (a shuffle buffer) if training needs it."""

    def __init__(self, output: str | Path, rank: int | None = None, world_size: int | None = None,
                 model_hash: str | None = None) -> None:
        super().__init__()
        self.output = Path(output)
        index = read_index(self.output)
        if index is None:
            raise FileNotFoundError(f"{self.output}: no index.json (not an encoded data set)")
        self.shards = [shard["name"] for shard in index["shards"]]
        self.samples = index["totals"]["samples"]
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world_size})")
        self.model_hash = model_hash

    def shards_of(self, worker: int, workers: int) -> list[str]:
        """The shards that DataLoader worker `worker` of `workers` reads on this rank."""
        reader, readers = self.rank * workers + worker, self.world_size * workers
        return self.shards[reader::readers]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for name in self.shards_of(worker, workers):
            path = self.output / name
            for key, members in read_samples(path):
                item = latents_from_bytes(members[LATENTS_SUFFIX], self.model_hash, source=f"{path}:{key}")
                yield {"key": key, "latents": item.latents[0], "meta": json.loads(members[JSON_SUFFIX])}


def collate_samples(samples: list[dict]) -> dict:
    """A batch of samples whose latents share one shape: stacked latents, keys and metas
    as lists (the DataLoader's default collate cannot batch the metadata's nulls)."""
    return {"key": [s["key"] for s in samples], "latents": torch.stack([s["latents"] for s in samples]),
            "meta": [s["meta"] for s in samples]}
