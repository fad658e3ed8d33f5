"""Which samples each micro-batch holds: DistributedSampler's sharding over endless epochs.

Videos and images are two pools, each an endless stream of samples: epoch e of a pool is
a permutation of its files seeded by (seed, pool, e), and slot g of the stream is file
order_e[g mod N] with e = g div N. A micro-batch takes per-rank batch x world consecutive
slots of one pool, rank r the slots r, r + world, ... (DistributedSampler's interleaving):
the ranks' samples are disjoint, and each file is seen once per epoch over all ranks.

The cursor (the next free slot of each pool) is the data position of the whole run, the
same on every rank, and a checkpoint stores it. Resumed with the same world size a run
continues bit for bit; with another one the streams continue where they stopped (no
sample repeated or skipped), the ranks just share them out differently.

Whether a micro-batch is images is drawn from (seed, micro-batch index) without the rank,
so all ranks agree on the clip length (equal work per step). Image batches come from the
image files, or as single frames of videos when there are none.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

POOLS = ("video", "image")  # a pool's index seeds its random streams


def fresh_cursor() -> dict[str, int]:
    return {pool: 0 for pool in POOLS}


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, pool: str, epoch: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, POOLS.index(pool), epoch, 0x5EED]).permutation(size)


def slot_item(seed: int, pool: str, slot: int, size: int) -> int:
    """The file (index into the pool) at `slot` of the pool's stream."""
    epoch, position = divmod(slot, size)
    return int(epoch_order(seed, pool, epoch, size)[position])


@dataclass(frozen=True)
class BatchSpec:
    """Micro-batch `index` of one rank: `slots` of `pool`, cut to frames x crop x crop."""

    index: int
    pool: str
    frames: int
    crop: int
    slots: tuple[int, ...]
    cursor: dict[str, int]  # the run's data position after this micro-batch


class BatchPlan:
    """The specs of micro-batches `start..stop-1` of `rank`, from the data position
    `cursor` (that of micro-batch `start`). `stage_of(i)` gives micro-batch i's `Stage`."""

    def __init__(self, seed: int, stage_of, pool_sizes: dict[str, int], rank: int, world: int,
                 start: int, stop: int, cursor: dict[str, int]) -> None:
        if not pool_sizes["video"]:
            raise ValueError("the training inputs hold no video file")
        self.seed, self.stage_of, self.sizes = seed, stage_of, pool_sizes
        self.rank, self.world, self.start, self.stop = rank, world, start, stop
        self.cursor = dict(cursor)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        cursor = dict(self.cursor)
        for index in range(self.start, self.stop):
            stage = self.stage_of(index)
            image = np.random.default_rng([self.seed, index, 1 << 20]).random() < stage.image_ratio
            pool = "image" if image and self.sizes["image"] else "video"
            base = cursor[pool]
            slots = tuple(base + j * self.world + self.rank for j in range(stage.batch))
            cursor[pool] = base + stage.batch * self.world
            yield BatchSpec(index, pool, 1 if image else stage.frames, stage.crop, slots, dict(cursor))
