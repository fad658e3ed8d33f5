"""A stream rebuilt by replaying its last receptive field's worth of logged input chunks
equals the uninterrupted stream; the measured field is tight, affine in DDIM steps, and
recorded with checkpoints."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from model import (CDTConfig, ReceptiveField, StreamingDecoder, StreamingEncoder, build_model, content_hash,
                   measure_receptive_field)
from model.config import TIME_FACTOR
from model.streaming import measure
from tests.tolerance import assert_float_close

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "cdt-tiny"
# Frame sizes in pixels: the temporal field does not depend on them. Decoding runs the
# U-Net at full resolution, so its cases use the smallest frame (1x1 latents).
ENCODE_SIZE, DECODE_SIZE = 16, 8
SEED = 7


@dataclass(frozen=True)
class Case:
    model_kind: str
    kind: str  # "encode" | "decode"
    steps: int
    sizes: tuple[int, ...]  # chunk lengths in input frames

    @property
    def group(self) -> int:
        return TIME_FACTOR if self.kind == "encode" else 1


CASES = {
    # Chunk k (the one before last) ends off a group boundary, with 2 frames pending.
    "encode": Case("cdt", "encode", 1, (1, 3, 6, 9, 2, 11, 7, 5, 13, 10, 4, 8, 8, 10)),
    "decode-1": Case("cdt", "decode", 1, (1, *[2, 3] * 12)),
    "decode-3": Case("cdt", "decode", 3, (1, *[7, 9] * 8, 2, 3)),
    "vae-decode": Case("vae", "decode", 3, (1, *[2, 3] * 4)),  # steps are ignored
}


@pytest.fixture(scope="module")
def models(tiny_model):
    torch.manual_seed(0)
    return {"cdt": tiny_model, "vae": build_model(CDTConfig.from_preset("tiny"), "vae").eval()}


@pytest.fixture(scope="module")
def fields(models):
    """Each model's measured receptive fields, measured when first asked for."""
    measured = {}

    def field(kind: str):
        if kind not in measured:
            measured[kind] = measure(models[kind])
        return measured[kind]

    return field


def inputs(case: Case, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    length = sum(case.sizes)
    if case.kind == "encode":
        return torch.rand(1, 3, length, ENCODE_SIZE, ENCODE_SIZE, generator=g) * 2 - 1
    return torch.randn(1, 16, length, DECODE_SIZE // 8, DECODE_SIZE // 8, generator=g)


def open_stream(model, case: Case):
    if case.kind == "encode":
        return StreamingEncoder(model, content_hash(model))
    return StreamingDecoder(model, content_hash(model), steps=case.steps, seed=SEED)


def resume(model, case: Case, start: int):
    if case.kind == "encode":
        return StreamingEncoder.resume(model, content_hash(model), start)
    return StreamingDecoder.resume(model, content_hash(model), case.steps, SEED, start)


def cut(data: torch.Tensor, sizes) -> list[torch.Tensor]:
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [data[:, :, a:b] for a, b in zip(bounds, bounds[1:])]


def counters(stream) -> dict:
    return {k: v for k, v in stream.meta.items() if k.startswith(("frames_", "latents_"))}


def push_all(stream, chunks) -> list[torch.Tensor]:
    return [stream.push(chunk) for chunk in chunks]


def window_start(case: Case, field: int) -> int:
    """The resume point for a rebuild after chunk k = the one before last: `field` input
    frames before the last group boundary that chunk k reaches."""
    end = sum(case.sizes[:-1])
    boundary = end - (end - 1) % case.group
    start = boundary - field
    assert start >= 1, "the case's clip is too short for the model's receptive field"
    return start


def logged_window(chunks: list[torch.Tensor], start: int) -> list[torch.Tensor]:
    """Chunks 0..k as logged, the first cut at `start`, those before it dropped."""
    window, done = [], 0
    for chunk in chunks[:-1]:
        n = chunk.shape[2]
        if done + n > start:
            window.append(chunk[:, :, max(0, start - done):])
        done += n
    return window


@dataclass
class Run:
    chunks: list[torch.Tensor]  # the inputs as logged
    outputs: list[torch.Tensor]  # the uninterrupted stream's output per chunk
    snapshot: bytes  # its exported state after chunk SNAPSHOT_AFTER
    counters: dict  # its frame counters at the end


SNAPSHOT_AFTER = -4  # so that the snapshot test replays the last 3 chunks


@pytest.fixture(scope="module")
def uninterrupted(models):
    """The uninterrupted stream of a case, run once."""
    runs = {}

    def run(name: str) -> Run:
        if name not in runs:
            case = CASES[name]
            chunks = cut(inputs(case), case.sizes)
            stream = open_stream(models[case.model_kind], case)
            outputs = push_all(stream, chunks[: SNAPSHOT_AFTER + 1])
            snapshot = stream.export_state()
            outputs += push_all(stream, chunks[SNAPSHOT_AFTER + 1 :])
            runs[name] = Run(chunks, outputs, snapshot, counters(stream))
        return runs[name]

    return run


@pytest.mark.exactness
@pytest.mark.parametrize("name", list(CASES))
def test_replaying_the_window_rebuilds_the_stream(models, fields, uninterrupted, name):
    case = CASES[name]
    model = models[case.model_kind]
    run = uninterrupted(name)
    start = window_start(case, fields(case.model_kind).frames(case.kind, case.steps))
    stream = resume(model, case, start)
    push_all(stream, logged_window(run.chunks, start))
    rebuilt, expected = stream.push(run.chunks[-1]), run.outputs[-1]
    assert rebuilt.shape[2] > 0
    assert_float_close(rebuilt, expected)  # resumed with no history: within float rounding
    assert counters(stream) == run.counters


@pytest.mark.exactness
@pytest.mark.parametrize("name", ["encode", "decode-3"])
def test_replaying_after_a_snapshot_is_bit_identical(models, uninterrupted, name):
    case = CASES[name]
    model = models[case.model_kind]
    run = uninterrupted(name)
    restored = type(open_stream(model, case)).from_state(model, content_hash(model), run.snapshot)
    for chunk, expected in zip(run.chunks[SNAPSHOT_AFTER + 1 :], run.outputs[SNAPSHOT_AFTER + 1 :]):
        assert torch.equal(restored.push(chunk), expected)


def perturbed_output(model, case: Case, frame: int) -> torch.Tensor:
    """The last chunk's output when input `frame` is replaced by an unrelated one."""
    data = inputs(case)
    data[:, :, frame] = inputs(case, seed=1)[:, :, frame]
    return push_all(open_stream(model, case), cut(data, case.sizes))[-1]


@pytest.mark.exactness
@pytest.mark.parametrize("name", ["encode", "decode-1"])
def test_only_inputs_inside_the_window_change_the_stream(models, fields, uninterrupted, name):
    case = CASES[name]
    model = models[case.model_kind]
    expected = uninterrupted(name).outputs[-1]
    start = window_start(case, fields(case.model_kind).frames(case.kind, case.steps))
    assert torch.equal(perturbed_output(model, case, start - 1), expected)
    # The field is tight: some phase of the window's first group still reaches the output.
    inside = [perturbed_output(model, case, frame) for frame in range(start, start + case.group)]
    assert any(not torch.equal(output, expected) for output in inside)


def test_decode_field_is_affine_in_ddim_steps(models, fields):
    record = fields("cdt")
    assert record.decode_per_step > 0
    assert measure_receptive_field(models["cdt"], "decode", 3) == record.decode_receptive_field(3)
    assert record.frames("decode", 3) == record.decode_base + 3 * record.decode_per_step


def test_field_does_not_depend_on_the_frame_size(models, fields):
    """16x24 pixels takes the U-Net's odd-size path (24 -> 12 -> 6 -> 3 -> 2)."""
    model, field = models["cdt"], fields("cdt")
    assert measure_receptive_field(model, "decode", 1, size=(16, 24)) == field.frames("decode", 1)
    assert measure_receptive_field(model, "encode", size=(16, 24)) == field.frames("encode")


def test_vae_decode_field_ignores_steps(fields):
    record = fields("vae")
    assert record.decode_per_step == 0 and record.decode_base > 0


def test_shipped_checkpoint_records_its_field(fields):
    """The record belongs to the shipped weights, and the field is the tiny config's
    (the NaN probe sees the structure, not the weights)."""
    record = json.loads((SHIPPED / "receptive_field.json").read_text())
    assert record["model_hash"] == (SHIPPED / "model.sha256").read_text().strip()
    field = fields("cdt")
    assert (record["encode"], record["decode_base"], record["decode_per_step"]) == (
        field.encode, field.decode_base, field.decode_per_step)


def test_measuring_rejects_an_unknown_kind(tiny_model):
    with pytest.raises(ValueError, match="kind"):
        measure_receptive_field(tiny_model, "reconstruct")
    with pytest.raises(ValueError, match="kind"):
        ReceptiveField(4, 2, 1).frames("reconstruct")
