"""Python client of the service (httpx), sync and async, with typed errors.

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        latents = client.encode_file("clip.mp4", frames=17)
        video = client.decode_file("clip.safetensors", output="out.mp4", seed=0)

Long videos stream through a session, chunk by chunk:

        latents = client.stream_encode("long.mp4", chunk_frames=16)
        frames = client.stream_decode(latents, chunk_latents=4, seed=0)

The client needs only httpx, numpy and safetensors (no torch; PyAV, the `video` extra, only
to read frames from a video file in `stream_encode`).

Every call retries connection errors and 429/502/503/504 answers with backoff, honouring
Retry-After, where a repeat is safe (`cdt_client.retry`; `retry=` sets the policy,
`NO_RETRY` turns it off). An error answer left after that becomes a `ServiceError` subclass
chosen by status, carrying the service's error `code` (one of `formats.api.ERROR_CODES`) and
`message` (`Overloaded` also carries `retry_after`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np

from .formats.api import NPY, SAFETENSORS
from .retry import Retrying
from .streaming import (
    assemble_latents,
    chunk_info,
    concat_frames,
    decode_session_spec,
    frame_chunks,
    latent_chunks,
    model_named_by,
    npy_array,
    npy_body,
    read_latents,
    session_model,
)

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_FPS = 30.0  # recorded for streamed frames that carry no rate, as /v1/encode does
_CONTENT_TYPES = {".npy": NPY, ".safetensors": SAFETENSORS,
                  ".mp4": "video/mp4", ".webm": "video/webm", ".avi": "video/x-msvideo", ".mkv": "video/x-matroska",
                  ".mov": "video/quicktime"}


class ServiceError(Exception):
    """An error answer of the service."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class BadRequest(ServiceError): ...            # 400
class Unauthorized(ServiceError): ...          # 401
class Forbidden(ServiceError): ...             # 403
class NotFound(ServiceError): ...              # 404
class Conflict(ServiceError): ...              # 409, e.g. model_mismatch
class PayloadTooLarge(ServiceError): ...       # 413
class UnsupportedMedia(ServiceError): ...      # 415
class InvalidInput(ServiceError): ...          # 422


class Overloaded(ServiceError):                # 429
    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(status, code, message)
        self.retry_after = retry_after


class Unavailable(ServiceError): ...           # 503
class Timeout(ServiceError): ...               # 504


_BY_STATUS: dict[int, type[ServiceError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: PayloadTooLarge,
    415: UnsupportedMedia, 422: InvalidInput, 429: Overloaded, 503: Unavailable, 504: Timeout,
}


def raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:200]
    cls = _BY_STATUS.get(response.status_code, ServiceError)
    if cls is Overloaded:
        retry = response.headers.get("retry-after")
        raise Overloaded(response.status_code, code, message, float(retry) if retry else None)
    raise cls(response.status_code, code, message)


def content_type(path: Path) -> str:
    return _CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")


def _params(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _encode_request(path: str | Path, frames, size, fps, format, model) -> dict:
    path = Path(path)
    return {"url": "/v1/encode", "content": path.read_bytes(), "headers": {"content-type": content_type(path)},
            "params": _params(frames=frames, size=size, fps=fps, format=format, model=model)}


def _decode_request(path: str | Path, steps, seed, format, model) -> dict:
    return {"url": "/v1/decode", "content": Path(path).read_bytes(),
            "headers": {"content-type": SAFETENSORS},
            "params": _params(steps=steps, seed=seed, format=format, model=model)}


def _result(response: httpx.Response, output: str | Path | None) -> bytes:
    raise_for_error(response)
    if output is not None:
        Path(output).write_bytes(response.content)
    return response.content


def _decode_format(output: str | Path | None, format: str | None) -> str:
    """The output's suffix picks the format unless one is given."""
    if format is None and output is not None:
        return {".npy": "npy", ".safetensors": "safetensors"}.get(Path(output).suffix.lower(), "mp4")
    return format or "mp4"


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Client:
    """Blocking client. `encode_file`/`decode_file` return the response body and also
    write it to `output` when given. `model=` names the served model (`models()`) a call
    uses; None: the service's default, or, decoding a latents file, the model that made it
    when the service serves it."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 transport: httpx.BaseTransport | None = None, retry: Retrying | None = None) -> None:
        self._http = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport)
        self.retry = retry or Retrying()

    def encode_file(self, path: str | Path, output: str | Path | None = None, *, frames: int | None = None,
                    size: int | None = None, fps: float | None = None, format: str = "safetensors",
                    model: str | None = None) -> bytes:
        request = _encode_request(path, frames, size, fps, format, model)
        return _result(self.retry.send(lambda: self._http.post(**request)), output)

    def decode_file(self, path: str | Path, output: str | Path | None = None, *, steps: int = 1, seed: int = 0,
                    format: str | None = None, model: str | None = None) -> bytes:
        request = _decode_request(path, steps, seed, _decode_format(output, format), model)
        return _result(self.retry.send(lambda: self._http.post(**request)), output)

    def models(self) -> list[dict]:
        response = self.retry.send(lambda: self._http.get("/v1/models"))
        raise_for_error(response)
        return response.json()["models"]

    def ready(self) -> bool:
        return self._http.get("/readyz").is_success

    # --- streaming sessions ---------------------------------------------------------------
    def _session(self, spec: dict) -> str:
        response = self.retry.send(lambda: self._http.post("/v1/sessions", json=spec), idempotent=False)
        raise_for_error(response)
        return response.json()["id"]

    def _post(self, url: str, **request: Any) -> httpx.Response:
        """A chunk or a finish: repeated as it is (same seq) until answered."""
        response = self.retry.send(lambda: self._http.post(url, **request))
        raise_for_error(response)
        return response

    def _push(self, sid: str, seq: int, chunk: np.ndarray, params: dict) -> httpx.Response:
        return self._post(f"/v1/sessions/{sid}/chunks/{seq}", content=npy_body(chunk), params=params,
                          headers={"content-type": NPY})

    def stream_encode(self, source: str | Path | np.ndarray, chunk_frames: int = 16, *,
                      fps: float | None = None, model: str | None = None) -> bytes:
        """Encode uint8 (T,H,W,3) frames or a video file (decoded lazily, chunk by chunk;
        needs PyAV) through an encode session; returns a latents file, as /v1/encode would."""
        chunks, source_fps = frame_chunks(source, chunk_frames)
        sid = self._session({"kind": "encode", **_params(model=model)})
        parts = [read_latents(self._push(sid, seq, chunk, {}).content) for seq, chunk in enumerate(chunks)]
        finish = self._post(f"/v1/sessions/{sid}/finish")
        parts.append(read_latents(finish.content))
        info = chunk_info(finish)
        return assemble_latents(parts, info, session_model(self.models(), info), fps or source_fps or DEFAULT_FPS)

    def stream_decode(self, latents: str | Path | bytes | np.ndarray, chunk_latents: int = 2, *, steps: int = 1,
                      seed: int = 0, model: str | None = None) -> np.ndarray:
        """Decode a latents file (path or bytes) or a float (1,16,T,h,w) array through a
        decode session; returns uint8 (T,H,W,3) frames, cropped to the original size when
        the file records it."""
        array, spec, made_by = decode_session_spec(latents, steps, seed, model)
        sid = self._session(model_named_by(self.models(), spec, made_by) if made_by else spec)
        parts = [npy_array(self._push(sid, seq, chunk, {"format": "npy"}).content)
                 for seq, chunk in enumerate(latent_chunks(array, chunk_latents))]
        self._post(f"/v1/sessions/{sid}/finish")
        return concat_frames(parts)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """The same calls as `Client`, awaitable."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 transport: httpx.AsyncBaseTransport | None = None, retry: Retrying | None = None) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, headers=_headers(api_key), timeout=timeout,
                                       transport=transport)
        self.retry = retry or Retrying()

    async def encode_file(self, path: str | Path, output: str | Path | None = None, *, frames: int | None = None,
                          size: int | None = None, fps: float | None = None, format: str = "safetensors",
                    model: str | None = None) -> bytes:
        request = _encode_request(path, frames, size, fps, format, model)
        return _result(await self.retry.send_async(lambda: self._http.post(**request)), output)

    async def decode_file(self, path: str | Path, output: str | Path | None = None, *, steps: int = 1, seed: int = 0,
                          format: str | None = None, model: str | None = None) -> bytes:
        request = _decode_request(path, steps, seed, _decode_format(output, format), model)
        return _result(await self.retry.send_async(lambda: self._http.post(**request)), output)

    async def models(self) -> list[dict]:
        response = await self.retry.send_async(lambda: self._http.get("/v1/models"))
        raise_for_error(response)
        return response.json()["models"]

    async def ready(self) -> bool:
        return (await self._http.get("/readyz")).is_success

    # --- streaming sessions ---------------------------------------------------------------
    async def _session(self, spec: dict) -> str:
        response = await self.retry.send_async(lambda: self._http.post("/v1/sessions", json=spec),
                                               idempotent=False)
        raise_for_error(response)
        return response.json()["id"]

    async def _post(self, url: str, **request: Any) -> httpx.Response:
        response = await self.retry.send_async(lambda: self._http.post(url, **request))
        raise_for_error(response)
        return response

    async def _push(self, sid: str, seq: int, chunk: np.ndarray, params: dict) -> httpx.Response:
        return await self._post(f"/v1/sessions/{sid}/chunks/{seq}", content=npy_body(chunk), params=params,
                                headers={"content-type": NPY})

    async def stream_encode(self, source: str | Path | np.ndarray, chunk_frames: int = 16, *,
                            fps: float | None = None, model: str | None = None) -> bytes:
        """`Client.stream_encode`, awaitable (a video file is decoded in this thread)."""
        chunks, source_fps = frame_chunks(source, chunk_frames)
        sid = await self._session({"kind": "encode", **_params(model=model)})
        parts = [read_latents((await self._push(sid, seq, chunk, {})).content) for seq, chunk in enumerate(chunks)]
        finish = await self._post(f"/v1/sessions/{sid}/finish")
        parts.append(read_latents(finish.content))
        info = chunk_info(finish)
        return assemble_latents(parts, info, session_model(await self.models(), info),
                                fps or source_fps or DEFAULT_FPS)

    async def stream_decode(self, latents: str | Path | bytes | np.ndarray, chunk_latents: int = 2, *,
                            steps: int = 1, seed: int = 0, model: str | None = None) -> np.ndarray:
        """`Client.stream_decode`, awaitable."""
        array, spec, made_by = decode_session_spec(latents, steps, seed, model)
        sid = await self._session(model_named_by(await self.models(), spec, made_by) if made_by else spec)
        parts = [npy_array((await self._push(sid, seq, chunk, {"format": "npy"})).content)
                 for seq, chunk in enumerate(latent_chunks(array, chunk_latents))]
        await self._post(f"/v1/sessions/{sid}/finish")
        return concat_frames(parts)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
