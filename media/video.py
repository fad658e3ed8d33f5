"""Video files <-> uint8 RGB frames through PyAV (FFmpeg).

Reading decodes only as many frames as the request needs, converts each kept frame to
RGB with swscale (which honours the stream's colour space and range), applies the
rotation from the display matrix, and resizes with an antialiased bicubic filter.

Writing produces h264/yuv420p mp4. 4:2:0 chroma needs an even width and height, so an
odd-sized clip is padded by repeating its last row/column and the true size is stored
in the container metadata (`cdt_client.formats.video`, which the client reads too);
`read_video` crops it back, so files written here round-trip at their exact size while
other players show a 1-pixel edge.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import av
import numpy as np
import torch
import torch.nn.functional as F

from cdt_client.formats.video import display_size, display_size_tags, displayed

# The highest frame rate written: an mp4 stream's rate is a ratio of C ints, and no clip we
# serve comes near it.
MAX_FPS = 1000.0
_TIME_EPS = 1e-6  # seconds: absorbs rounding of pts * time_base when matching output times


class VideoDecodeError(ValueError):
    """A missing, undecodable or empty video file."""


@dataclass
class VideoClip:
    frames: np.ndarray  # uint8 (T, H, W, 3) RGB
    fps: float  # rate of the returned frames (after stride / fps resampling)
    source_width: int  # as decoded, after rotation and display-size crop
    source_height: int
    source_frames: int | None  # frame count declared by the container, if any


class VideoReader:
    """An open video whose RGB frames are decoded on demand (see `read_video` for options).

    Iterating yields uint8 (H,W,3) frames; `chunks(n)` yields (n,H,W,3) arrays, so long
    videos stream through in bounded memory. Use as a context manager or call close()."""

    def __init__(
        self,
        path: str | Path,
        *,
        start: int = 0,
        num_frames: int | None = None,
        stride: int = 1,
        fps: float | None = None,
        size: int | None = None,
        crop: int | tuple[int, int] | None = None,
        threads: int = 0,
    ) -> None:
        _check_options(start, num_frames, stride, fps, size, crop, threads)
        self.path = Path(path)
        if not self.path.is_file():
            raise VideoDecodeError(f"{self.path}: no such file")
        self._size, self._crop = size, crop
        self._container = self._guard(av.open, str(self.path))
        try:
            self._open_stream(start, num_frames, stride, fps, threads)
        except BaseException:
            self.close()
            raise

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except (av.FFmpegError, UnicodeDecodeError) as exc:  # PyAV decodes container metadata as UTF-8
            raise VideoDecodeError(f"{self.path}: not a decodable video ({getattr(exc, 'strerror', None) or exc})") \
                from None

    def _open_stream(self, start, num_frames, stride, fps, threads) -> None:
        if not self._container.streams.video:
            raise VideoDecodeError(f"{self.path}: no video stream")
        stream = self._container.streams.video[0]
        if stream.codec_context is None:
            raise VideoDecodeError(f"{self.path}: the video stream has no decoder (unknown or damaged codec)")
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        rate = stream.average_rate or stream.guessed_rate
        if rate is None and fps is None:
            raise VideoDecodeError(f"{self.path}: the stream declares no frame rate; pass fps=")
        source_fps = float(rate) if rate else fps
        decoded = self._container.decode(stream)
        first = self._guard(next, decoded, None)
        if first is None:
            raise VideoDecodeError(f"{self.path}: the video has no frames")
        try:
            self._display = display_size(self._container.metadata, first.width, first.height)
        except ValueError as exc:
            raise VideoDecodeError(f"{self.path}: {exc}") from None
        self.source_width, self.source_height = self._display if first.rotation % 180 == 0 else self._display[::-1]
        self.source_frames: int | None = stream.frames or None
        self.fps = (fps or source_fps) / stride
        frames: Iterable[av.VideoFrame] = itertools.chain([first], decoded)
        if fps is not None:
            frames = _resample(_timed(frames, source_fps), fps, source_fps)
        stop = None if num_frames is None else (start + num_frames) * stride
        # islice stops pulling from the decoder once `stop` is reached: no full decode.
        self._frames = itertools.islice(frames, start * stride, stop, stride)
        self._options = f"start={start}, stride={stride}, fps={fps}"
        self._count = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        while (frame := self._guard(next, self._frames, None)) is not None:
            self._count += 1
            yield _to_rgb(frame, self._display, self._size, self._crop)
        if self._count == 0:
            raise VideoDecodeError(f"{self.path}: no frames at {self._options}")

    def chunks(self, n: int) -> Iterator[np.ndarray]:
        """Successive (<=n, H, W, 3) arrays; only the last may be shorter."""
        if n < 1:
            raise ValueError(f"chunk size must be >= 1, got {n}")
        frames = iter(self)
        while chunk := list(itertools.islice(frames, n)):
            yield np.stack(chunk)

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_video(
    path: str | Path,
    *,
    start: int = 0,
    num_frames: int | None = None,
    stride: int = 1,
    fps: float | None = None,
    size: int | None = None,
    crop: int | tuple[int, int] | None = None,
    threads: int = 0,
) -> VideoClip:
    """Decode a video to RGB frames.

    `fps` resamples to a constant rate by timestamps (each output instant shows the
    latest source frame at or before it), which also regularises variable-frame-rate
    sources; `stride` then keeps every stride-th frame; `start`/`num_frames` count
    frames after both. `size` is the short side after an aspect-preserving resize,
    `crop` a centre crop (square side or (h, w)). `threads=0` lets FFmpeg choose.
    Without `fps`, frames come at their decoded cadence and `fps` reports the
    stream's average rate.
    """
    with VideoReader(path, start=start, num_frames=num_frames, stride=stride, fps=fps, size=size,
                     crop=crop, threads=threads) as reader:
        frames = np.stack(list(reader))
        return VideoClip(frames=frames, fps=reader.fps, source_width=reader.source_width,
                         source_height=reader.source_height, source_frames=reader.source_frames)


def _check_options(start, num_frames, stride, fps, size, crop, threads) -> None:
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if size is not None and size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if crop is not None and min(_crop_shape(crop)) < 1:
        raise ValueError(f"crop must be positive, got {crop}")
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")


def _crop_shape(crop: int | tuple[int, int]) -> tuple[int, int]:
    return (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))


def _timed(frames: Iterable[av.VideoFrame], source_fps: float) -> Iterator[tuple[float, av.VideoFrame]]:
    for index, frame in enumerate(frames):
        yield (frame.time if frame.time is not None else index / source_fps), frame


def _resample(timed: Iterator[tuple[float, av.VideoFrame]], fps: float, source_fps: float) -> Iterator[av.VideoFrame]:
    """Frames at instants t0 + i/fps, each the latest source frame at or before it."""
    index, previous, t0, last_t = 0, None, 0.0, 0.0
    for t, frame in timed:
        if previous is None:
            t0 = t
        while previous is not None and t0 + index / fps < t - _TIME_EPS:
            yield previous
            index += 1
        previous, last_t = frame, t
    # The last frame is shown for one nominal source frame duration.
    while previous is not None and t0 + index / fps < last_t + 1 / source_fps - _TIME_EPS:
        yield previous
        index += 1


def _to_rgb(frame: av.VideoFrame, display: tuple[int, int], size: int | None, crop) -> np.ndarray:
    rgb = displayed(frame.to_ndarray(format="rgb24"), display, frame.rotation)
    if size is not None:
        rgb = resize_short_side(rgb[None], size)[0]
    if crop is not None:
        rgb = center_crop(rgb[None], crop)[0]
    return np.ascontiguousarray(rgb)


def short_side_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) scaled so the short side is `size`, keeping the aspect ratio."""
    scale = size / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_short_side(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 (T,H,W,3) so the short side is `size`, keeping the aspect ratio."""
    check_frames(frames)
    h, w = frames.shape[1:3]
    out_h, out_w = short_side_shape(h, w, size)
    if (out_h, out_w) == (h, w):
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    # antialias=True widens the kernel when shrinking, so fine detail does not alias.
    x = F.interpolate(x, size=(out_h, out_w), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def center_crop(frames: np.ndarray, crop: int | tuple[int, int]) -> np.ndarray:
    """Centre crop uint8 (T,H,W,3) to `crop` (square side or (h, w))."""
    ch, cw = _crop_shape(crop)
    h, w = frames.shape[1:3]
    if ch > h or cw > w:
        raise ValueError(f"crop {ch}x{cw} is larger than the {h}x{w} frame")
    top, left = (h - ch) // 2, (w - cw) // 2
    return frames[:, top : top + ch, left : left + cw]


def frames_to_tensor(frames: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (T,H,W,3) -> float32 (1,3,T,H,W) in [-1,1] on `device`. The frames cross to the
    device as uint8, a quarter of the float bytes, and are converted there."""
    check_frames(frames)
    x = torch.from_numpy(np.ascontiguousarray(frames))
    if torch.device(device).type == "cuda":
        x = x.pin_memory()  # page-locked: the copy runs as DMA, without a staging copy
    x = x.to(device, non_blocking=True).permute(3, 0, 1, 2).unsqueeze(0)
    return x.float() / 127.5 - 1.0


def model_video(chunk: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A chunk of a clip as the model takes it, on `device`: uint8 (n,H,W,3) frames converted
    there (`frames_to_tensor`), or float (1,3,n,H,W) in [-1,1] moved there."""
    if isinstance(chunk, np.ndarray):
        return frames_to_tensor(chunk, device)
    return chunk.to(device)


def frame_count(chunk: np.ndarray | torch.Tensor) -> int:
    """Frames in a chunk of either form `model_video` takes."""
    return chunk.shape[0] if isinstance(chunk, np.ndarray) else chunk.shape[2]


def quantise(video: torch.Tensor) -> torch.Tensor:
    """float (1,3,T,H,W) in [-1,1] -> uint8 (T,H,W,3) on the video's device; out-of-range values
    are clamped."""
    if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[:2] != (1, 3):
        raise ValueError(f"video must be a (1,3,T,H,W) tensor, got {tuple(getattr(video, 'shape', ()))}")
    x = ((video[0].detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous()


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """float (1,3,T,H,W) in [-1,1] -> uint8 (T,H,W,3) on the host, quantised on the video's
    device (a quarter of the float bytes cross back)."""
    return quantise(video).cpu().numpy()


def check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        desc = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise ValueError(f"frames must be a uint8 (T,H,W,3) array, got {desc}")
    if 0 in frames.shape:
        raise ValueError(f"frames have an empty dimension: {frames.shape}")


# Fragmented mp4 (an empty moov up front, then self-contained fragments) needs no seek
# back to write the index, so it can go to a pipe or an HTTP response as it is made.
_FRAGMENTED = "empty_moov+default_base_moof"
_FRAGMENT_US = 1_000_000  # one fragment per second of video: bounded muxer buffering


class VideoWriter:
    """Incremental h264/yuv420p mp4 writer of uint8 RGB frames of one fixed size.

    `target` is a path or a writable binary object (anything with `write(bytes)`).
    `fragmented` writes a fragmented mp4 that needs no seeking, for targets that are
    streams; players and PyAV read both kinds. `crf` is x264's quality: 0 (lossless
    luma) .. 51 (worst), 18 is visually lossless."""

    def __init__(self, target: str | Path | BinaryIO, width: int, height: int, fps: float, crf: int = 18,
                 fragmented: bool = False) -> None:
        if not 0 < fps <= MAX_FPS:
            raise ValueError(f"fps must be in (0, {MAX_FPS:g}], got {fps}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in 0..51, got {crf}")
        if width < 1 or height < 1:
            raise ValueError(f"frame size must be positive, got {width}x{height}")
        self.width, self.height = width, height
        # use_metadata_tags lets mp4 carry our own key; only odd sizes need it.
        movflags = "use_metadata_tags" + (f"+{_FRAGMENTED}" if fragmented else "")
        options = {"movflags": movflags, **({"frag_duration": str(_FRAGMENT_US)} if fragmented else {})}
        self._container = av.open(target if not isinstance(target, Path) else str(target), "w", format="mp4",
                                  options=options)
        self._container.metadata.update(display_size_tags(width, height))
        self._stream = self._container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        self._stream.width, self._stream.height = width + width % 2, height + height % 2
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(crf)}

    def write(self, frames: np.ndarray) -> None:
        """Append uint8 (T,H,W,3) frames."""
        check_frames(frames)
        if frames.shape[1:3] != (self.height, self.width):
            raise ValueError(f"frames are {frames.shape[2]}x{frames.shape[1]}, "
                             f"the writer is {self.width}x{self.height}")
        even = np.pad(frames, ((0, 0), (0, self.height % 2), (0, self.width % 2), (0, 0)), mode="edge")
        for rgb in even:
            self._container.mux(self._stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))

    def close(self) -> None:
        self._container.mux(self._stream.encode())
        self._container.close()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(path: str | Path, frames: np.ndarray, fps: float, crf: int = 18) -> None:
    """Write uint8 (T,H,W,3) RGB as h264/yuv420p mp4 (see `VideoWriter`)."""
    check_frames(frames)
    with VideoWriter(path, frames.shape[2], frames.shape[1], fps, crf) as writer:
        writer.write(frames)
