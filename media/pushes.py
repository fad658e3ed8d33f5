"""One chunk into one stream as a unit of model work, which may run batched with others.

A `StreamPush` makes its stream's input (`prepare`, e.g. frames to the model's device), pushes
it, and makes the answer of the output (`finish`, e.g. quantised and copied to the host), all
where the model runs. Pushes of equal `key` (same kind, model, settings, phase, input shape and
state layout: `batch_key`) can run as one batched forward (`push_together`), with each
stream's state and answer those of its own push up to float rounding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

import torch

from model import StreamingDecoder, StreamingEncoder, push_together

T = TypeVar("T")


@dataclass(eq=False)
class StreamPush(Generic[T]):
    stream: StreamingEncoder | StreamingDecoder
    prepare: Callable[[], torch.Tensor]
    finish: Callable[[torch.Tensor], T]
    shape: tuple[int, ...]  # of what `prepare` makes
    key: tuple = field(init=False)
    seconds: float | None = field(default=None, init=False)  # of `prepare` and the push, when run alone

    def __post_init__(self) -> None:
        self.key = self.stream.batch_key(self.shape)

    def run(self) -> T:
        """The push alone, which measures its `seconds` before `finish` runs."""
        start = time.perf_counter()
        output = self.stream.push(self.prepare())
        self.seconds = time.perf_counter() - start
        return self.finish(output)


def push_outputs(pushes: list[StreamPush]) -> list[torch.Tensor]:
    """The outputs of pushes of one key run as one batched forward; `finish` is left to the
    caller, so that an error in one answer's making stays that push's own."""
    return push_together([push.stream for push in pushes], [push.prepare() for push in pushes])
