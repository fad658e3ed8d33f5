"""media/: PyAV reading and writing on real clips, padding, latents and frames files,
clip-level encode/decode equivalence, metrics against hand-computed references, LPIPS."""

from __future__ import annotations

import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cdt_client.formats.video import DISPLAY_SIZE_TAG
from media import (
    LatentsFile,
    LatentsFileError,
    ModelMismatchError,
    Padding,
    VideoDecodeError,
    VideoReader,
    decode_video,
    encode_frames,
    frames_to_tensor,
    load_frames,
    load_latents,
    pad_spatial,
    pad_video,
    psnr,
    read_video,
    save_frames,
    save_latents,
    ssim,
    tensor_to_frames,
    write_video,
)
from media.frames_file import FramesFileError
from media.latents_file import latents_from_bytes, latents_to_bytes
from media.lpips import LPIPS_SKIPPED, load_lpips
from media.metrics import PSNR_CAP
from media.video import resize_short_side
from model import content_hash, from_pretrained
from tests.tolerance import DECODE_ATOL, assert_float_close


def encode_raw(path: Path, frames: np.ndarray, rate, pix_fmt: str = "yuv444p", pts: list[int] | None = None,
               rotation: int = 0, time_base: Fraction | None = None, tags: dict[str, str] | None = None) -> Path:
    """Write frames with PyAV directly (not media.write_video): an independent fixture
    encoder. yuv444p allows odd sizes; `pts` (in `time_base`) makes variable frame rate;
    `tags` is container metadata."""
    with av.open(str(path), "w", options={"movflags": "use_metadata_tags"} if tags else {}) as out:
        out.metadata.update(tags or {})
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.options = {"crf": "0"}
        if time_base is not None:
            stream.codec_context.time_base = time_base
        if rotation:
            stream.set_display_rotation(rotation)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], time_base
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def cut_clip(shared_videos: Path, path: Path, name: str = "cotracker__cat.mp4", frames: int = 6,
             height: int = 27, width: int = 21) -> Path:
    """A real clip cut from the shared set: first `frames` frames, resized and cropped
    to an (odd by default) size, stored as lossless-ish h264 yuv444p mp4 at the source rate."""
    clip = read_video(shared_videos / name, num_frames=frames, size=max(height, width), crop=(height, width))
    return encode_raw(path, clip.frames, Fraction(clip.fps).limit_denominator(1001))


def level_frames(levels: list[int], size: int = 32) -> np.ndarray:
    """Frames of uniform grey, one level each: decodable back to their index."""
    return np.stack([np.full((size, size, 3), v, np.uint8) for v in levels])


def manifest(shared_videos: Path) -> dict[str, dict[str, str]]:
    lines = (shared_videos / "MANIFEST.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return {row["file"]: row for row in (dict(zip(header, line.split("\t"))) for line in lines[1:])}


# --- reading -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cotracker__cat.mp4", "mmaction2__test.avi", "moviepy__big_buck_bunny_0_30.webm"])
def test_read_video_decodes_h264_mpeg4_vp8_to_rgb(shared_videos, name):
    row = manifest(shared_videos)[name]
    clip = read_video(shared_videos / name, start=40, num_frames=5, threads=2)  # past any fade-in
    assert clip.frames.dtype == np.uint8
    assert clip.frames.shape == (5, int(row["height"]), int(row["width"]), 3)
    assert (clip.source_width, clip.source_height) == (int(row["width"]), int(row["height"]))
    assert clip.fps == pytest.approx(float(row["fps"]), rel=1e-3)
    assert clip.frames.std() > 5  # real picture content, not a blank decode


def test_resize_short_side_crop_start_and_stride(shared_videos):
    path = shared_videos / "cotracker__cat.mp4"  # 368x480 portrait, 20 fps
    clip = read_video(path, num_frames=8, size=46)
    assert clip.frames.shape == (8, 60, 46, 3)
    assert read_video(path, num_frames=2, size=46, crop=40).frames.shape == (2, 40, 40, 3)
    assert read_video(path, num_frames=2, size=46, crop=(30, 20)).frames.shape == (2, 30, 20, 3)
    strided = read_video(path, num_frames=3, stride=2, start=1, size=46)
    assert strided.fps == pytest.approx(10.0)
    np.testing.assert_array_equal(strided.frames, clip.frames[2:8:2])
    assert read_video(path, num_frames=4, start=4, size=46).frames.shape[0] == 4
    np.testing.assert_array_equal(read_video(path, num_frames=4, start=4, size=46).frames, clip.frames[4:8])


def test_fps_resampling_of_a_constant_rate_clip_matches_stride(shared_videos):
    path = shared_videos / "cotracker__cat.mp4"  # 20 fps
    half = read_video(path, num_frames=4, fps=10, size=32)
    assert half.fps == 10
    np.testing.assert_array_equal(half.frames, read_video(path, num_frames=4, stride=2, size=32).frames)
    double = read_video(path, num_frames=6, fps=40, size=32)
    np.testing.assert_array_equal(double.frames[::2], double.frames[1::2])


def test_variable_frame_rate_resamples_by_timestamp(tmp_path):
    # Frame i (grey level 20*i) starts at the listed millisecond.
    starts_ms = [0, 100, 150, 400, 450, 500]
    path = encode_raw(tmp_path / "vfr.mp4", level_frames([20 * i for i in range(6)]), rate=10,
                      pts=starts_ms, time_base=Fraction(1, 1000))
    clip = read_video(path, fps=10)
    # At 0,100,...,500 ms the latest frame that has started: 0, 1, 2 (150), 2, 3 (400), 5 (500).
    shown = [int(round(f.mean() / 20)) for f in clip.frames]
    assert shown[:6] == [0, 1, 2, 2, 3, 5]
    assert clip.fps == 10
    plain = read_video(path)
    assert [int(round(f.mean() / 20)) for f in plain.frames] == [0, 1, 2, 3, 4, 5]


def test_rotation_metadata_is_applied(tmp_path):
    frames = np.zeros((2, 32, 48, 3), np.uint8)
    frames[:, :8, :8] = 255  # white marker in the top-left corner
    path = encode_raw(tmp_path / "rot.mp4", frames, rate=10, pix_fmt="yuv420p", rotation=90)
    clip = read_video(path)
    # 90 degrees counter-clockwise: portrait, the marker moves to the bottom-left.
    assert clip.frames.shape == (2, 48, 32, 3)
    assert (clip.source_width, clip.source_height) == (32, 48)
    grey = clip.frames[0].mean(axis=-1)
    assert grey[-8:, :8].mean() > 200 and grey[:8, :8].mean() < 50


def test_reading_stops_once_enough_frames_are_decoded(shared_videos):
    path = shared_videos / "mmaction2__test.mp4"  # 300 frames
    # CPU time of this process (decoder threads included): other jobs on the machine do not count.
    t0 = time.process_time()
    read_video(path, num_frames=5)
    partial = time.process_time() - t0
    t0 = time.process_time()
    whole = read_video(path)
    full = time.process_time() - t0
    assert len(whole.frames) == 300
    assert partial < full / 4


def test_reader_chunks_stream_the_clip(shared_videos):
    path = shared_videos / "moviepy__example3.mp4"  # 48 frames
    with VideoReader(path, size=24) as reader:
        chunks = [c.shape[0] for c in reader.chunks(20)]
    assert chunks == [20, 20, 8]


def test_antialiased_resize_does_not_alias_a_fine_checkerboard():
    checker = ((np.indices((64, 64)).sum(axis=0) % 2) * 255).astype(np.uint8)
    frames = np.repeat(checker[None, :, :, None], 3, axis=3)
    small = resize_short_side(frames, 16)
    assert small.shape == (1, 16, 16, 3)
    # Interior pixels average the pattern to mid grey (aliasing would keep 0/255).
    assert np.abs(small[0, 2:-2, 2:-2].astype(int) - 127).max() <= 3


def test_read_errors_are_video_decode_errors(tmp_path, shared_videos):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n")
    data = (shared_videos / "cotracker__cat.mp4").read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 3])
    for path, message in [(tmp_path / "missing.mp4", "no such file"), (text, "not a decodable video"),
                          (truncated, "not a decodable video")]:
        with pytest.raises(VideoDecodeError, match=message):
            read_video(path)
    with pytest.raises(VideoDecodeError, match="no frames at start=500"):
        read_video(shared_videos / "moviepy__example3.mp4", start=500)
    with pytest.raises(ValueError, match="larger than"):
        read_video(shared_videos / "moviepy__example3.mp4", num_frames=1, size=16, crop=32)


def test_a_display_size_tag_crops_when_it_fits_in_the_frame_and_must_parse(tmp_path):
    frames = np.random.default_rng(3).integers(0, 256, (2, 20, 16, 3), dtype=np.uint8)
    for tag, shape in [("15x19", (2, 19, 15, 3)), ("17x19", (2, 20, 16, 3))]:  # 17 > 16: the tag is ignored
        path = encode_raw(tmp_path / f"{tag}.mp4", frames, 10, tags={DISPLAY_SIZE_TAG: tag})
        assert read_video(path).frames.shape == shape
    path = encode_raw(tmp_path / "bad.mp4", frames, 10, tags={DISPLAY_SIZE_TAG: "15 by 19"})
    with pytest.raises(VideoDecodeError, match="bad cdt_display_size tag '15 by 19'"):
        read_video(path)


# --- writing -----------------------------------------------------------------------------

def test_write_video_is_h264_yuv420p_and_round_trips_odd_sizes(tmp_path, shared_videos):
    frames = read_video(shared_videos / "cotracker__cat.mp4", num_frames=5, size=27, crop=(27, 21)).frames
    path = tmp_path / "odd.mp4"
    write_video(path, frames, fps=29.97, crf=0)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.codec_context.width, stream.codec_context.height) == (22, 28)  # even for 4:2:0
        assert container.metadata[DISPLAY_SIZE_TAG] == "21x27"
    clip = read_video(path)
    assert clip.frames.shape == frames.shape
    assert clip.fps == pytest.approx(29.97)
    assert np.abs(clip.frames.astype(int) - frames).mean() < 3  # only 4:2:0 chroma loss at crf 0


def test_crf_controls_quality(tmp_path, shared_videos):
    frames = read_video(shared_videos / "cotracker__bear.mp4", num_frames=4, size=64).frames
    errors = []
    for crf in (0, 40):
        write_video(tmp_path / f"q{crf}.mp4", frames, fps=30, crf=crf)
        errors.append(np.abs(read_video(tmp_path / f"q{crf}.mp4").frames.astype(int) - frames).mean())
    assert errors[0] < errors[1]


def test_frames_tensor_conversion_round_trips_and_clamps():
    frames = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    video = frames_to_tensor(frames)
    assert video.shape == (1, 3, 3, 5, 7) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    np.testing.assert_array_equal(tensor_to_frames(video), frames)
    np.testing.assert_array_equal(tensor_to_frames(torch.full((1, 3, 1, 2, 2), 3.0)), 255)
    with pytest.raises(ValueError, match="uint8"):
        frames_to_tensor(frames.astype(np.float32))


# --- padding -----------------------------------------------------------------------------

def test_padding_to_the_model_grid_and_back():
    assert Padding.for_shape(10, 27, 21, 4) == Padding(frames=3, height=5, width=3)
    assert Padding.for_shape(9, 16, 8, 4) == Padding(0, 0, 0)
    # A model of 8 frames per latent frame: 1+8k frames.
    assert Padding.for_shape(10, 16, 8, 8) == Padding(7, 0, 0) and Padding.for_shape(17, 16, 8, 8).frames == 0
    video = frames_to_tensor(np.random.default_rng(1).integers(0, 256, (10, 27, 21, 3), dtype=np.uint8))
    assert pad_video(video, 8)[0].shape[2] == 17
    padded, padding = pad_video(video, 4)
    assert padded.shape == (1, 3, 13, 32, 24) and padding == Padding(3, 5, 3)
    torch.testing.assert_close(padded[:, :, :10, :27, :21], video, rtol=0, atol=0)
    # Replicate: padded rows/columns copy the edge; padded frames repeat the last frame.
    torch.testing.assert_close(padded[:, :, :10, 27:, :21], video[:, :, :, -1:].expand(-1, -1, -1, 5, -1))
    torch.testing.assert_close(padded[:, :, :10, :27, 21:], video[..., -1:].expand(-1, -1, -1, -1, 3))
    torch.testing.assert_close(padded[:, :, 10:], padded[:, :, 9:10].expand(-1, -1, 3, -1, -1))
    assert pad_spatial(torch.zeros(1, 3, 2, 4, 4)).shape == (1, 3, 2, 8, 8)  # smaller than the pad


# --- files -------------------------------------------------------------------------------

def _latents_file(model_hash: str = "a" * 64) -> LatentsFile:
    return LatentsFile(latents=torch.randn(1, 16, 4, 4, 3), model_name="tiny-a", model_hash=model_hash, preset="tiny",
                       model_kind="cdt", time_factor=4, dtype="fp32", frames=10, height=27, width=21, fps=29.97,
                       padding=Padding(3, 5, 3))


def test_latents_file_round_trips_and_checks_the_model(tmp_path):
    item = _latents_file()
    save_latents(tmp_path / "z.safetensors", item)
    back = load_latents(tmp_path / "z.safetensors", model_hash="a" * 64)
    torch.testing.assert_close(back.latents, item.latents, rtol=0, atol=0)
    assert back.fps == 29.97 and back.dtype == "fp32" and back.model_kind == "cdt"
    assert (back.frames, back.height, back.width, back.padding, back.preset) == (10, 27, 21, Padding(3, 5, 3), "tiny")
    assert back.model_name == "tiny-a" and back.time_factor == 4
    with pytest.raises(ModelMismatchError, match=r"made by model tiny-a \(aaaaaaaaaaaa\)"):
        load_latents(tmp_path / "z.safetensors", model_hash="b" * 64)
    assert load_latents(tmp_path / "z.safetensors", model_hash="b" * 64, force=True).model_hash == "a" * 64


def test_latents_file_rejects_bad_files(tmp_path):
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(LatentsFileError, match="not a safetensors file"):
        load_latents(tmp_path / "text.safetensors")
    save_file({"latents": torch.zeros(1, 16, 3, 4, 3)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(LatentsFileError, match="not a cdt-latents file"):
        load_latents(tmp_path / "bare.safetensors")
    wrong = _latents_file()
    wrong.latents = torch.zeros(1, 16, 2, 4, 3)
    with pytest.raises(ValueError, match="do not match the metadata"):
        latents_to_bytes(wrong)
    data = latents_to_bytes(_latents_file()).replace(b'"frames":"10"', b'"frames":"11"')
    with pytest.raises(LatentsFileError, match="does not fit"):
        latents_from_bytes(data)
    # Same-length edits of the metadata, so that the header stays a valid safetensors header.
    for old, new, message in [(b'"format_version":"2"', b'"format_version":"3"', "unsupported format version '3'"),
                              (b'"time_factor":"4"', b'"time_factor":"8"', "does not fit"),
                              (b'"fps":"29.97"', b'"fps":"2x.97"', "bad metadata .*2x.97"),
                              (b'"pad_width"', b'"pad_wdth_"', "bad metadata \\('pad_width'\\)")]:
        with pytest.raises(LatentsFileError, match=message):
            latents_from_bytes(latents_to_bytes(_latents_file()).replace(old, new))


def test_a_latents_file_of_an_8x_model_has_its_own_frames_rule():
    """10 frames at 8 pixel frames per latent frame: padded to 17, 1+2 latent frames."""
    item = LatentsFile(latents=torch.randn(1, 16, 3, 2, 2), model_name="t8", model_hash="c" * 64, preset="tiny",
                       model_kind="cdt", time_factor=8, dtype="fp32", frames=10, height=16, width=16, fps=30.0,
                       padding=Padding.for_shape(10, 16, 16, 8))
    back = latents_from_bytes(latents_to_bytes(item))
    assert (back.time_factor, back.padding.frames, back.latent_shape) == (8, 7, (1, 16, 3, 2, 2))
    item.latents = torch.randn(1, 16, 4, 2, 2)  # the 4x rule's count: refused
    with pytest.raises(ValueError, match="do not match the metadata"):
        latents_to_bytes(item)


def test_a_version_1_latents_file_reads_as_a_4x_model_without_a_name():
    from safetensors.torch import save

    item = _latents_file()
    meta = {key: value for key, value in item.metadata().items() if key not in ("model_name", "time_factor")}
    back = latents_from_bytes(save({"latents": item.latents}, metadata={**meta, "format_version": "1"}),
                              model_hash="a" * 64)
    assert (back.model_name, back.time_factor, back.padding) == ("", 4, item.padding)


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_frames_files_round_trip(tmp_path, suffix):
    frames = np.random.default_rng(2).integers(0, 256, (4, 9, 7, 3), dtype=np.uint8)
    save_frames(tmp_path / f"f{suffix}", frames, fps=12.5)
    back, fps = load_frames(tmp_path / f"f{suffix}")
    np.testing.assert_array_equal(back, frames)
    assert fps == (12.5 if suffix == ".safetensors" else None)


def test_frames_files_never_unpickle(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FramesFileError, match="not a frames file"):
        load_frames(tmp_path / "objects.npy")
    np.save(tmp_path / "float.npy", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(FramesFileError, match="uint8"):
        load_frames(tmp_path / "float.npy")


# --- clip-level encode / decode -----------------------------------------------------------

@pytest.fixture(scope="module")
def odd_frames(shared_videos) -> np.ndarray:
    """6 real frames (not 1+4k) of odd size 27x21."""
    return read_video(shared_videos / "cotracker__cat.mp4", num_frames=6, size=27, crop=(27, 21)).frames


@pytest.mark.exactness
def test_streamed_encode_equals_whole_clip(tiny_model, odd_frames):
    tag = content_hash(tiny_model)
    whole = encode_frames(tiny_model, tag, [odd_frames], fps=20.0, streamed=False)
    chunks = [odd_frames[i : i + 4] for i in range(0, 6, 4)]
    streamed = encode_frames(tiny_model, tag, chunks, fps=20.0, streamed=True)
    assert whole.latents.shape == (1, 16, 3, 4, 3)
    assert (whole.frames, whole.height, whole.width, whole.padding) == (6, 27, 21, Padding(3, 5, 3))
    assert whole.model_hash == tag and whole.dtype == "fp32"
    assert_float_close(streamed.latents, whole.latents)


@pytest.mark.exactness
def test_streamed_decode_equals_whole_clip_and_crops_back(tiny_model, odd_frames):
    tag = content_hash(tiny_model)
    item = encode_frames(tiny_model, tag, [odd_frames], fps=20.0, streamed=False)
    whole = torch.cat(list(decode_video(tiny_model, tag, item, steps=2, seed=7)), dim=2)
    streamed = torch.cat(list(decode_video(tiny_model, tag, item, steps=2, seed=7, chunk=1)), dim=2)
    assert whole.shape == (1, 3, 6, 27, 21)
    assert_float_close(streamed, whole, DECODE_ATOL)
    other_seed = torch.cat(list(decode_video(tiny_model, tag, item, steps=2, seed=8)), dim=2)
    assert (other_seed - whole).abs().max() > 1e-3


def test_bf16_encode_records_its_dtype(tiny_checkpoint):
    model, identity = from_pretrained(tiny_checkpoint, dtype="bf16")
    frames = np.random.default_rng(3).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    item = encode_frames(model, identity.content_hash, [frames], fps=1.0, streamed=False)
    fp32, fp32_identity = from_pretrained(tiny_checkpoint)
    reference = encode_frames(fp32, fp32_identity.content_hash, [frames], fps=1.0, streamed=False)
    assert item.dtype == "bf16" and item.latents.dtype == torch.float32
    assert item.model_hash == reference.model_hash
    assert (item.latents - reference.latents).abs().max() < 0.1 * reference.latents.abs().max() + 0.05


# --- metrics -----------------------------------------------------------------------------

def test_psnr_matches_hand_computed_values():
    zeros = np.zeros((2, 16, 16, 3), np.uint8)
    assert psnr(zeros, zeros + 51) == pytest.approx(10 * np.log10(1 / 0.2**2))  # 13.979 dB
    half = zeros.copy()
    half[0] = 255  # MSE = 0.5 over the clip
    assert psnr(zeros, half) == pytest.approx(10 * np.log10(2))
    assert psnr(zeros, zeros) == PSNR_CAP


def test_ssim_matches_hand_computed_values():
    a, b = np.full((1, 16, 16, 3), 51, np.uint8), np.full((1, 16, 16, 3), 102, np.uint8)
    c1 = 0.01**2
    # Constant images: no variance, so SSIM is the luminance term alone.
    assert ssim(a, b) == pytest.approx((2 * 0.2 * 0.4 + c1) / (0.2**2 + 0.4**2 + c1))
    assert ssim(a, a) == pytest.approx(1.0)


def test_ssim_matches_a_brute_force_reference():
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (2, 13, 14, 3), dtype=np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-40, 41, x.shape), 0, 255).astype(np.uint8)
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for t in range(2):
        for ch in range(3):
            for i in range(13 - 10):
                for j in range(14 - 10):
                    p = x[t, i : i + 11, j : j + 11, ch] / 255.0
                    q = y[t, i : i + 11, j : j + 11, ch] / 255.0
                    mp, mq = (w * p).sum(), (w * q).sum()
                    vp, vq = (w * p * p).sum() - mp**2, (w * q * q).sum() - mq**2
                    cov = (w * p * q).sum() - mp * mq
                    values.append(((2 * mp * mq + c1) * (2 * cov + c2)) / ((mp**2 + mq**2 + c1) * (vp + vq + c2)))
    assert ssim(x, y) == pytest.approx(np.mean(values), abs=1e-9)
    assert 0 < ssim(x, y) < 1


def test_metrics_reject_mismatched_or_tiny_clips():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(np.zeros((1, 16, 16, 3), np.uint8), np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 8, 8, 3), np.uint8))


# --- LPIPS -------------------------------------------------------------------------------

def test_lpips_is_zero_for_identical_clips_and_grows_with_distortion(alexnet_weights):
    lpips = load_lpips(alexnet_weights)
    assert lpips.description == "LPIPS alex, learned LPIPS v0.1 heads"
    rng = np.random.default_rng(5)
    clip = rng.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    mild = np.clip(clip.astype(int) + rng.integers(-10, 11, clip.shape), 0, 255).astype(np.uint8)
    strong = np.clip(clip.astype(int) + rng.integers(-120, 121, clip.shape), 0, 255).astype(np.uint8)
    assert lpips.score(clip, clip) == pytest.approx(0.0, abs=1e-7)
    assert 0 < lpips.score(clip, mild) < lpips.score(clip, strong)


def test_lpips_rejects_bad_weights(tmp_path):
    assert "skipped" in LPIPS_SKIPPED
    with pytest.raises(ValueError, match="no such LPIPS weights file"):
        load_lpips(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="unreadable LPIPS weights"):
        load_lpips(tmp_path / "junk.pth")
    save_file({"features.0.weight": torch.zeros(8, 3, 3, 3)}, str(tmp_path / "small.safetensors"))
    with pytest.raises(ValueError, match="do not fit the alex backbone"):
        load_lpips(tmp_path / "small.safetensors")
