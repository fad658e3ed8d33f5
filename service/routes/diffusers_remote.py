"""`/v1/diffusers/decode` and `/v1/diffusers/encode`: the request and response shapes of
diffusers' remote VAE helpers (`diffusers.utils.remote_utils.remote_decode` and
`remote_encode`), so code written for Hugging Face's hybrid-inference endpoints can point
them at this service:

    remote_decode(f"{url}/v1/diffusers/decode?steps=2&seed=0", latents, output_type="mp4")

Requests: the tensor's raw bytes (C order) as the body, its `shape` (repeated) and `dtype`
(float32, float16, bfloat16) as query parameters, with diffusers' `output_type`,
`partial_postprocess`, `image_format`, `scaling_factor` and `shift_factor`; our `steps` and
`seed` ride in the endpoint's own query string. `remote_encode` also sends a PNG image
(no shape). Answers: a tensor's raw bytes with `shape` (JSON) and `dtype` headers, an mp4,
or an image; errors are our JSON error shape, which remote_utils raises as RuntimeError.

Latents are CDT's (1,16,T,h,w) as /v1/encode writes them (a 4-D (1,16,h,w) is one latent
frame). CDT's latents need no normalisation: its scaling_factor is 1 and shift_factor 0.
When a request carries diffusers' factors they are undone as diffusers' pipelines apply
them (decode: z / scaling_factor + shift_factor; encode: (z - shift_factor) *
scaling_factor). These latents carry no original size, so T latent frames decode to
1+t(T-1) frames of 8h x 8w, the padded clip (t the model's temporal factor, 4 for a 4x
model). `model=` names the served model (GET /v1/models), as on /v1/encode.

The answer is assembled in memory, like /v1/frames: the limits on frames and sides bound it.
"""

from __future__ import annotations

import io
import json
import math
from typing import Annotated, Iterator, Literal

import av
import numpy as np
import torch
from fastapi import APIRouter, Depends, Query, Request, Response

from media import decode_chunk_length, decode_chunks, encode_chunks, frames_to_tensor, latents_info, tensor_to_frames
from model import LATENT_CHANNELS, SPACE_FACTOR

from ..auth import AUTH_ERRORS
from ..bodies import DEFAULT_FPS, MP4, Limits, check_min_side
from ..catalog import ServedModel
from ..deps import LimitsDep, MetricsDep, ModelDep, Owner, PoolDep, SeedQuery, SettingsDep, StepsQuery, UploadDep, \
    require_api_key
from ..domain_errors import BadParameter, InvalidInput, TooLarge, UnsupportedFormat
from ..ops import admit, check_decode_steps, check_steps
from ..responses import render_frames
from .openapi import BINARY, model_request_errors

TENSOR_TYPE = "tensor/binary"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ANSWER_DTYPES = {torch.uint8: "uint8", **{v: k for k, v in DTYPES.items()}}
IMAGE_CODECS = {"png": ("png", "rgb24", "image/png"), "jpg": ("mjpeg", "yuvj420p", "image/jpeg")}

router = APIRouter(prefix="/v1/diffusers", tags=["diffusers remote VAE"], dependencies=[Depends(require_api_key)],
                   responses=AUTH_ERRORS)

_TENSOR_HEADERS = {"shape": {"description": "the tensor's shape as a JSON list", "schema": {"type": "string"}},
                   "dtype": {"description": "float32, float16, bfloat16 or uint8", "schema": {"type": "string"}}}
_ERRORS = model_request_errors({
    400: "`bad_parameter`: a query parameter out of its bounds, or a body that does not match shape and dtype; "
         "`empty_body`",
    415: "`unsupported_media_type`: a content type not listed here, or an image that is not PNG or JPEG",
    422: "`invalid_latents`, `invalid_tensor`, `undecodable_video`, `video_too_small`: latents or frames of the "
         "wrong shape, not finite or out of range",
})
Shape = Annotated[list[int] | None, Query(description="the body tensor's shape, one value per dimension")]
Dtype = Annotated[Literal["float32", "float16", "bfloat16"] | None, Query(description="the body tensor's dtype")]
Factor = Annotated[float | None, Query(description="diffusers' VAE normalisation, undone here (CDT's: 1 and 0)")]


@router.post(
    "/decode",
    summary="decode latents as diffusers' remote_decode sends them",
    response_class=Response,
    openapi_extra={"requestBody": {"required": True, "description": "latents' raw bytes (shape, dtype as query "
                                   "parameters)", "content": {TENSOR_TYPE: BINARY}}},
    responses={200: {"description": "output_type=pt: float (1,3,T,H,W) in [-1,1] in the latents' dtype, or with "
                                    "partial_postprocess uint8 (T,H,W,3); output_type=pil: float32 (T,3,H,W) in "
                                    "[0,1] (Accept tensor/binary, a video processor), else one frame as a "
                                    "png/jpg image; output_type=mp4: an mp4",
                     "headers": _TENSOR_HEADERS,
                     "content": {TENSOR_TYPE: BINARY, MP4: BINARY, "image/png": BINARY, "image/jpeg": BINARY}},
               **_ERRORS},
)
async def diffusers_decode(
    request: Request,
    upload: UploadDep,
    owner: Owner,
    limits: LimitsDep,
    settings: SettingsDep,
    pool: PoolDep,
    metrics: MetricsDep,
    served: ModelDep,
    shape: Shape = None,
    dtype: Dtype = None,
    output_type: Annotated[Literal["pt", "pil", "mp4"], Query(description="what the service answers")] = "pil",
    partial_postprocess: Annotated[bool, Query(description="output_type=pt: uint8 (T,H,W,3) frames")] = False,
    image_format: Annotated[Literal["png", "jpg"], Query(description="output_type=pil image format")] = "jpg",
    scaling_factor: Factor = None,
    shift_factor: Factor = None,
    steps: StepsQuery = 1,
    seed: SeedQuery = 0,
) -> Response:
    check_steps(steps, settings)
    if shape is None or dtype is None:
        raise BadParameter("remote decode needs the latents' shape and dtype as query parameters")
    latents = _tensor(await upload.in_memory(), shape, dtype)
    if latents.dim() == 4:
        latents = latents.unsqueeze(2)  # (1,16,h,w): one latent frame
    _check_latents(latents, limits, served)
    if scaling_factor is not None:
        latents = latents / scaling_factor
    if shift_factor is not None:
        latents = latents + shift_factor
    _check_finite(latents, "latents")
    model, model_hash = served.reference, served.content_hash
    t, h, w = latents.shape[2:]
    info = latents_info(model, model_hash, served.clip_frames(t), SPACE_FACTOR * h, SPACE_FACTOR * w, DEFAULT_FPS,
                        served.name)
    accept = request.headers.get("accept", "")
    _check_answer(info.frames, info.height, info.width, image=output_type == "pil" and TENSOR_TYPE not in accept,
                  limit=settings.max_upload_bytes)
    chunk, admission = await admit(pool, served, owner, "decode", info.height, info.width, steps)
    try:
        check_decode_steps(model, steps)
        parts = _chunks(latents, decode_chunk_length(served.reference, chunk))  # as /v1/decode cuts them
        decoded = decode_chunks(admission.model, model_hash, info, parts, steps, seed)
        videos = [v async for v in admission.stream("decode", decoded)]
    finally:
        admission.release()
    video = torch.cat(videos, dim=2)
    data, media_type, headers = await pool.host.run("render_diffusers", _decoded_answer, video, output_type,
                                                    partial_postprocess, image_format, accept, DTYPES[dtype])
    metrics.bytes_total.labels(request.scope["route"].path, "out").inc(len(data))
    return Response(data, media_type=media_type, headers=headers)


@router.post(
    "/encode",
    summary="encode frames or an image as diffusers' remote_encode sends them",
    response_class=Response,
    openapi_extra={"requestBody": {"required": True, "description": "float frames' raw bytes, (1,3,T,H,W) or an "
                                   "image's (1,3,H,W), in [-1,1] (shape, dtype as query parameters); or a "
                                   "PNG or JPEG image", "content": {t: BINARY for t in
                                                                    (TENSOR_TYPE, "image/png", "image/jpeg")}}},
    responses={200: {"description": "latents' raw bytes: (1,16,T',h,w), or (1,16,h,w) for an image, in the "
                                    "input's float dtype (float32 for an image file)",
                     "headers": _TENSOR_HEADERS, "content": {TENSOR_TYPE: BINARY}}, **_ERRORS},
)
async def diffusers_encode(
    request: Request,
    upload: UploadDep,
    owner: Owner,
    limits: LimitsDep,
    pool: PoolDep,
    metrics: MetricsDep,
    served: ModelDep,
    shape: Shape = None,
    dtype: Dtype = None,
    scaling_factor: Factor = None,
    shift_factor: Factor = None,
) -> Response:
    body = await upload.in_memory()
    if shape is None:
        video, image, answer_dtype = await pool.host.run("open_image", _image_frames, body), True, torch.float32
    else:
        if dtype is None:
            raise BadParameter("a tensor body needs its dtype as a query parameter")
        video, image, answer_dtype = _tensor(body, shape, dtype), len(shape) == 4, DTYPES[dtype]
        if image:
            video = video.unsqueeze(2)
    _check_frames(video, limits)
    chunk, admission = await admit(pool, served, owner, "encode", *video.shape[3:])
    try:
        parts = _chunks(video, chunk)
        parts = encode_chunks(admission.model, served.content_hash, parts)
        latents = [z async for z in admission.stream("encode", parts)]
    finally:
        admission.release()
    latents = torch.cat(latents, dim=2)
    if shift_factor is not None:
        latents = latents - shift_factor
    if scaling_factor is not None:
        latents = latents * scaling_factor
    if image:
        latents = latents[:, :, 0]
    data, headers = _tensor_answer(latents.to(answer_dtype))
    metrics.bytes_total.labels(request.scope["route"].path, "out").inc(len(data))
    return Response(data, media_type=TENSOR_TYPE, headers=headers)


def _tensor(body: bytes, shape: list[int], dtype: str) -> torch.Tensor:
    """The body as a float32 tensor of `shape` stored as `dtype`."""
    torch_dtype = DTYPES[dtype]
    if not 1 <= len(shape) <= 8 or min(shape) < 1:
        raise BadParameter(f"shape {shape} is not a tensor's shape")
    expected = math.prod(shape) * torch_dtype.itemsize
    if len(body) != expected:
        raise BadParameter(f"the body has {len(body)} bytes; shape {shape} of {dtype} needs {expected}")
    return torch.frombuffer(bytearray(body), dtype=torch_dtype).reshape(shape).float()


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise InvalidInput(f"{what} contain NaN or infinite values", code="invalid_latents" if what == "latents"
                           else "invalid_tensor")


def _check_latents(latents: torch.Tensor, limits: Limits, served: ServedModel) -> None:
    if latents.dim() != 5 or latents.shape[:2] != (1, LATENT_CHANNELS):
        raise InvalidInput(f"latents must be (1,{LATENT_CHANNELS},T,h,w) or (1,{LATENT_CHANNELS},h,w), got "
                           f"{tuple(latents.shape)} (packed latents are not served)", code="invalid_latents")
    t, h, w = latents.shape[2:]
    frames, height, width = served.clip_frames(t), SPACE_FACTOR * h, SPACE_FACTOR * w
    if not limits.fit(frames, height, width):
        raise TooLarge(f"the latents decode to {frames} frames of {height}x{width}; the limits are "
                       f"{limits.max_frames} frames and {limits.max_side} pixels a side", code="clip_too_large")
    _check_finite(latents, "latents")


def _check_frames(video: torch.Tensor, limits: Limits) -> None:
    if video.dim() != 5 or video.shape[:2] != (1, 3):
        raise InvalidInput(f"frames must be (1,3,T,H,W) or an image (1,3,H,W), got {tuple(video.shape)}",
                           code="invalid_tensor")
    t, h, w = video.shape[2:]
    if not limits.fit(t, h, w):
        raise TooLarge(f"{t} frames of {h}x{w}; the limits are {limits.max_frames} frames and "
                       f"{limits.max_side} pixels a side", code="clip_too_large")
    check_min_side(h, w)
    _check_finite(video, "frames")
    if video.abs().max() > 1:
        raise InvalidInput("float frames must be in [-1, 1]", code="invalid_tensor")


def _image_frames(body: bytes) -> torch.Tensor:
    """A PNG or JPEG image (remote_encode's PIL input) as one frame (1,3,1,H,W) in [-1,1]."""
    if not (body.startswith(b"\x89PNG\r\n\x1a\n") or body.startswith(b"\xff\xd8\xff")):
        raise UnsupportedFormat("send a PNG or JPEG image, or a tensor with shape and dtype parameters")
    try:
        with av.open(io.BytesIO(body)) as container:
            frame = next(container.decode(video=0))
            rgb = frame.to_ndarray(format="rgb24")
    except (av.FFmpegError, StopIteration) as exc:
        raise InvalidInput(f"the image does not decode ({exc})", code="undecodable_video") from None
    return frames_to_tensor(rgb[None])


def _tensor_answer(tensor: torch.Tensor) -> tuple[bytes, dict[str, str]]:
    """Raw C-order bytes, and the `shape`/`dtype` headers remote_utils rebuilds them from."""
    tensor = tensor.contiguous()
    data = tensor.view(torch.uint8).numpy().tobytes() if tensor.dtype == torch.bfloat16 else tensor.numpy().tobytes()
    return data, {"shape": json.dumps(list(tensor.shape)), "dtype": ANSWER_DTYPES[tensor.dtype]}


def _decoded_answer(video: torch.Tensor, output_type: str, partial_postprocess: bool, image_format: str,
                    accept: str, dtype: torch.dtype) -> tuple[bytes, str, dict[str, str]]:
    """The body, media type and headers of a decode answer of `output_type` (see the route)."""
    if output_type == "mp4":
        data, media_type = render_frames(tensor_to_frames(video), DEFAULT_FPS, "mp4")
        return data, media_type, {}
    if output_type == "pt" and partial_postprocess:
        return _as_tensor_answer(torch.from_numpy(tensor_to_frames(video)))
    if output_type == "pt":
        return _as_tensor_answer(video.to(dtype))
    if TENSOR_TYPE in accept:
        # pil with a video processor: float32 frames in [0,1], channels first, which remote_utils
        # scales by 255 and rounds (float16 would move values across those rounding steps).
        return _as_tensor_answer(((video[0].transpose(0, 1) + 1) / 2).clamp(0, 1))
    return (*_image_answer(tensor_to_frames(video), image_format), {})


def _as_tensor_answer(tensor: torch.Tensor) -> tuple[bytes, str, dict[str, str]]:
    data, headers = _tensor_answer(tensor)
    return data, TENSOR_TYPE, headers


def _check_answer(frames: int, height: int, width: int, image: bool, limit: int) -> None:
    """Refuse, before any compute, an answer this endpoint cannot give: an image of several
    frames, or frames over `limit` bytes as float32 (the answer is assembled in memory;
    /v1/decode streams any length)."""
    if image and frames != 1:
        raise InvalidInput(f"an image answer holds one frame; these latents decode to {frames} (ask for "
                           "output_type=mp4 or pt)", code="invalid_input")
    nbytes = frames * height * width * 3 * 4
    if nbytes > limit:
        raise TooLarge(f"these latents decode to {frames} frames of {height}x{width}, {nbytes} bytes as "
                       f"float32, over this endpoint's answer limit of {limit} (CDT_MAX_UPLOAD_MB); "
                       "/v1/decode streams clips of any length", code="clip_too_large")


def _image_answer(frames: np.ndarray, image_format: str) -> tuple[bytes, str]:
    codec, pix_fmt, media_type = IMAGE_CODECS[image_format]
    context = av.CodecContext.create(codec, "w")
    context.width, context.height, context.pix_fmt, context.time_base = frames.shape[2], frames.shape[1], pix_fmt, 1
    frame = av.VideoFrame.from_ndarray(frames[0], format="rgb24").reformat(format=pix_fmt)
    return b"".join(bytes(p) for p in [*context.encode(frame), *context.encode(None)]), media_type


def _chunks(tensor: torch.Tensor, n: int) -> Iterator[torch.Tensor]:
    """Successive slices of at most `n` along time."""
    return (tensor[:, :, i : i + n] for i in range(0, tensor.shape[2], n))
