"""Temporal levels grown on the 4x model (8x, 16x): configs record their levels, a grown
model starts from the model below, trains only its top level when frozen, streams exactly
as the whole clip (any chunk lengths, its state moved across processes), and enforces its
frames rule."""

import json

import pytest
import torch

from model import (CDTConfig, Level, StreamingDecoder, StreamingEncoder, build_model, content_hash, freeze_below,
                   from_pretrained, load_below, save_pretrained, top_level)
from model.checkpoint import read_header
from tests.conftest import REPO
from tests.test_model_streaming import (H, W, assert_state_continues_in_a_new_process, smooth_video,
                                       stream_decode, stream_encode)
from tests.tolerance import DECODE_ATOL, assert_float_close

LEVEL = Level(96, 1)  # the tiny preset's encoder width: the head below fits the level's features
FRAMES = 33  # 1+8*4 and 1+16*2


def grown(below, seed: int = 1):
    """A model one level above `below`, started from its weights (its top level random)."""
    torch.manual_seed(seed)
    model = build_model(below.config.grown(LEVEL), below.kind)
    load_below(model, below.state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def models(tiny_model):
    """The 8x model grown on the tiny 4x model, and the 16x grown on that."""
    t8 = grown(tiny_model)
    return {8: t8, 16: grown(t8, seed=2)}


@pytest.fixture(scope="module")
def clip():
    return smooth_video(FRAMES, seed=4)


def test_configs_record_their_levels_and_time_factor(models, tiny_model):
    assert tiny_model.config.time_factor == 4
    for factor, model in models.items():
        config = model.config
        assert config.time_factor == factor and len(config.levels) == {8: 1, 16: 2}[factor]
        assert CDTConfig.from_json(config.to_json()) == config
        assert json.loads(config.to_json())["levels"] == [{"width": 96, "blocks": 1}] * len(config.levels)
    assert models[16].config.below() == models[8].config and models[8].config.below() == tiny_model.config


def test_the_4x_checkpoint_loads_unchanged():
    """Its config.json has no levels, and its weights still hash to its model.sha256 (the
    loader checks that)."""
    checkpoint = REPO / "checkpoints" / "cdt-tiny"
    assert "levels" not in read_header(checkpoint)["config"]
    model, identity = from_pretrained(checkpoint)
    assert model.config.time_factor == 4
    assert identity.content_hash == (checkpoint / "model.sha256").read_text().strip()


def test_a_grown_model_starts_from_the_model_below(models, tiny_model):
    t8, t16 = models[8], models[16]
    below = tiny_model.state_dict()
    own = t8.state_dict()
    for name, value in below.items():
        assert torch.equal(own[name], value), name
    new = [name for name in own if name not in below]
    assert new and all(name.startswith(("encoder.levels.0.", "adapter.time_up.0.")) for name in new)
    assert top_level(t16) == ("encoder.levels.1.", "adapter.time_up.1.", "encoder.head.")
    for name, value in t8.state_dict().items():  # the 8x level keeps its names in the 16x model
        assert torch.equal(t16.state_dict()[name], value), name


def test_weights_of_another_model_are_refused(models):
    other = build_model(CDTConfig.from_preset("tiny", time_pad="replicate").grown(LEVEL)).state_dict()
    del other["unet.out_conv.conv.weight"]
    with pytest.raises(ValueError, match="not the model this one was grown from"):
        load_below(build_model(models[8].config.grown(LEVEL)), other)


def test_freezing_trains_the_top_level_alone(models, clip):
    model = build_model(models[8].config)
    model.load_state_dict(models[8].state_dict())
    trainable = freeze_below(model)
    assert trainable and all(name.startswith(top_level(model)) for name in trainable)
    post = model.posterior(clip[:, :, :17])
    gen = torch.Generator().manual_seed(0)
    example = model.training_example(clip[:, :, :17], post.sample(gen), gen, terminal_fraction=0.5,
                                     snr_min=1.0, snr_max=5.0)
    (example.prediction - example.target).pow(2).mean().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (name in trainable), name
    # The mix starts with zero weight on the downsampled features (TimeLevel), so the
    # downsample's gradient is zero at the first step and its weight in the mix is not.
    silent = [name for name in trainable if not model.get_parameter(name).grad.any()]
    assert silent == ["encoder.levels.0.down.conv.weight", "encoder.levels.0.down.conv.bias"]
    assert model.encoder.levels[0].mix.weight.grad[:, 96:].any()


@pytest.mark.parametrize("factor", [8, 16])
def test_the_frames_rule_is_enforced(models, factor):
    model = models[factor]
    with pytest.raises(ValueError, match=rf"frame count must be 1\+{factor}k \(1, {1 + factor}, {1 + 2 * factor}"):
        model.encode(smooth_video(1 + factor // 2))
    assert model.encode(smooth_video(1 + factor)).shape[2] == 2
    assert model.decode(torch.zeros(1, 16, 3, H // 8, W // 8)).shape[2] == 1 + 2 * factor


ENCODE_CHUNKS = {8: [[1] + [8] * 4, [1, 16, 16], [3, 5, 7, 2, 16], [13, 20]],
                 16: [[1, 16, 16], [3, 5, 7, 2, 16], [20, 13]]}


@pytest.mark.exactness
@pytest.mark.parametrize("factor,sizes", [(f, s) for f, chunks in ENCODE_CHUNKS.items() for s in chunks])
def test_streaming_encode_equals_whole_clip(models, clip, factor, sizes):
    model = models[factor]
    whole = model.encode(clip)
    assert whole.shape == (1, 16, 1 + 32 // factor, H // 8, W // 8)
    assert_float_close(stream_encode(model, clip, sizes), whole)


@pytest.mark.exactness
@pytest.mark.parametrize("factor", [8, 16])
@pytest.mark.parametrize("steps", [1, 3])
def test_streaming_decode_equals_whole_clip(models, clip, factor, steps):
    model = models[factor]
    latents = model.encode(clip)
    whole = model.decode(latents, steps=steps, seed=7)
    assert whole.shape == (1, 3, FRAMES, H, W)
    n = latents.shape[2]
    for sizes in ([1] * n, [2, n - 2]):
        assert_float_close(stream_decode(model, latents, sizes, steps=steps, seed=7), whole, DECODE_ATOL)


@pytest.mark.exactness
def test_an_exported_state_continues_the_stream(models, clip):
    model = models[8]
    tag = content_hash(model)
    latents = model.encode(clip)
    enc = StreamingEncoder(model, tag)
    head = enc.push(clip[:, :, :11])  # 2 frames pending in the state
    enc = StreamingEncoder.from_state(model, tag, enc.export_state())
    assert_float_close(torch.cat([head, enc.push(clip[:, :, 11:]), enc.finish()], dim=2), latents)
    whole = model.decode(latents, steps=3, seed=7)
    dec = StreamingDecoder(model, tag, steps=3, seed=7)
    head = dec.push(latents[:, :, :2])
    dec = StreamingDecoder.from_state(model, tag, dec.export_state())
    assert_float_close(torch.cat([head, dec.push(latents[:, :, 2:])], dim=2), whole, DECODE_ATOL)


@pytest.fixture(scope="module")
def t8_checkpoint(models, tmp_path_factory, tiny_field):
    """The 8x model saved; its receptive field is measured by `test_receptive_field`, so
    the record here is a stand-in."""
    directory = tmp_path_factory.mktemp("t8") / "t8"
    save_pretrained(models[8], directory, receptive_field=tiny_field)
    return directory


def test_a_grown_checkpoint_loads_with_its_levels(t8_checkpoint, models):
    model, identity = from_pretrained(t8_checkpoint)
    assert model.config == models[8].config and model.config.time_factor == 8
    assert identity.content_hash == content_hash(models[8])


@pytest.mark.exactness
@pytest.mark.parametrize("kind", ["encode", "decode"])
def test_the_state_continues_in_a_new_process(t8_checkpoint, tmp_path, kind):
    cuts = [1, 12] if kind == "encode" else [1, 2]  # the encoder's second chunk leaves 4 frames pending
    assert_state_continues_in_a_new_process(t8_checkpoint, tmp_path, kind, FRAMES, cuts)


@pytest.mark.exactness
def test_a_resumed_stream_equals_the_uninterrupted_one_past_its_receptive_field(models):
    """`StreamingEncoder.resume` on an 8-frame group boundary, fed the last receptive
    field's worth of frames, reaches the uninterrupted stream's state."""
    from model.streaming import measure_receptive_field

    model = models[8]
    tag = content_hash(model)
    field = measure_receptive_field(model, "encode", size=(8, 8))
    assert field % 8 == 0 and field > 0
    video = torch.rand(1, 3, 1 + field + 16, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    full = StreamingEncoder(model, tag)
    full.push(video[:, :, :1])
    full.push(video[:, :, 1 : 1 + field])
    resumed = StreamingEncoder.resume(model, tag, 1)
    resumed.push(video[:, :, 1 : 1 + field])
    assert resumed.cache.equals(full.cache)
    assert torch.equal(resumed.push(video[:, :, 1 + field :]), full.push(video[:, :, 1 + field :]))


def test_cdt_info_shows_the_compression_and_frames_rule(t8_checkpoint, capsys):
    from cli.main import main

    assert main(["info", "--checkpoint", str(t8_checkpoint), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["levels"] == 1 and report["compression"]["txhxw"] == "8x8x8"
    assert report["frames_rule"] == "1+8k (1, 9, 17, ...)"
    assert main(["info", "--preset", "tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["compression"]["txhxw"], report["frames_rule"]) == ("4x8x8", "1+4k (1, 5, 9, ...)")
