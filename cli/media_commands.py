"""`cdt encode`, `cdt decode`, `cdt reconstruct` and `cdt eval`: video files in and out.

Inputs are any video PyAV decodes, or frames files (.safetensors / .npy, uint8 (T,H,W,3)).
Outputs are latents files (.safetensors), mp4 (h264/yuv420p), or frames files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from media import (
    LatentsFile,
    VideoReader,
    VideoWriter,
    decode_chunk_length,
    decode_frames,
    encode_frames,
    load_latents,
    psnr,
    read_video,
    save_frames,
    save_latents,
    ssim,
    write_video,
)
from media import provenance
from media.frames_file import FRAME_FILE_SUFFIXES, is_frames_file, load_frames
from media.lpips import LPIPS_SKIPPED, load_lpips
from media.video import resize_short_side
from model import DEFAULT_CHECKPOINT, Pretrained, Tokenizer, from_pretrained
from service.settings import SettingsError, max_steps_from_env

FALLBACK_FPS = 30.0
VIDEO_OUTPUT_SUFFIX = ".mp4"
LATENTS_SUFFIX = ".safetensors"
STEPS_HELP = "diffusion decoding steps, at most CDT_MAX_STEPS (default 1)"

EVAL_PROTOCOL = (
    "Protocol: each clip's first N (--frames) frames are read, resized so the short side is "
    "S (--size; bicubic, antialiased) and centre-cropped to SxS; the clip is encoded whole "
    "(padded to 1+4k frames by repeating the last), decoded with --steps/--seed, cropped back "
    "and rounded to uint8. PSNR (dB, MSE over the whole clip) and SSIM (11x11 Gaussian, "
    "sigma 1.5) are computed in [0,1] RGB; the mean is over clips. LPIPS only with "
    "--lpips-weights (never downloaded)."
)


def register(sub) -> None:
    encode = sub.add_parser("encode", help="encode a video to a latents file (.safetensors)")
    encode.add_argument("input", help="video file (mp4, avi, webm, ...) or frames file (.safetensors/.npy)")
    encode.add_argument("-o", "--output", required=True, help="latents file to write (.safetensors)")
    _add_model_args(encode)
    _add_input_args(encode)
    encode.add_argument("--chunk", type=_positive, metavar="F",
                        help="stream F frames at a time through the feature cache (bounded memory)")
    encode.set_defaults(run=run_encode)

    decode = sub.add_parser("decode", help="decode a latents file to mp4, .safetensors or .npy frames")
    decode.add_argument("input", help="latents file (.safetensors) written by `cdt encode`")
    decode.add_argument("-o", "--output", required=True, help="output: .mp4, or frames as .safetensors / .npy")
    _add_model_args(decode)
    _add_decode_args(decode)
    decode.add_argument("--chunk", type=_positive, metavar="L", help="decode L latent frames at a time")
    decode.add_argument("--force", action="store_true", help="decode latents made by another model anyway")
    decode.set_defaults(run=run_decode)

    recon = sub.add_parser("reconstruct", help="encode then decode a video; print PSNR/SSIM against the input")
    recon.add_argument("input", help="video file or frames file (.safetensors/.npy)")
    recon.add_argument("-o", "--output", required=True, help="output: .mp4, or frames as .safetensors / .npy")
    _add_model_args(recon)
    _add_input_args(recon)
    _add_decode_args(recon)
    recon.add_argument("--chunk", type=_positive, metavar="F",
                       help="stream F frames at a time through encoder and decoder caches")
    recon.set_defaults(run=run_reconstruct)

    evaluate = sub.add_parser("eval", help="PSNR/SSIM (and optional LPIPS) of reconstructions",
                              description=EVAL_PROTOCOL)
    evaluate.add_argument("--videos", nargs="+", required=True, metavar="PATH", help="clips to evaluate")
    _add_model_args(evaluate)
    evaluate.add_argument("--frames", type=_positive, default=17, metavar="N", help="first N frames (default 17)")
    evaluate.add_argument("--size", type=_positive, default=256, metavar="S",
                          help="short side resized to S, then centre crop SxS (default 256)")
    evaluate.add_argument("--steps", type=_steps, default=1, help=STEPS_HELP)
    evaluate.add_argument("--seed", type=int, default=0, help="decoding noise seed (default 0)")
    evaluate.add_argument("--lpips-weights", type=Path, nargs="+", metavar="PATH",
                          help="local torchvision AlexNet/VGG16 weights (.pth or .safetensors), optionally "
                               "followed by the LPIPS linear-head weights; LPIPS is skipped without")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--output", type=Path, metavar="PATH",
                          help="also write the JSON object to PATH, with the command, commit, machine and date "
                               "that produced it (the docs quote evaluations from such files)")
    evaluate.set_defaults(run=run_eval)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _steps(text: str) -> int:
    """DDIM steps, bounded by the service's setting so that a command and a request agree."""
    value = _positive(text)
    try:
        limit = max_steps_from_env()
    except SettingsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value > limit:
        raise argparse.ArgumentTypeError(f"must be at most {limit} (CDT_MAX_STEPS), got {value}")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _crf(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 51:
        raise argparse.ArgumentTypeError(f"must be in 0..51, got {value}")
    return value


def _add_model_args(parser) -> None:
    parser.add_argument("--checkpoint", type=Path, metavar="DIR",
                        help=f"checkpoint directory (default {DEFAULT_CHECKPOINT})")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="compute dtype (default fp32)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_input_args(parser) -> None:
    parser.add_argument("--frames", type=_positive, metavar="N", help="use the first N frames (error if fewer)")
    parser.add_argument("--size", type=_positive, metavar="S", help="resize so the short side is S")
    parser.add_argument("--fps", type=_rate, default=FALLBACK_FPS,
                        help=f"frame rate recorded for inputs that carry none, e.g. .npy (default {FALLBACK_FPS:g})")


def _add_decode_args(parser) -> None:
    parser.add_argument("--steps", type=_steps, default=1, help=STEPS_HELP)
    parser.add_argument("--seed", type=int, default=0, help="decoding noise seed (default 0)")
    parser.add_argument("--crf", type=_crf, default=18, help="x264 quality of .mp4 output, 0..51 (default 18)")


def load_model(args) -> Pretrained:
    if args.checkpoint is None and not DEFAULT_CHECKPOINT.is_dir():
        raise ValueError(f"no --checkpoint given and the default {DEFAULT_CHECKPOINT} does not exist: "
                         "pass --checkpoint DIR, or create one with `cdt init --preset tiny -o DIR`")
    return from_pretrained(args.checkpoint or DEFAULT_CHECKPOINT, dtype=args.dtype)


def _check_output(path: str, allowed: tuple[str, ...]) -> Path:
    path = Path(path)
    if path.suffix.lower() not in allowed:
        raise ValueError(f"{path}: output must end in {' or '.join(allowed)}")
    if not path.parent.is_dir():
        raise ValueError(f"{path}: directory {path.parent} does not exist")
    return path


def _bar(args, total: int | None, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="frame", disable=args.quiet, file=sys.stderr, leave=False)


def _counted(chunks: Iterable[np.ndarray], bar: tqdm) -> Iterator[np.ndarray]:
    for chunk in chunks:
        yield chunk
        bar.update(len(chunk))


@contextlib.contextmanager
def open_input(args, chunk: int | None):
    """Yield (chunks of uint8 frames, fps, expected frame count or None) for args.input."""
    path = Path(args.input)
    if is_frames_file(path):
        frames, fps = load_frames(path)
        frames = frames[: args.frames]
        if args.size:
            frames = resize_short_side(frames, args.size)
        step = chunk or len(frames)
        chunks: Iterable[np.ndarray] = (frames[i : i + step] for i in range(0, len(frames), step))
        yield _at_least(chunks, args.frames, path), fps or args.fps, len(frames)
        return
    with VideoReader(path, num_frames=args.frames, size=args.size) as reader:
        total = min(filter(None, (args.frames, reader.source_frames)), default=None)
        # One chunk of the whole clip when not streaming.
        yield _at_least(reader.chunks(chunk or sys.maxsize), args.frames, path), reader.fps, total


def _at_least(chunks: Iterable[np.ndarray], frames: int | None, path: Path) -> Iterator[np.ndarray]:
    count = 0
    for chunk in chunks:
        count += len(chunk)
        yield chunk
    if frames is not None and count < frames:
        raise ValueError(f"{path}: too few frames: it has {count}, --frames asks for {frames}")


def model_name(args) -> str:
    """The name latents files record for the checkpoint: its directory's, as `cdt serve` names a
    single checkpoint."""
    return Path(args.checkpoint or DEFAULT_CHECKPOINT).name


def _encode(args, model: Tokenizer, model_hash: str) -> LatentsFile:
    with open_input(args, args.chunk) as (chunks, fps, total), _bar(args, total, "encode") as bar:
        return encode_frames(model, model_hash, _counted(chunks, bar), fps, streamed=args.chunk is not None,
                             model_name=model_name(args))


def _decoded(args, model: Tokenizer, model_hash: str, item: LatentsFile, chunk: int | None,
             bar: tqdm) -> Iterator[np.ndarray]:
    return _counted(decode_frames(model, model_hash, item, steps=args.steps, seed=args.seed, chunk=chunk), bar)


def _save(output: Path, frames: np.ndarray, fps: float, crf: int) -> None:
    if output.suffix.lower() == VIDEO_OUTPUT_SUFFIX:
        write_video(output, frames, fps, crf=crf)
    else:
        save_frames(output, frames, fps)


def run_encode(args) -> int:
    output = _check_output(args.output, (LATENTS_SUFFIX,))
    model, identity = load_model(args)
    item = _encode(args, model, identity.content_hash)
    save_latents(output, item)
    print(json.dumps({"output": str(output), "latents": list(item.latents.shape), "frames": item.frames,
                      "height": item.height, "width": item.width, "fps": item.fps, "model": item.model_name,
                      "model_hash": item.model_hash}))
    return 0


def run_decode(args) -> int:
    output = _check_output(args.output, (VIDEO_OUTPUT_SUFFIX, *FRAME_FILE_SUFFIXES))
    model, identity = load_model(args)
    item = load_latents(args.input, identity.content_hash, force=args.force)
    with _bar(args, item.frames, "decode") as bar:
        decoded = _decoded(args, model, identity.content_hash, item, args.chunk, bar)
        if output.suffix.lower() == VIDEO_OUTPUT_SUFFIX:
            # Written chunk by chunk: memory stays bounded by --chunk.
            with VideoWriter(output, item.width, item.height, item.fps, crf=args.crf) as writer:
                for frames in decoded:
                    writer.write(frames)
        else:
            save_frames(output, np.concatenate(list(decoded)), item.fps)
    print(json.dumps({"output": str(output), "frames": item.frames, "height": item.height,
                      "width": item.width, "fps": item.fps}))
    return 0


def run_reconstruct(args) -> int:
    output = _check_output(args.output, (VIDEO_OUTPUT_SUFFIX, *FRAME_FILE_SUFFIXES))
    model, identity = load_model(args)
    # The input is kept for the metrics; its chunks still stream through the encoder.
    original: list[np.ndarray] = []
    with open_input(args, args.chunk) as (chunks, fps, total), _bar(args, total, "encode") as bar:
        item = encode_frames(model, identity.content_hash, _counted(_kept(chunks, original), bar), fps,
                             streamed=args.chunk is not None)
    latent_chunk = None if args.chunk is None else decode_chunk_length(model, args.chunk)
    with _bar(args, item.frames, "decode") as bar:
        decoded = np.concatenate(list(_decoded(args, model, identity.content_hash, item, latent_chunk, bar)))
    _save(output, decoded, item.fps, args.crf)
    reference = np.concatenate(original)
    print(f"{output}: {item.frames} frames {item.width}x{item.height} @ {item.fps:g} fps  "
          f"PSNR {psnr(reference, decoded):.2f} dB  SSIM {ssim(reference, decoded):.4f}  "
          "(decoded frames vs input, before mp4 compression)")
    return 0


def _kept(chunks: Iterable[np.ndarray], store: list[np.ndarray]) -> Iterator[np.ndarray]:
    for chunk in chunks:
        store.append(chunk)
        yield chunk


def _eval_measures(args) -> list[str]:
    """The code and weights an evaluation describes, as repository paths."""
    checkpoint = Path(args.checkpoint or DEFAULT_CHECKPOINT).resolve()
    weights = [f"{checkpoint.relative_to(provenance.REPO)}/"] if checkpoint.is_relative_to(provenance.REPO) else []
    return ["model/", "media/", "cli/media_commands.py", *weights]


def run_eval(args) -> int:
    model, identity = load_model(args)
    lpips = load_lpips(*args.lpips_weights) if args.lpips_weights else None
    clips = []
    for path in tqdm(args.videos, desc="eval", unit="clip", disable=args.quiet, file=sys.stderr, leave=False):
        clip = read_video(path, num_frames=args.frames, size=args.size, crop=args.size)
        if len(clip.frames) < args.frames:
            raise ValueError(f"{path}: too few frames: it has {len(clip.frames)}, --frames asks for {args.frames}")
        item = encode_frames(model, identity.content_hash, [clip.frames], clip.fps, streamed=False)
        decoded = np.concatenate(list(decode_frames(model, identity.content_hash, item, args.steps, args.seed)))
        scores = {"path": str(path), "psnr": psnr(clip.frames, decoded), "ssim": ssim(clip.frames, decoded)}
        if lpips is not None:
            scores["lpips"] = lpips.score(clip.frames, decoded)
        clips.append(scores)
    metrics = ["psnr", "ssim"] + (["lpips"] if lpips is not None else [])
    report = {
        "clips": clips,
        "mean": {key: float(np.mean([c[key] for c in clips])) for key in metrics},
        "protocol": {"frames": args.frames, "size": args.size, "crop": [args.size, args.size], "steps": args.steps,
                     "seed": args.seed, "dtype": args.dtype, "space": "RGB [0,1], uint8-rounded reconstruction",
                     "lpips": lpips.description if lpips is not None else LPIPS_SKIPPED},
        "checkpoint": {"path": str(args.checkpoint or DEFAULT_CHECKPOINT), "hash": identity.content_hash,
                       "preset": model.config.preset, "kind": model.kind},
    }
    if args.output:
        measured = {**provenance.record("cdt " + shlex.join(sys.argv[1:]), _eval_measures(args)), **report}
        args.output.write_text(json.dumps(measured, indent=1) + "\n")
    if args.json:
        print(json.dumps(report))
        return 0
    for c in clips:
        print(f"{c['path']}: PSNR {c['psnr']:.2f} dB  SSIM {c['ssim']:.4f}"
              + (f"  LPIPS {c['lpips']:.4f}" if "lpips" in c else ""))
    mean = report["mean"]
    print(f"mean over {len(clips)} clips: PSNR {mean['psnr']:.2f} dB  SSIM {mean['ssim']:.4f}"
          + (f"  LPIPS {mean['lpips']:.4f}" if "lpips" in mean else f"  ({LPIPS_SKIPPED})"))
    return 0
