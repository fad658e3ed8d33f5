"""The temporal receptive field of a tokenizer's streams, measured by perturbation.

The model is causal and convolutional in time with no recurrence, so after a stream
has taken N input frames (a group boundary) its state depends only on the last R of
them: R is the receptive field, in pixel frames for encoding and latent frames for
decoding. A stream resumed with no history at N-R (`StreamingEncoder.resume`,
`StreamingDecoder.resume`) and fed frames N-R..N-1 has the uninterrupted stream's
state at N, so a bounded log of recent input chunks is enough to rebuild a stream.

R is measured, not derived from the layer list: two chunked streams whose inputs
differ in one frame p only show how far p's influence reaches. If the last output
that differs (exact inequality) comes from the group ending at input frame e, the state
at boundary N depends on p exactly when N < e, so R = max over p of (e - group - p),
taken over the group's phases and rounded up to whole groups. Every DDIM step runs the
U-Net again on the previous step's estimate, so the decode field grows by the same
amount per step: decode(steps) = a + b*steps, from the fields at 1 and 2 steps.

The differing frame p is NaN. A finite change fades to float rounding long before the
field's edge and can round away there: a finite probe finds the shipped tiny
checkpoint's decode field 1 latent frame short at 2 and 3 DDIM steps, and the tiny
VAE decoder's 1 short at any. NaN survives every operation it meets, so the probe finds
the structural dependence, the same for any weights of a config, and needs no safety
margin on top.

The spatial size does not change the temporal field (16x16 and 16x24 probes, the
latter through the U-Net's odd-size path, measure the same as 8x8), so the probes use
the smallest frame, 8x8 pixels (1x1 latents). A checkpoint records its figures in
receptive_field.json (model/checkpoint.py), and the loader hands them out in its
`ModelIdentity`; to write the record of a checkpoint saved without one:

    python -c "from model import record_receptive_field as r; r('checkpoints/cdt-tiny')"
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SPACE_FACTOR
from ..tokenizer import Tokenizer, content_hash
from .positions import check_kind, group_size, inputs_for
from .streams import StreamingDecoder, StreamingEncoder

MEASURED_BY = "model.streaming.receptive_field.measure"
PROBE_SIZE = (SPACE_FACTOR, SPACE_FACTOR)  # probe frame height and width in pixels
CHUNK_GROUPS = 16  # groups per chunk after the first: long chunks amortise the per-call cost
MAX_GROUPS = 4096  # a probe whose influence has not died out by then means a recurrent model


@dataclass(frozen=True)
class ReceptiveField:
    """A model's temporal receptive fields: `encode` pixel frames, and
    `decode_base + decode_per_step * steps` latent frames at `steps` DDIM steps."""

    encode: int
    decode_base: int
    decode_per_step: int

    def decode_receptive_field(self, steps: int) -> int:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return self.decode_base + self.decode_per_step * steps

    def frames(self, kind: str, steps: int = 1) -> int:
        """How many recent input frames a stream's state depends on: pixel frames for
        "encode", latent frames for "decode" at `steps` DDIM steps."""
        check_kind(kind)
        return self.encode if kind == "encode" else self.decode_receptive_field(steps)


def measure(model: Tokenizer) -> ReceptiveField:
    """Measure the encode field and the decode field's affine law in DDIM steps."""
    one, two = (measure_receptive_field(model, "decode", steps) for steps in (1, 2))
    return ReceptiveField(measure_receptive_field(model, "encode"), 2 * one - two, two - one)


@torch.no_grad()
def measure_receptive_field(model: Tokenizer, kind: str, steps: int = 1,
                            size: tuple[int, int] = PROBE_SIZE) -> int:
    """The number of most recent input frames (pixel frames for "encode", latent frames
    for "decode" at `steps` DDIM steps) that a stream's state and outputs depend on,
    probed on frames of `size` pixels."""
    group = group_size(kind, model.config.time_factor)
    # Every phase of the second group: the stream's first frame is a group of its own.
    probes = range(1 + group, 1 + 2 * group)
    ends = _influence_ends(model, kind, steps, size, probes)
    field = max(end - group - p for end, p in zip(ends, probes))
    return max(0, -(-field // group) * group)


def _influence_ends(model: Tokenizer, kind: str, steps: int, size: tuple[int, int],
                    probes: range) -> list[int]:
    """For each probe frame p, the end (exclusive input frame) of the last group whose
    outputs change when frame p alone is NaN.

    A reference stream and one stream per probe take the same chunks, but for the probe
    frame, until every probe stream's state equals the reference's: from there on their
    outputs are equal too."""
    generator = torch.Generator().manual_seed(0)
    model_hash = content_hash(model)
    reference = _open(model, model_hash, kind, steps)
    perturbed = [_open(model, model_hash, kind, steps) for _ in probes]
    last_output = [-1 for _ in probes]
    fed = produced = 0
    factor = model.config.time_factor
    group = group_size(kind, factor)
    while fed <= probes[-1] or not all(s.cache.equals(reference.cache) for s in perturbed):
        if fed > MAX_GROUPS * group:
            raise RuntimeError(f"a frame still changes the {kind} state {fed} frames later")
        n = 1 if fed == 0 else CHUNK_GROUPS * group
        chunk = _probe_inputs(model, kind, n, size, generator)
        expected = reference.push(chunk)
        for i, (p, stream) in enumerate(zip(probes, perturbed)):
            changed = chunk.clone()
            if fed <= p < fed + n:
                changed[:, :, p - fed] = float("nan")
            differs = (stream.push(changed) != expected).transpose(0, 2).flatten(1).any(1).nonzero()
            if len(differs):
                last_output[i] = produced + int(differs.max())
        fed += n
        produced += expected.shape[2]
    return [inputs_for(kind, o + 1, factor) for o in last_output]


def _open(model: Tokenizer, model_hash: str, kind: str, steps: int) -> StreamingEncoder | StreamingDecoder:
    if kind == "encode":
        return StreamingEncoder(model, model_hash)
    return StreamingDecoder(model, model_hash, steps=steps, seed=0)


def _probe_inputs(model: Tokenizer, kind: str, length: int, size: tuple[int, int],
                  generator: torch.Generator) -> torch.Tensor:
    h, w = size
    if kind == "encode":
        frames = torch.rand(1, 3, length, h, w, generator=generator) * 2 - 1
    else:
        shape = (1, model.config.latent_channels, length, h // SPACE_FACTOR, w // SPACE_FACTOR)
        frames = torch.randn(shape, generator=generator)
    return frames.to(model.device)

