"""Schemathesis hooks of the API fuzz run (`tests/api_fuzz.py` loads them into `st run`).

- Request bodies: the OpenAPI says only "binary" for video, npy and safetensors bodies, so
  random bytes would test little beyond the 415 path. These strategies build real files, valid
  and broken: mp4 clips (whole, truncated, corrupted), npy and safetensors frames and latents of
  drawn shapes and dtypes (empty, too long, too large, non-finite), latents files of the served
  model and of another one, with well-formed and hostile headers and metadata; any of them may
  be sent under another content type.
- `error_is_documented`: every error answer is the JSON error body with a code listed for its
  status in `cdt_client.formats.api.ERROR_CODES`.
- The run stays cheap: the server's limits (tests/api_fuzz.py) bound what a valid body costs,
  and DDIM steps in the valid range are folded to 1..4 before sending (the bounds themselves
  are still fuzzed: out-of-range values pass unchanged).
- Every answer is recorded (operation, status) to the JSON-lines file named by API_FUZZ_RECORD.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import schemathesis
from hypothesis import strategies as st

from media import write_video
from media.latents_file import LatentsInfo
from media.padding import Padding
from model.config import LATENT_CHANNELS
from cdt_client.formats.api import ERROR_CODES
from service.settings import Settings

RECORD = os.environ.get("API_FUZZ_RECORD")
MODEL_HASH = os.environ.get("API_FUZZ_MODEL_HASH", "0" * 64)
FOLDED_STEPS = 4  # valid DDIM step counts above this are folded into 1..4 (see the module doc)
# CDT_MAX_STEPS of the fuzz server (the default): above it a step count is refused at once (400).
MAX_STEPS = Settings.model_fields["max_steps"].default

NPY, SAFETENSORS, OCTET_STREAM = "application/x-npy", "application/x-safetensors", "application/octet-stream"
VIDEO_TYPES = ("video/mp4", "video/webm", "video/x-msvideo")
# safetensors dtype -> numpy dtype of the data written (BF16: float32s cut to their upper halves).
DTYPES = {"U8": "u1", "F16": "<f2", "BF16": "<f4", "F32": "<f4", "F64": "<f8", "I32": "<i4", "BOOL": "?",
          "C64": "<c8", "F32BE": ">f4"}
NPY_ONLY = ("C64", "F32BE")  # dtypes safetensors has no name for
SMALL = 48**3 * 16  # most elements a drawn tensor's data is written for

# Choices are weighted by repetition (sampled_from draws its elements about evenly), so that
# the server computes on a good share of the cases and damaged content is the rarer draw.
SPECIAL = st.sampled_from([None] * 6 + ["nan", "inf", "over"])
DAMAGE = st.sampled_from([None] * 6 + ["truncated", "overwritten"])
RARELY = st.sampled_from([False] * 4 + [True])
# Broad sizes: around the fuzz server's limits (9 frames, 8..32 pixels a side), empty or absurd.
ABSURD = st.sampled_from([2**31, 2**40, 10**15])
SIDE = st.one_of(st.integers(4, 40), st.just(0), ABSURD)
LENGTH = st.one_of(st.integers(1, 12), st.just(0), ABSURD)


@st.composite
def valid_frames(draw, floats: tuple[str, ...]) -> tuple[str, tuple[int, ...]]:
    """(dtype, shape) of frames the server takes: uint8 (T,H,W,3) or float (3,T,H,W)."""
    t, h, w = draw(st.integers(1, 9)), draw(st.integers(8, 32)), draw(st.integers(8, 32))
    dtype = draw(st.sampled_from(["U8", *floats]))
    return dtype, ((t, h, w, 3) if dtype == "U8" else (3, t, h, w))


@st.composite
def latent_chunks(draw, floats: tuple[str, ...]) -> tuple[str, tuple[int, ...]]:
    """(dtype, shape) of a decode session's chunk: float (1,16,m,h,w)."""
    shape = (1, LATENT_CHANNELS, draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    return draw(st.sampled_from(floats)), shape


@st.composite
def any_tensor(draw) -> tuple[str, tuple[int, ...]]:
    """(dtype, shape) of anything: frames and latents of any size, any shape, any dtype."""
    kind = draw(st.sampled_from(["thw3", "3thw", "latents", "any"]))
    if kind == "thw3":
        shape = (draw(LENGTH), draw(SIDE), draw(SIDE), 3)
    elif kind == "3thw":
        shape = (3, draw(LENGTH), draw(SIDE), draw(SIDE))
    elif kind == "latents":
        shape = (1, LATENT_CHANNELS, draw(st.integers(0, 3)), draw(SIDE), draw(SIDE))
    else:
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=6)))
    return draw(st.sampled_from(sorted(DTYPES))), shape


def tensors(floats: tuple[str, ...]) -> st.SearchStrategy[tuple[str, tuple[int, ...]]]:
    """Valid frames, valid latent chunks, or anything, a third each."""
    return st.one_of(valid_frames(floats), latent_chunks(floats), any_tensor())


NPY_FLOATS, ST_FLOATS = ("F32", "F16", "F64"), ("F32", "F16", "BF16", "F64")


def _data(draw, dtype: str, shape: tuple[int, ...]) -> bytes:
    """The tensor's bytes (with an occasional NaN, inf or 1.5), or none when it is large: its
    header then claims more than the body holds."""
    if 0 in shape or int(np.prod(shape, dtype=object)) > SMALL:
        return b""
    rng, special = np.random.default_rng(draw(st.integers(0, 2**32))), draw(SPECIAL)
    numpy_dtype = np.dtype(DTYPES[dtype])
    if numpy_dtype.kind in "fc":
        array = rng.uniform(-1, 1, shape).astype(numpy_dtype)
        if special:
            array.flat[rng.integers(array.size)] = {"nan": np.nan, "inf": np.inf, "over": 1.5}[special]
    else:
        array = rng.integers(0, 256, shape).astype(numpy_dtype)
    if dtype == "BF16":
        return (array.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    return array.tobytes()


def _damaged(draw, data: bytes) -> bytes:
    """The bytes as built, or cut short, or with up to 16 bytes overwritten."""
    damage = draw(DAMAGE)
    if not data or damage is None:
        return data
    at = draw(st.integers(0, len(data) - 1))
    if damage == "truncated":
        return data[:at]
    return data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at + 16:]


@st.composite
def npy_files(draw) -> bytes:
    buffer = io.BytesIO()
    if draw(st.integers(0, 19)) == 0:  # an object array: a pickle, which must never be loaded
        np.save(buffer, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
        return buffer.getvalue()
    dtype, shape = draw(tensors(NPY_FLOATS))
    header = {"descr": DTYPES[dtype] if dtype != "BF16" else "<u2", "shape": shape, "fortran_order": draw(RARELY)}
    write = draw(st.sampled_from([np.lib.format.write_array_header_1_0, np.lib.format.write_array_header_2_0]))
    write(buffer, header)
    buffer.write(_data(draw, dtype, shape))
    return _damaged(draw, buffer.getvalue())


def _safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()  # json.dumps writes inf and nan as Infinity and NaN
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


@st.composite
def latents_metadata(draw) -> dict[str, str]:
    """The metadata of a latents file of the served model (or another), sometimes with a field
    replaced by a hostile value."""
    frames, height, width = draw(st.integers(1, 12)), draw(st.integers(1, 40)), draw(st.integers(1, 40))
    model = draw(st.sampled_from([MODEL_HASH, MODEL_HASH, MODEL_HASH, "f" * 64]))
    meta = LatentsInfo("", model, "tiny", "cdt", 4, "fp32", frames, height, width, 30.0,
                       Padding.for_shape(frames, height, width, 4)).metadata()
    if draw(RARELY):
        meta[draw(st.sampled_from(sorted(meta)))] = draw(st.sampled_from(
            ["inf", "-inf", "nan", "0", "-1", "1e308", "1e-300", "9" * 30, "", "x"]))
    return meta


def _latent_shape(meta: dict[str, str]) -> tuple[int, ...] | None:
    """The latents shape the metadata describes, if it is well-formed."""
    try:
        return LatentsInfo.from_metadata(meta).latent_shape
    except ValueError:
        return None


HOSTILE = st.one_of(st.none(), st.floats(), st.text(max_size=4), st.integers(-10, 10**20),
                    st.lists(st.one_of(st.integers(-3, 3), st.floats()), max_size=5))


@st.composite
def safetensors_files(draw) -> bytes:
    kind = draw(st.sampled_from(["latents file", "tensor"]))
    if kind == "latents file":  # what /v1/decode takes (a decode session's chunk too)
        meta, name = draw(latents_metadata()), "latents"
        shape = _latent_shape(meta) or draw(any_tensor())[1]
        dtype = draw(st.sampled_from([*ST_FLOATS, "U8"]))
    else:
        dtype, shape = draw(tensors(ST_FLOATS).filter(lambda tensor: tensor[0] not in NPY_ONLY))
        name = draw(st.sampled_from(["latents" if shape[:2] == (1, LATENT_CHANNELS) else "frames", "video", ""]))
        meta = draw(st.sampled_from([{}] * 6 + [{"fps": "24"}, {"fps": "0"}, {"fps": "-5"}, {"fps": "inf"},
                                                 {"fps": "nan"}, {"fps": "abc"}]))
    entry = {"dtype": dtype, "shape": list(shape),
             "data_offsets": [0, int(np.prod(shape, dtype=object)) * (2 if dtype == "BF16" else
                                                                       np.dtype(DTYPES[dtype]).itemsize)]}
    if draw(RARELY):  # a hostile entry: wrong types, non-finite numbers
        entry[draw(st.sampled_from(sorted(entry)))] = draw(HOSTILE)
    header = {"__metadata__": meta, name: entry} if meta else {name: entry}
    return _damaged(draw, _safetensors(header, _data(draw, dtype, shape)))


def _clips() -> list[bytes]:
    """Real h264 mp4 files: within the fuzz server's limits, too long, too large, too small."""
    rng = np.random.default_rng(0)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for frames, height, width in [(1, 16, 16), (5, 16, 24), (9, 32, 32), (12, 16, 16), (3, 40, 16), (2, 4, 6)]:
            path = Path(tmp) / "clip.mp4"
            write_video(path, rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8), fps=24)
            out.append(path.read_bytes())
    return out


CLIPS = _clips()


@st.composite
def video_files(draw) -> bytes:
    return _damaged(draw, draw(st.sampled_from(CLIPS)))


IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(32)
any_body = st.one_of(video_files(), npy_files(), safetensors_files(), st.just(IMAGE), st.binary(max_size=64))


def _body(own: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Mostly bodies of the declared type; some of another, to test sniffing and mismatches."""
    return st.one_of(own, own, own, any_body)


BODIES = {**{media_type: _body(video_files()) for media_type in VIDEO_TYPES}, NPY: _body(npy_files()),
          SAFETENSORS: _body(safetensors_files()), OCTET_STREAM: any_body}
for media_type, strategy in BODIES.items():
    schemathesis.openapi.media_type(media_type, strategy)
TENSOR_BINARY = "tensor/binary"  # diffusers' remote_decode/remote_encode: raw bytes, shape and dtype in the query
# The diffusers endpoints' bodies: raw tensors (their positive cases get a matching query in
# flatmap_case) and images.
schemathesis.openapi.media_type(TENSOR_BINARY, st.binary(max_size=64))
for media_type in ("image/png", "image/jpeg"):
    schemathesis.openapi.media_type(media_type, st.one_of(st.just(IMAGE), st.binary(max_size=64)))


DIFFUSERS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@st.composite
def diffusers_tensors(draw, operation: str) -> tuple[bytes, dict]:
    """Raw tensor bytes and the `shape` and `dtype` query that describe them: mostly latents
    (decode) or float frames (encode) the server takes, some anything, some damaged."""
    floats = tuple(DIFFUSERS_DTYPES)
    if operation.endswith("/decode"):
        valid = latent_chunks(floats)
    else:
        valid = st.tuples(st.sampled_from(floats), st.builds(lambda t, h, w: (1, 3, t, h, w), st.integers(1, 9),
                                                             st.integers(8, 32), st.integers(8, 32)))
    dtype, shape = draw(st.one_of(valid, valid, any_tensor()))
    query = {"shape": [str(n) for n in shape], "dtype": DIFFUSERS_DTYPES.get(dtype, "float32")}
    return _damaged(draw, _data(draw, dtype, shape)), query


@schemathesis.hook
def flatmap_case(context, case):
    """Schemathesis sends most binary bodies as the first content type listed (video/mp4): draw
    the content type evenly among the operation's, with a body for it."""
    content_types = case.operation.get_request_payload_content_types()
    types = [t for t in content_types if t in BODIES]
    positive = isinstance(case.body, bytes) and case.meta is not None and case.meta.generation.mode.is_positive
    if positive and TENSOR_BINARY in content_types:
        def tensor_case(body_and_query: tuple[bytes, dict]):
            case.media_type, case.body = TENSOR_BINARY, body_and_query[0]
            case.query = {**(case.query or {}), **body_and_query[1]}
            case._record_starting_state()  # as in rebodied below
            return case

        return diffusers_tensors(case.operation.label).map(tensor_case)
    if not types or not positive:
        return st.just(case)

    def rebodied(media_type: str, body: bytes):
        case.media_type, case.body = media_type, body
        # The new body is the generated one: without this, schemathesis takes it for an edit,
        # cannot validate a binary body against its schema, and relabels the case negative.
        case._record_starting_state()
        return case

    return st.sampled_from(types).flatmap(lambda media_type: BODIES[media_type].map(
        lambda body: rebodied(media_type, body)))


def _folded(value, bound: int):
    """A DDIM step count in (FOLDED_STEPS, bound] (a number or a query string), folded into 1..FOLDED_STEPS."""
    number = int(value) if isinstance(value, str) and value.isdigit() else value
    if isinstance(number, float) and number.is_integer():  # JSON Schema's integers include 3.0
        number = int(number)
    if isinstance(number, int) and not isinstance(number, bool) and FOLDED_STEPS < number <= bound:
        number = 1 + number % FOLDED_STEPS
        return str(number) if isinstance(value, str) else number
    return value


DECODES = ("POST /v1/decode", "POST /v1/diffusers/decode")


@schemathesis.hook
def before_call(context, case, kwargs) -> None:
    operation = case.operation.label
    if operation in DECODES and isinstance(case.query, dict) and "steps" in case.query:
        case.query["steps"] = _folded(case.query["steps"], MAX_STEPS)
    if operation == "POST /v1/sessions" and isinstance(case.body, dict) and "steps" in case.body:
        case.body["steps"] = _folded(case.body["steps"], MAX_STEPS)


@schemathesis.hook
def after_call(context, case, response) -> None:
    if RECORD:
        code = None
        if response.status_code >= 400:
            try:
                code = json.loads(response.content)["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = "not a JSON error"
        with open(RECORD, "a") as f:
            f.write(json.dumps({"operation": case.operation.label, "status": response.status_code,
                                "code": code}) + "\n")


@schemathesis.check
def error_is_documented(ctx, response, case) -> None:
    """An error answer is `{"error": {"code", "message"[, "details"]}}` with a code listed for its status."""
    status = response.status_code
    if status < 400:
        return None
    assert status in ERROR_CODES, f"status {status} is not one the service documents"
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), \
        f"error {status} is not JSON: {response.headers.get('content-type')}"
    body = json.loads(response.content)
    assert set(body) == {"error"}, f"error body keys {sorted(body)}"
    error = body["error"]
    assert set(error) <= {"code", "message", "details"} and isinstance(error.get("message"), str), error
    assert error.get("code") in ERROR_CODES[status], f"code {error.get('code')!r} is not documented for {status}"
    return None
