"""Chunked processing through the FeatureCache equals whole-clip processing."""

import functools
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import save as st_save

from model import (CacheFormatError, CacheMismatchError, CDTConfig, FeatureCache, StreamingDecoder, StreamingEncoder,
                   build_model, content_hash, from_pretrained)
from tests.tolerance import BF16_TOLERANCE, DECODE_ATOL, assert_float_close

H, W = 32, 48  # 48 is not a multiple of the U-Net's 16x: exercises its odd-size path

pytestmark = pytest.mark.exactness


@functools.cache
def model_hash(model) -> str:
    """The hash that tags the streams of a model built here (its weights never change)."""
    return content_hash(model)


def smooth_video(frames: int, seed: int = 0) -> torch.Tensor:
    """Spatially smooth random motion, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, frames, H // 4, W // 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(frames, H, W), mode="trilinear")


def stream_encode(model, video, sizes):
    enc, outs, i = StreamingEncoder(model, model_hash(model)), [], 0
    for n in sizes:
        outs.append(enc.push(video[:, :, i : i + n]))
        i += n
    assert i == video.shape[2]
    outs.append(enc.finish())
    return torch.cat(outs, dim=2)


def stream_decode(model, latents, sizes, steps, seed):
    dec, outs, i = StreamingDecoder(model, model_hash(model), steps=steps, seed=seed), [], 0
    for n in sizes:
        outs.append(dec.push(latents[:, :, i : i + n]))
        i += n
    assert i == latents.shape[2]
    return torch.cat(outs, dim=2)


@pytest.fixture(scope="module")
def clip():
    return smooth_video(33)


@pytest.fixture(scope="module")
def latents(tiny_model, clip):
    return tiny_model.encode(clip)


class StreamingContract:
    """What every tokenizer kind's streams must do, run once per kind (in the manner of
    diffusers' model tester mixins): a subclass provides the `model` fixture and the DDIM
    steps its decode is checked at."""

    steps: tuple[int, ...] = (1,)

    @pytest.fixture(scope="class")
    @staticmethod
    def model():
        raise NotImplementedError

    @pytest.fixture(scope="class")
    @staticmethod
    def latents(model, clip):
        return model.encode(clip)

    @pytest.fixture(scope="class")
    @classmethod
    def whole_decodes(cls, model, latents):
        return {steps: model.decode(latents, steps=steps, seed=7) for steps in cls.steps}

    @pytest.mark.parametrize("sizes", [[1] + [4] * 8, [1, 8, 24], [3, 5, 7, 2, 16]],
                             ids=["1+4+4", "1+8+24", "uneven"])
    def test_streaming_encode_equals_whole_clip(self, model, clip, latents, sizes):
        streamed = stream_encode(model, clip, sizes)
        assert streamed.shape == latents.shape == (1, 16, 9, H // 8, W // 8)
        assert_float_close(streamed, latents)

    @pytest.mark.parametrize("sizes", [[1] * 9, [2, 3, 4]], ids=["ones", "2-3-4"])
    def test_streaming_decode_equals_whole_clip(self, model, latents, whole_decodes, sizes):
        for steps, whole in whole_decodes.items():
            streamed = stream_decode(model, latents, sizes, steps=steps, seed=7)
            assert streamed.shape == whole.shape == (1, 3, 33, H, W)
            assert_float_close(streamed, whole, DECODE_ATOL)

    def test_an_exported_state_continues_the_stream(self, model, clip, latents, whole_decodes):
        enc = StreamingEncoder(model, model_hash(model))
        head = enc.push(clip[:, :, :7])
        enc = StreamingEncoder.from_state(model, model_hash(model), enc.export_state())
        streamed = torch.cat([head, enc.push(clip[:, :, 7:]), enc.finish()], dim=2)
        assert_float_close(streamed, latents)
        steps = max(self.steps)
        dec = StreamingDecoder(model, model_hash(model), steps=steps, seed=7)
        head = dec.push(latents[:, :, :4])
        dec = StreamingDecoder.from_state(model, model_hash(model), dec.export_state())
        streamed = torch.cat([head, dec.push(latents[:, :, 4:])], dim=2)
        assert_float_close(streamed, whole_decodes[steps], DECODE_ATOL)


class TestCDTStreaming(StreamingContract):
    steps = (1, 3)

    @pytest.fixture(scope="class")
    @staticmethod
    def model(tiny_model):
        return tiny_model


class TestVAEStreaming(StreamingContract):
    @pytest.fixture(scope="class")
    @staticmethod
    def model():
        torch.manual_seed(0)
        return build_model(CDTConfig.from_preset("tiny"), "vae").eval()

    def test_decode_steps_are_ignored(self, model, latents, whole_decodes):
        # The VAE's decoder has no steps: both calls run the same operations, equal by construction.
        assert torch.equal(model.decode(latents, steps=3, seed=5), whole_decodes[1])
        assert StreamingDecoder(model, model_hash(model), steps=3).meta["steps"] == 1


def test_streaming_encode_pads_the_tail_like_a_whole_padded_clip(tiny_model, clip):
    from model import pad_frames

    video = clip[:, :, :11]  # 1 + 4 + 4 + 2: finish() tops up the last 2 frames
    whole = tiny_model.encode(pad_frames(video))
    assert_float_close(stream_encode(tiny_model, video, [6, 5]), whole)


def test_bf16_channels_last_streams_like_the_whole_clip(tiny_checkpoint, clip):
    """bf16 computes in channels-last weights; cached activations are exported contiguous
    and cut back in: streaming with a state round trip must still equal one whole pass, up to
    bf16 rounding. 5 frames of 16x48: without AVX512-BF16 or AMX, bf16 convolutions are scalar."""
    model, identity = from_pretrained(tiny_checkpoint, dtype="bf16")
    assert model.encoder.stem.conv.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    clip = clip[:, :, :5, :16]
    with torch.inference_mode():
        whole = model.encode(clip)
        enc = StreamingEncoder(model, identity.content_hash)
        first = enc.push(clip[:, :, :1])
        enc = StreamingEncoder.from_state(model, identity.content_hash, enc.export_state())
        streamed = torch.cat([first, enc.push(clip[:, :, 1:3]), enc.push(clip[:, :, 3:]), enc.finish()], dim=2)
        torch.testing.assert_close(streamed, whole, **BF16_TOLERANCE)
        frames = model.decode(whole, steps=2, seed=3)
        dec = StreamingDecoder(model, identity.content_hash, steps=2, seed=3)
        head = dec.push(whole[:, :, :1])
        dec = StreamingDecoder.from_state(model, identity.content_hash, dec.export_state())
        torch.testing.assert_close(torch.cat([head, dec.push(whole[:, :, 1:])], dim=2), frames, **BF16_TOLERANCE)


def test_resumed_encoder_continues_the_frame_indexing(tiny_model, clip):
    enc = StreamingEncoder.resume(tiny_model, model_hash(tiny_model), 9)
    assert enc.cache.started and len(enc.cache) == 0
    assert (enc.meta["frames_in"], enc.meta["frames_encoded"], enc.meta["latents_out"]) == (9, 9, 3)
    assert enc.push(clip[:, :, :6]).shape[2] == 1  # 4-frame groups from the first push
    assert enc.finish().shape[2] == 1
    assert (enc.meta["frames_in"], enc.meta["latents_out"]) == (15, 5)
    for bad in (0, 4, 6):
        with pytest.raises(ValueError, match="group boundary"):
            StreamingEncoder.resume(tiny_model, model_hash(tiny_model), bad)
    with pytest.raises(ValueError, match="no frames"):
        StreamingEncoder.resume(tiny_model, model_hash(tiny_model), 5).finish()


def test_resumed_decoder_continues_the_frame_indexing(tiny_model, latents):
    dec = StreamingDecoder.resume(tiny_model, model_hash(tiny_model), steps=2, seed=7, latents_done=3)
    assert dec.cache.started and (dec.meta["latents_in"], dec.meta["frames_out"]) == (3, 9)
    assert dec.push(latents[:, :, 3:5]).shape[2] == 8  # no first frame is dropped
    assert (dec.meta["latents_in"], dec.meta["frames_out"]) == (5, 17)
    with pytest.raises(ValueError, match="latents_done"):
        StreamingDecoder.resume(tiny_model, model_hash(tiny_model), steps=1, seed=0, latents_done=0)


def test_started_flag_travels_with_the_state(tiny_model, clip, latents):
    enc = StreamingEncoder(tiny_model, model_hash(tiny_model))
    assert not enc.cache.started
    enc.push(clip[:, :, :3])  # only frame 0 is encoded; 2 stay pending
    assert StreamingEncoder.from_state(tiny_model, model_hash(tiny_model), enc.export_state()).cache.started
    dec = StreamingDecoder.resume(tiny_model, model_hash(tiny_model), steps=1, seed=0, latents_done=2)
    assert StreamingDecoder.from_state(tiny_model, model_hash(tiny_model), dec.export_state()).cache.started
    fresh = StreamingDecoder(tiny_model, model_hash(tiny_model)).export_state()
    assert not StreamingDecoder.from_state(tiny_model, model_hash(tiny_model), fresh).cache.started


def test_a_state_of_another_cache_format_version_is_refused(tiny_model):
    state = FeatureCache.from_bytes(StreamingEncoder(tiny_model, model_hash(tiny_model)).export_state())
    header = {"format": "cdt-feature-cache", "version": 1, "meta": state.meta}
    old = st_save({}, metadata={"cdt_cache": json.dumps(header)})
    with pytest.raises(CacheFormatError, match="version 1"):
        StreamingEncoder.from_state(tiny_model, model_hash(tiny_model), old)


def test_state_size_stays_constant(tiny_model, clip):
    enc = StreamingEncoder(tiny_model, model_hash(tiny_model))
    enc.push(clip[:, :, :1])
    sizes = []
    for start in range(1, 17, 4):
        enc.push(clip[:, :, start : start + 4])
        sizes.append(enc.cache.nbytes())
    assert len(set(sizes)) == 1 and 0 < sizes[0] < len(enc.export_state())


def test_multistep_decoding_keeps_one_cache_per_step(tiny_model, latents):
    one = StreamingDecoder(tiny_model, model_hash(tiny_model), steps=1)
    three = StreamingDecoder(tiny_model, model_hash(tiny_model), steps=3)
    one.push(latents[:, :, :2])
    three.push(latents[:, :, :2])
    steps_in = lambda dec: {k.split("/")[0] for k in dec.cache if k.startswith("step")}  # noqa: E731
    assert steps_in(one) == {"step0"}
    assert steps_in(three) == {"step0", "step1", "step2"}


def test_cache_metadata_and_mismatch(tiny_model, clip):
    enc = StreamingEncoder(tiny_model, model_hash(tiny_model))
    enc.push(clip[:, :, :5])
    cache = FeatureCache.from_bytes(enc.export_state())
    meta = cache.meta
    assert meta["model_hash"] == content_hash(tiny_model)
    assert meta["dtype"] == "fp32" and meta["kind"] == "encode" and meta["steps"] == 0
    assert meta["shape"] == [1, H, W] and meta["frames_in"] == 5 and meta["latents_out"] == 2
    dec = StreamingDecoder(tiny_model, model_hash(tiny_model), steps=2, seed=1)
    with pytest.raises(CacheMismatchError, match="kind"):
        StreamingDecoder.from_state(tiny_model, model_hash(tiny_model), enc.export_state())
    forged = FeatureCache.from_bytes(dec.export_state())
    forged.meta["model_hash"] = "0" * 64
    with pytest.raises(CacheMismatchError, match="model_hash"):
        StreamingDecoder.from_state(tiny_model, model_hash(tiny_model), forged.to_bytes())


def test_chunk_shape_must_match_the_stream(tiny_model, clip):
    enc = StreamingEncoder(tiny_model, model_hash(tiny_model))
    enc.push(clip[:, :, :1])
    with pytest.raises(ValueError, match="stream started with"):
        enc.push(torch.zeros(1, 3, 4, H, 2 * W))


def test_whole_clip_shape_errors(tiny_model):
    for bad, message in [
        (torch.zeros(3, 5, 16, 16), "5-D"),
        (torch.zeros(1, 4, 5, 16, 16), "3 channels"),
        (torch.zeros(1, 3, 6, 16, 16), "1\\+4k"),
        (torch.zeros(1, 3, 5, 12, 16), "multiples of 8"),
        (torch.zeros(1, 3, 5, 16, 16, dtype=torch.uint8), "float"),
    ]:
        with pytest.raises(ValueError, match=message):
            tiny_model.encode(bad)
    with pytest.raises(ValueError, match="16 channels"):
        tiny_model.decode(torch.zeros(1, 8, 2, 2, 2))
    with pytest.raises(ValueError, match="steps"):
        tiny_model.decode(torch.zeros(1, 16, 2, 2, 2), steps=0)


def test_single_image_is_a_one_frame_video(tiny_model, clip):
    image = clip[:, :, :1]
    latents = tiny_model.encode(image)
    assert latents.shape == (1, 16, 1, H // 8, W // 8)
    assert tiny_model.decode(latents).shape == image.shape


CONTINUE = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import load_file, save_file
    from model import StreamingDecoder, StreamingEncoder, from_pretrained
    ckpt, state, inputs, out = sys.argv[1:5]
    model, identity = from_pretrained(ckpt)
    data = load_file(inputs)
    cls = StreamingEncoder if data["kind"].item() == 0 else StreamingDecoder
    stream = cls.from_state(model, identity.content_hash, open(state, "rb").read())
    outs = [stream.push(data["rest"])]
    if cls is StreamingEncoder:
        outs.append(stream.finish())
    save_file({"out": torch.cat(outs, 2).contiguous()}, out)
    """
)


def assert_state_continues_in_a_new_process(checkpoint, tmp_path, kind: str, frames: int, cuts: list[int]) -> None:
    """A stream of `checkpoint` fed the first chunks `cuts` of a clip of `frames` frames (its
    latents for "decode"), its state exported, continued in another process, equals the
    uninterrupted stream."""
    model, identity = from_pretrained(checkpoint)
    tag = identity.content_hash
    if kind == "encode":
        data = smooth_video(frames, seed=3)
        stream = StreamingEncoder(model, tag)
    else:
        data = model.encode(smooth_video(frames, seed=3))
        stream = StreamingDecoder(model, tag, steps=3, seed=9)
    head = torch.cat([stream.push(data[:, :, : cuts[0]]), stream.push(data[:, :, cuts[0] : sum(cuts)])], dim=2)
    (tmp_path / "state.bin").write_bytes(stream.export_state())
    rest = data[:, :, sum(cuts) :]
    save_file({"rest": rest.contiguous(), "kind": torch.tensor(0 if kind == "encode" else 1)},
              str(tmp_path / "in.safetensors"))
    subprocess.run([sys.executable, "-c", CONTINUE, str(checkpoint), str(tmp_path / "state.bin"),
                    str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")], check=True)
    resumed = torch.cat([head, load_file(str(tmp_path / "out.safetensors"))["out"]], dim=2)
    # Uninterrupted reference, in this process.
    ref = StreamingEncoder(model, tag) if kind == "encode" else StreamingDecoder(model, tag, steps=3, seed=9)
    outs = [ref.push(data[:, :, : cuts[0]]), ref.push(data[:, :, cuts[0] : sum(cuts)]), ref.push(rest)]
    if kind == "encode":
        outs.append(ref.finish())
    # The same chunk boundaries and thread count in both processes: equal by construction.
    assert torch.equal(resumed, torch.cat(outs, dim=2))


@pytest.mark.parametrize("kind", ["encode", "decode"])
def test_cache_state_continues_in_a_new_process(tiny_checkpoint, tmp_path, kind):
    assert_state_continues_in_a_new_process(tiny_checkpoint, tmp_path, kind, 17, [1, 4] if kind == "encode" else [1, 2])
