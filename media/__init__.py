"""Media layer shared by the CLI, the service and the trainer: video files, padding,
latent and frame files, clip-level encode/decode, and metrics.
May import `model`, never `service` or `training`."""

from .tokenize import (
    ClipDecoder,
    ClipEncoder,
    decode_chunk_length,
    decode_chunks,
    decode_frames,
    decode_video,
    encode_chunks,
    encode_frames,
    encode_video,
    latents_info,
)
from .frames_file import FramesFileError, load_frames, save_frames
from .latents_file import LatentsFile, LatentsFileError, LatentsInfo, ModelMismatchError, load_latents, save_latents
from .metrics import psnr, ssim
from .padding import Padding, pad_spatial, pad_video
from .pushes import StreamPush, push_outputs
from .video import (
    VideoClip,
    VideoDecodeError,
    VideoReader,
    VideoWriter,
    frame_count,
    frames_to_tensor,
    model_video,
    quantise,
    read_video,
    tensor_to_frames,
    write_video,
)

__all__ = [
    "ClipDecoder",
    "ClipEncoder",
    "FramesFileError",
    "LatentsFile",
    "LatentsFileError",
    "LatentsInfo",
    "ModelMismatchError",
    "Padding",
    "StreamPush",
    "VideoClip",
    "VideoDecodeError",
    "VideoReader",
    "VideoWriter",
    "decode_chunk_length",
    "decode_chunks",
    "decode_frames",
    "decode_video",
    "encode_chunks",
    "encode_frames",
    "encode_video",
    "frame_count",
    "frames_to_tensor",
    "latents_info",
    "load_frames",
    "load_latents",
    "model_video",
    "pad_spatial",
    "pad_video",
    "push_outputs",
    "psnr",
    "quantise",
    "read_video",
    "save_frames",
    "save_latents",
    "ssim",
    "tensor_to_frames",
    "write_video",
]
