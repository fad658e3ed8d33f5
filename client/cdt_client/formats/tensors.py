"""Headers of npy and safetensors files, read and written apart from their data.

Reading a header first lets a caller check the declared dtype and shape against its
limits before a byte of data is allocated (a 1 kB npy can claim terabytes), then read
the data in slices. Writing a header from a known dtype and shape lets a file be
streamed: header first, then the data as it is produced.

The `safetensors` library reads a header only from a file it opens by name, so a body in
memory or an open temporary file is read here (numpy reads npy headers).
"""

from __future__ import annotations

import io
import json
import math
import tokenize
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

_ST_MAX_HEADER = 1 << 20  # bytes; ours are under 1 kB, safetensors itself allows 100 MB
_ST_ALIGN = 8  # safetensors pads its JSON header so the data starts 8-byte aligned
# safetensors dtype names of the dtypes we read or write, with their sizes in bytes, and as
# numpy's dtypes where numpy has one (npy files cannot hold bf16).
ELEMENT_SIZES = {"U8": 1, "F16": 2, "BF16": 2, "F32": 4, "F64": 8}
NPY_DTYPES = {"U8": np.dtype(np.uint8), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}


class TensorHeaderError(ValueError):
    """A header that is malformed or does not match the data that follows it."""


@dataclass(frozen=True)
class TensorLayout:
    """Where one tensor's data lies in a file, and what it is."""

    dtype: str  # safetensors name (U8, F32, ...) for both formats
    shape: tuple[int, ...]
    offset: int  # byte offset of the first element in the file
    metadata: dict[str, str]  # safetensors string metadata; empty for npy

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)


def element_size(dtype: str) -> int:
    return ELEMENT_SIZES[dtype]


def _file_size(fp: BinaryIO) -> int:
    position = fp.tell()
    size = fp.seek(0, io.SEEK_END)
    fp.seek(position)
    return size


# --- npy -----------------------------------------------------------------------------------

def read_npy_header(fp: BinaryIO) -> TensorLayout:
    """The layout of a C-order npy file of a little-endian or byte-sized numeric dtype."""
    fp.seek(0)
    try:
        version = np.lib.format.read_magic(fp)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = reader(fp)
    except (ValueError, EOFError, OSError, SyntaxError, tokenize.TokenError) as exc:  # numpy tokenizes the header
        raise TensorHeaderError(f"not a valid npy header ({exc})") from None
    if dtype.hasobject:
        raise TensorHeaderError("npy holds Python objects (pickle); only numeric arrays are accepted")
    names = {v: k for k, v in NPY_DTYPES.items()}
    if dtype not in names:
        raise TensorHeaderError(f"npy dtype {dtype} is not uint8 or a little-endian float")
    if fortran_order:
        raise TensorHeaderError("Fortran-order npy arrays are not accepted; save in C order")
    layout = TensorLayout(names[dtype], tuple(int(d) for d in shape), fp.tell(), {})
    _check_size(fp, layout)
    return layout


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The header `np.save` writes for a C-order array of this dtype and shape."""
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(int(d) for d in shape)}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


# --- safetensors ---------------------------------------------------------------------------

def read_safetensors_header(fp: BinaryIO) -> tuple[dict[str, TensorLayout], dict[str, str]]:
    """Every tensor's layout, and the string metadata, checked against the file size."""
    fp.seek(0)
    prefix = fp.read(8)
    if len(prefix) < 8:
        raise TensorHeaderError("too short to be a safetensors file")
    n = int.from_bytes(prefix, "little")
    if not 2 <= n <= _ST_MAX_HEADER:
        raise TensorHeaderError(f"bad safetensors header length {n}")
    try:
        header = json.loads(fp.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorHeaderError(f"bad safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise TensorHeaderError("bad safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TensorHeaderError("bad safetensors metadata (not a map of strings)")
    layouts = {name: _safetensors_layout(name, entry, 8 + n, metadata) for name, entry in header.items()}
    for layout in layouts.values():
        _check_size(fp, layout)
    return layouts, metadata


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The string metadata of a safetensors file held in memory, its header checked."""
    return read_safetensors_header(io.BytesIO(data))[1]


def _safetensors_layout(name: str, entry, data_start: int, metadata: dict[str, str]) -> TensorLayout:
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        shape = tuple(int(d) for d in shape)
        begin, end = int(begin), int(end)
    except (TypeError, KeyError, ValueError) as exc:
        raise TensorHeaderError(f"bad safetensors entry {name!r} ({exc})") from None
    if not isinstance(dtype, str) or dtype not in ELEMENT_SIZES:
        raise TensorHeaderError(f"tensor {name!r} has dtype {dtype}; uint8 or a float is needed")
    if min(shape, default=0) < 0:
        raise TensorHeaderError(f"tensor {name!r} has a negative dimension: {shape}")
    layout = TensorLayout(dtype, shape, data_start + begin, metadata)
    if end - begin != layout.nbytes:
        raise TensorHeaderError(f"tensor {name!r}: {end - begin} bytes of data for {dtype} {shape}")
    return layout


def safetensors_header(name: str, dtype: str, shape: tuple[int, ...], metadata: dict[str, str]) -> bytes:
    """The header of a safetensors file holding one tensor, whose data follows it."""
    size = math.prod(shape) * element_size(dtype)
    header = {"__metadata__": metadata, name: {"dtype": dtype, "shape": list(shape), "data_offsets": [0, size]}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % _ST_ALIGN)
    return len(text).to_bytes(8, "little") + text


def _check_size(fp: BinaryIO, layout: TensorLayout) -> None:
    available = _file_size(fp) - layout.offset
    if layout.nbytes > available:
        raise TensorHeaderError(f"the header declares {layout.dtype} {layout.shape} ({layout.nbytes} bytes), "
                                f"the file holds {max(0, available)} bytes of data")
