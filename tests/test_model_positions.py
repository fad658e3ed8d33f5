"""The stream positions of model/streaming/positions.py are where real streams stand: the
counters of streams fed chunk by chunk, and the points where they can resume."""

import pytest
import torch

from model import (StreamingDecoder, StreamingEncoder, content_hash, decode_chunk_latents, group_size, inputs_for,
                   outputs_for, pixel_frames, resume_position, settled_inputs)

SIDE = 8  # the smallest frame: 1x1 latents
CHUNKS = (1, 2, 3, 1, 4, 6, 5, 2)  # inputs per push: every phase of the 4-frame groups


@pytest.fixture(scope="module")
def model_hash(tiny_model):
    return content_hash(tiny_model)


def frames(n: int) -> torch.Tensor:
    return torch.rand(1, 3, n, SIDE, SIDE, generator=torch.Generator().manual_seed(n)) * 2 - 1


def latents(n: int) -> torch.Tensor:
    return torch.randn(1, 16, n, SIDE // 8, SIDE // 8, generator=torch.Generator().manual_seed(n))


def test_an_encode_stream_stands_where_the_positions_say(tiny_model, model_hash):
    stream, taken, emitted = StreamingEncoder(tiny_model, model_hash), 0, 0
    for n in CHUNKS:
        emitted += stream.push(frames(n)).shape[2]
        taken += n
        assert stream.meta["frames_encoded"] == settled_inputs("encode", taken)
        assert emitted == stream.meta["latents_out"] == outputs_for("encode", taken)
        assert inputs_for("encode", emitted) == settled_inputs("encode", taken)  # the fewest that emit as many


def test_a_decode_stream_stands_where_the_positions_say(tiny_model, model_hash):
    stream, taken, emitted = StreamingDecoder(tiny_model, model_hash), 0, 0
    for n in CHUNKS:
        emitted += stream.push(latents(n)).shape[2]
        taken += n
        assert settled_inputs("decode", taken) == taken == stream.meta["latents_in"]
        assert emitted == stream.meta["frames_out"] == outputs_for("decode", taken)
        assert inputs_for("decode", emitted) == taken and outputs_for("decode", taken - 1) < emitted


@pytest.mark.parametrize("start", range(0, 14))
def test_an_encode_stream_resumes_at_the_first_group_boundary_at_or_after_start(tiny_model, model_hash, start):
    position = resume_position("encode", start)
    assert position >= start and (position == 0 or (position - 1) % group_size("encode") == 0)
    assert position - start < group_size("encode")
    if position:
        resumed = StreamingEncoder.resume(tiny_model, model_hash, position)
        assert resumed.meta["latents_out"] == outputs_for("encode", position)
    if start != position and start > 0:  # a position that is no group boundary cannot be resumed at
        with pytest.raises(ValueError, match="group boundary"):
            StreamingEncoder.resume(tiny_model, model_hash, start)


@pytest.mark.parametrize("start", range(1, 6))
def test_a_decode_stream_resumes_where_it_is_asked(tiny_model, model_hash, start):
    assert resume_position("decode", start) == start
    resumed = StreamingDecoder.resume(tiny_model, model_hash, 1, 0, resume_position("decode", start))
    assert resumed.meta["frames_out"] == outputs_for("decode", start)


def test_settled_inputs_leave_the_pending_frames_out():
    assert [settled_inputs("encode", end) for end in range(11)] == [0, 1, 1, 1, 1, 5, 5, 5, 5, 9, 9]
    assert [resume_position("encode", start) for start in range(11)] == [0, 1, 5, 5, 5, 5, 9, 9, 9, 9, 13]


@pytest.mark.parametrize("frames_budget", [1, 3, 4, 7, 8, 33])
def test_a_decode_chunk_stays_within_its_frame_budget(frames_budget):
    latent_frames = decode_chunk_latents(frames_budget)
    assert latent_frames >= 1
    assert pixel_frames(latent_frames, first_chunk=False) <= max(frames_budget, group_size("encode"))
    assert pixel_frames(latent_frames + 1, first_chunk=False) > frames_budget


def test_positions_reject_an_unknown_kind():
    for position in (group_size, lambda kind: settled_inputs(kind, 5), lambda kind: resume_position(kind, 5),
                     lambda kind: outputs_for(kind, 5), lambda kind: inputs_for(kind, 5)):
        with pytest.raises(ValueError, match="kind"):
            position("reconstruct")
