"""Tensor data read into torch by the layout its file's header declares; the headers
themselves are read by `cdt_client.formats.tensors`, shared with the client."""

from __future__ import annotations

import math
from typing import BinaryIO

import torch

from cdt_client.formats.tensors import TensorHeaderError, TensorLayout, element_size

# The safetensors dtype names of `cdt_client.formats.tensors.ELEMENT_SIZES`, as torch dtypes.
TORCH_DTYPES = {"U8": torch.uint8, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                "F64": torch.float64}


def read_slab(fp: BinaryIO, layout: TensorLayout, axis: int, start: int, stop: int) -> torch.Tensor:
    """Indices [start, stop) of dimension `axis` (all of the others), read from the file:
    one contiguous read per index of the leading dimensions."""
    shape = layout.shape
    inner = math.prod(shape[axis + 1 :]) * element_size(layout.dtype)
    span = shape[axis] * inner
    data = bytearray()
    for lead in range(math.prod(shape[:axis])):
        fp.seek(layout.offset + lead * span + start * inner)
        data += fp.read((stop - start) * inner)
    if len(data) != math.prod(shape[:axis]) * (stop - start) * inner:
        raise TensorHeaderError("the file ended before its declared data")
    out_shape = (*shape[:axis], stop - start, *shape[axis + 1 :])
    if not data:
        return torch.empty(out_shape, dtype=TORCH_DTYPES[layout.dtype])
    return torch.frombuffer(data, dtype=TORCH_DTYPES[layout.dtype]).reshape(out_shape)
