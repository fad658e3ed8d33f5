"""The Ray engine: Ray Data decodes the inputs in CPU tasks and streams them to a pool of
model actors (one per GPU, or per `devices` on CPUs), whose samples stream back to the
driver, which writes each shard once all its inputs are in.

Ray is imported when the engine runs (the `ray` extra), on an existing cluster
(`address`, e.g. "auto" inside a Ray job) or a local one started here. The workers need
this project and the checkpoint at the same path; a local cluster started here imports
the driver's copy of the code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model import from_pretrained

from .plan import EncodeOptions, Input, ModelRef, Shard
from .run import RunSummary, ShardRun
from .sample import DecodedClip, InputFailure, ModelTime, Sample, decode_input, encode_input

# Rows per block of the input table: a block is one decode task's work, so blocks of one
# row spread the decodes over the cluster; a cap keeps the scheduler's bookkeeping bounded.
MAX_BLOCKS = 4096
CODE_ROOT = str(Path(__file__).resolve().parents[2])


def encode_ray(run: ShardRun, checkpoint: str, ref: ModelRef, options: EncodeOptions, device: str, devices: int,
               workers: int, threads: int, address: str | None = None) -> RunSummary:
    """Encode `run`'s pending shards on Ray: `devices` model actors (each with one GPU when
    `device` is "cuda", else one CPU and `threads` intra-op threads), at most `workers`
    decode tasks at a time."""
    import ray  # the `ray` extra

    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # A local cluster listens on loopback only and runs this copy of the code.
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": CODE_ROOT}}, _node_ip_address="127.0.0.1",
                     log_to_driver=False, include_dashboard=False)
    # The run's own bar reports progress; Ray Data's would print over it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    shards = {shard.name: shard for shard in run.pending}
    items = [{"shard": shard.name, "key": item.key, "name": item.name, "path": item.path} for shard in run.pending
             for item in shard.inputs]
    if not items:
        return run.summary(devices)
    gpu = device == "cuda"
    dataset = (ray.data.from_items(items, override_num_blocks=min(len(items), MAX_BLOCKS))
               .map(_decode_row, fn_kwargs={"options": options}, num_cpus=1, concurrency=workers)
               .map_batches(_Encoder, fn_constructor_kwargs={"checkpoint": checkpoint, "ref": ref,
                                                             "options": options, "gpu": gpu, "threads": threads},
                            batch_size=1, concurrency=devices, num_gpus=1 if gpu else 0, num_cpus=0 if gpu else 1))
    arrived: dict[str, dict[str, tuple[Sample | InputFailure, float]]] = {name: {} for name in shards}
    for row in dataset.iter_rows():
        results = arrived[row["shard"]]
        timed = float(row["seconds"]) >= 0  # -1: the model did not run
        results[row["key"]] = (_result(row), ModelTime(float(row["started"]), float(row["seconds"])) if timed else None)
        shard = shards[row["shard"]]
        if len(results) == len(shard.inputs):
            _write(run, shard, arrived.pop(shard.name))
    return run.summary(devices)


def _write(run: ShardRun, shard: Shard, results: dict[str, tuple[Sample | InputFailure, ModelTime | None]]) -> None:
    with run.writer(shard) as out:
        for item in shard.inputs:
            out.add(item, *results[item.key])


def _result(row: dict) -> Sample | InputFailure:
    if row["code"]:
        return InputFailure(row["code"], row["reason"])
    return Sample(row["key"], row["meta"], row["latents"], int(row["frames"]))


def _decode_row(row: dict, options: EncodeOptions) -> dict:
    """A decode task: the input's frames as bytes and their shape, or its failure."""
    torch.set_num_threads(1)  # the resize's threads: one task per CPU
    clip = decode_input(row["path"], options)
    if isinstance(clip, InputFailure):
        return {**row, "pixels": b"", "t": 0, "h": 0, "w": 0, "fps": 0.0, "source_width": 0, "source_height": 0,
                "code": clip.code, "reason": clip.reason}
    t, h, w = clip.frames.shape[:3]
    return {**row, "pixels": clip.frames.tobytes(), "t": t, "h": h, "w": w, "fps": clip.fps,
            "source_width": clip.source_width, "source_height": clip.source_height, "code": "", "reason": ""}


class _Encoder:
    """A model actor: decoded clips in, samples (or failures) out."""

    def __init__(self, checkpoint: str, ref: ModelRef, options: EncodeOptions, gpu: bool, threads: int) -> None:
        # Ray sets one OpenMP thread in its workers; the local engine's models run with
        # `threads`, and the same thread count gives the same bits.
        torch.set_num_threads(threads)
        self.model, identity = from_pretrained(checkpoint, "cuda" if gpu else "cpu", options.dtype)
        if identity.content_hash != ref.hash:
            raise ValueError(f"{checkpoint} on this worker is model {identity.content_hash[:12]}, "
                             f"the driver's is {ref.hash[:12]}")
        self.ref, self.options = ref, options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in ("shard", "key", "meta", "latents", "frames", "code", "reason",
                                                      "started", "seconds")}
        for i in range(len(batch["key"])):
            row = {name: values[i] for name, values in batch.items()}
            result, model_time = encode_input(self.model, self.ref, Input(str(row["key"]), str(row["name"]),
                                                                       str(row["path"])), _clip(row), self.options)
            failed = isinstance(result, InputFailure)
            out["shard"].append(row["shard"])
            out["key"].append(row["key"])
            out["meta"].append(b"" if failed else result.meta)
            out["latents"].append(b"" if failed else result.latents)
            out["frames"].append(0 if failed else result.frames)
            out["code"].append(result.code if failed else "")
            out["reason"].append(result.reason if failed else "")
            out["started"].append(0.0 if model_time is None else model_time.started)
            out["seconds"].append(-1.0 if model_time is None else model_time.seconds)
        return out



def _clip(row: dict) -> DecodedClip | InputFailure:
    """A decode task's row back as what `decode_input` gave."""
    if row["code"]:
        return InputFailure(str(row["code"]), str(row["reason"]))
    shape = (int(row["t"]), int(row["h"]), int(row["w"]), 3)
    frames = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(shape)
    return DecodedClip(frames, float(row["fps"]), int(row["source_width"]), int(row["source_height"]))
