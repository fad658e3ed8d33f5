"""A data set of videos encoded to latents, as WebDataset tar shards.

    OUTPUT/shard-000000.tar, shard-000001.tar, ...   plain tar (ustar), one sample per input:
        KEY.json                  where the latents came from (source, frames, size, crop, model)
        KEY.latents.safetensors   a latents file, the same bytes `cdt encode` and /v1/encode give
    OUTPUT/index.json             the finished shards (samples, bytes, sha256), the inputs that
                                  failed and why, the options and the model

Inputs are sorted and cut into shards of `shard_size` in that order, so a shard's content
depends only on the source, the options and the model, never on the engine, the number of
workers or an interruption: a shard appears whole (written to a hidden temporary name,
then renamed), the index is rewritten after it, and a rerun into the same OUTPUT encodes
only the shards the index does not list. `encode_local` runs on this machine; `encode_ray`
(needs the `ray` extra) on a Ray cluster. `LatentShards` reads the shards back for training.
"""

from .index import OutputConflict, read_index
from .plan import EncodeOptions, Input, ModelRef, Shard, plan_shards
from .reader import LatentShards, collate_samples
from .run import RunSummary, ShardRun
from .sample import DecodedClip, InputFailure, Sample, decode_input, encode_input, encode_sample
from .tar_io import read_samples

__all__ = [
    "DecodedClip",
    "EncodeOptions",
    "Input",
    "InputFailure",
    "LatentShards",
    "ModelRef",
    "OutputConflict",
    "RunSummary",
    "Sample",
    "Shard",
    "ShardRun",
    "collate_samples",
    "decode_input",
    "encode_input",
    "encode_sample",
    "plan_shards",
    "read_index",
    "read_samples",
]
