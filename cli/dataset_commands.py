"""`cdt encode-dataset`: a folder or manifest of videos to WebDataset shards of latents
(media/shards), on this machine or a Ray cluster; rerun to resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from media.shards import EncodeOptions, ModelRef, ShardRun, plan_shards
from media.shards.local import encode_local
from media.shards.plan import CROPS
from media.shards.ray_engine import encode_ray
from model import DEFAULT_CHECKPOINT, from_pretrained
from training.sources import read_manifest, scan

from .media_commands import _add_model_args, _positive, load_model

ENGINES = ("local", "ray")
DEVICES = ("cpu", "cuda")
MANIFEST_SUFFIXES = (".tsv", ".csv", ".jsonl")
# Pixel frames per streaming-encoder step: the service's whole-clip chunk
# (service.memory.MAX_CHUNK_FRAMES), so the latents equal /v1/encode's.
DEFAULT_CHUNK_FRAMES = 8
DEFAULT_SHARD_SIZE = 256


def register(sub) -> None:
    parser = sub.add_parser(
        "encode-dataset", help="encode a folder or manifest of videos to WebDataset shards of latents",
        description="Encode every video of SOURCE to OUTPUT/shard-NNNNNN.tar (KEY.latents.safetensors + "
                    "KEY.json per clip) and OUTPUT/index.json. Rerunning the same command resumes; files that "
                    "give no clip are listed in the index with their reasons.")
    parser.add_argument("source", type=Path, help="a folder of videos (searched recursively) or a manifest "
                                                   "(.tsv/.csv/.jsonl with a path or file column), as `cdt train` reads")
    parser.add_argument("output", type=Path, help="folder for the shards and index.json")
    _add_model_args(parser)
    parser.add_argument("--frames", type=_positive, metavar="N",
                        help="the first N frames of each clip; shorter clips are skipped (default: whole clips)")
    parser.add_argument("--size", type=_positive, metavar="S", help="resize so the short side is S")
    parser.add_argument("--crop", choices=CROPS, default="none", help="none, or center: a centre crop SxS after "
                                                                        "the resize (default none)")
    parser.add_argument("--chunk-frames", type=_positive, default=DEFAULT_CHUNK_FRAMES, metavar="F",
                        help=f"pixel frames per encoder step (default {DEFAULT_CHUNK_FRAMES}, as the service)")
    parser.add_argument("--shard-size", type=_positive, default=DEFAULT_SHARD_SIZE, metavar="N",
                        help=f"inputs per shard (default {DEFAULT_SHARD_SIZE})")
    parser.add_argument("--split", help="only the manifest's rows of this split (train, val)")
    parser.add_argument("--engine", choices=ENGINES, default="local", help="local (default) or ray")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where the models run (default cpu)")
    parser.add_argument("--devices", type=_positive, metavar="N",
                        help="models: one per GPU with --device cuda (default: every visible GPU), else N model "
                             "threads (local) or actors (ray) on CPUs (default 1)")
    parser.add_argument("--workers", type=_positive, default=2, metavar="N",
                        help="decode processes (local) or concurrent decode tasks (ray) (default 2)")
    parser.add_argument("--threads", type=_positive, metavar="N",
                        help="intra-op threads of each CPU model (default: torch's, here "
                             f"{torch.get_num_threads()}); the same count gives the same bits with either engine")
    parser.add_argument("--ray-address", metavar="ADDR",
                        help="Ray cluster to join (\"auto\" inside a Ray job; default: start a local one)")
    parser.set_defaults(run=run_encode_dataset)


def source_files(source: Path, split: str | None) -> list[tuple[str, str]]:
    """(name, path) of every input: names relative to the folder, or to the manifest's folder."""
    if source.is_dir():
        if split:
            raise ValueError("--split needs a manifest as SOURCE")
        root, paths = source, scan([source])
    elif source.suffix.lower() in MANIFEST_SUFFIXES:
        root = source.parent
        paths = [row["path"] for row in read_manifest(source) if split is None or row.get("split") == split]
    else:
        raise ValueError(f"{source}: SOURCE must be a folder or a manifest ({', '.join(MANIFEST_SUFFIXES)})")
    if not paths:
        raise ValueError(f"{source}: no inputs" + (f" in split {split!r}" if split else ""))
    return [(os.path.relpath(path, root), path) for path in paths]


def run_encode_dataset(args) -> int:
    options = EncodeOptions(frames=args.frames, size=args.size, crop=args.crop, chunk_frames=args.chunk_frames,
                            dtype=args.dtype, shard_size=args.shard_size)
    shards = plan_shards(source_files(args.source, args.split), args.shard_size)
    devices = args.devices or (torch.cuda.device_count() if args.device == "cuda" else 1)
    if devices < 1:
        raise ValueError("--device cuda: no GPU is visible")
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    model, identity = load_model(args)
    checkpoint = Path(args.checkpoint or DEFAULT_CHECKPOINT).resolve()
    ref = ModelRef(checkpoint.name, identity.content_hash, model.config.preset, model.kind)
    with ShardRun(args.output, shards, options, ref, progress=not args.quiet) as run:
        if args.engine == "ray":
            summary = encode_ray(run, str(checkpoint), ref, options, args.device, devices, args.workers, threads,
                                 args.ray_address)
        else:
            models = [model] * devices if args.device == "cpu" else \
                [from_pretrained(checkpoint, f"cuda:{i}", args.dtype).model for i in range(devices)]
            summary = encode_local(run, models, ref, options, args.workers)
    print(json.dumps(summary.to_dict()))
    return 0
