"""The HTTP edge of errors: every domain error (`service.domain_errors`) is sent with the
status `HTTP_ERRORS` gives its class, as JSON `{"error": {"code": ..., "message": ...}}`
(plus `details`, an object of figures, where an error has them: 413 `clip_too_large`).

Codes are the contract with clients (`service.client` maps them back to exceptions);
messages are for humans. Bad input never reaches a 500: body parsers, the session service
and the routes raise domain errors. Anything else that escapes a handler (a `ValueError`
from inside the model included) is a bug: logged, and answered 500 `internal_error`.
`ERROR_CODES` lists every code by status; the OpenAPI's error schemas (`error_responses`)
enumerate them, so a client (or a fuzzer) can check any error answer against it.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .domain_errors import (BadParameter, ClientGone, Conflict, InvalidApiKey, InvalidInput, MissingApiKey, NotFound,
                            Overloaded, SeqOutOfOrder, ServiceError, Timeout, TooLarge, Unavailable,
                            UnsupportedFormat)
from .wire import EXPECTED_SEQ_HEADER

log = logging.getLogger("cdt.service")

# Each domain error's status, and every code it (or a subclass) may carry.
HTTP_ERRORS: dict[type[ServiceError], tuple[int, tuple[str, ...]]] = {
    BadParameter: (400, ("bad_parameter", "empty_body")),
    MissingApiKey: (401, ("missing_api_key",)),
    InvalidApiKey: (403, ("invalid_api_key",)),
    NotFound: (404, ("not_found", "session_not_found")),
    Conflict: (409, ("conflict", "model_mismatch", "seq_out_of_order", "session_finished")),
    TooLarge: (413, ("payload_too_large", "clip_too_large", "session_log_too_large")),
    UnsupportedFormat: (415, ("unsupported_media_type",)),
    InvalidInput: (422, ("invalid_input", "invalid_tensor", "invalid_latents", "undecodable_video",
                         "video_too_small", "too_few_frames", "chunk_shape_mismatch", "empty_session")),
    Overloaded: (429, ("overloaded", "too_many_sessions")),
    ClientGone: (499, ("client_closed_request",)),  # nginx's: nobody reads this answer
    Unavailable: (503, ("unavailable", "not_ready", "shutting_down", "queue_timeout", "session_store_unavailable")),
    Timeout: (504, ("timeout", "compute_timeout")),
}
INTERNAL_ERROR = 500
# Framework-raised statuses (a body that does not parse, unknown route, wrong method) get codes
# in the same scheme.
_FRAMEWORK_CODES = {400: "bad_parameter", 404: "not_found", 405: "method_not_allowed"}


def _codes_by_status() -> dict[int, tuple[str, ...]]:
    codes = {status: names for status, names in HTTP_ERRORS.values() if status != 499}
    for status, code in _FRAMEWORK_CODES.items():
        codes[status] = tuple(dict.fromkeys((*codes.get(status, ()), code)))
    return dict(sorted(codes.items()))


# Every code an error answer may carry, by status (499's answer reaches nobody: not listed).
ERROR_CODES: dict[int, tuple[str, ...]] = _codes_by_status()


def http_error(cls: type[ServiceError]) -> tuple[int, tuple[str, ...]]:
    """The status and codes of the nearest of `cls` and its bases that HTTP_ERRORS lists (a 500
    for none: a domain error without a row is a bug)."""
    return next((HTTP_ERRORS[c] for c in cls.__mro__ if c in HTTP_ERRORS), (INTERNAL_ERROR, (ServiceError.code,)))


def headers_of(exc: ServiceError) -> dict[str, str]:
    """The headers that carry an error's figures."""
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, MissingApiKey):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, SeqOutOfOrder) and exc.expected_seq is not None:
        headers[EXPECTED_SEQ_HEADER] = str(exc.expected_seq)
    return headers


class ErrorInfo(BaseModel):
    code: str = Field(description="stable and machine-readable: the contract with clients")
    message: str = Field(description="for humans")
    details: dict[str, Any] | None = Field(None, description="figures behind the message, where the error has "
                                           "them (413 `clip_too_large` from the memory estimate)")


class ErrorBody(BaseModel):
    error: ErrorInfo


def _error_model(status: int) -> type[ErrorBody]:
    """The error body at `status`, its code one of those listed for it."""
    info = create_model(f"Error{status}Info", __base__=ErrorInfo, code=(Literal[ERROR_CODES[status]], ...))
    return create_model(f"Error{status}", __base__=ErrorBody, error=(info, ...))


ERROR_MODELS = {status: _error_model(status) for status in ERROR_CODES}


def error_responses(described: dict[int, str], headers: dict[int, dict] | None = None) -> dict[int, dict]:
    """OpenAPI `responses` of a route's errors: status -> when it happens (and its headers)."""
    return {status: {"model": ERROR_MODELS[status], "description": text,
                     **({"headers": headers[status]} if headers and status in headers else {})}
            for status, text in described.items()}


def error_body(code: str, message: str, details: dict | None = None) -> dict:
    return {"error": {"code": code, "message": message, **({"details": details} if details else {})}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   details: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def allowed_methods(request: Request) -> str:
    """The Allow header of a path: the methods of every route at it (Starlette's 405 names only
    those of the first route that matched the path)."""
    methods = {method for route in request.app.router.routes if route.matches(request.scope)[0] != Match.NONE
               for method in getattr(route, "methods", None) or ()}
    return ", ".join(sorted(methods))


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(http_error(type(exc))[0], exc.code, exc.message, headers_of(exc), exc.details)

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return error_response(400, BadParameter.code, problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = {**(exc.headers or {}), **({"Allow": allowed_methods(request)} if exc.status_code == 405 else {})}
        return error_response(exc.status_code, _FRAMEWORK_CODES.get(exc.status_code, "http_error"), str(exc.detail),
                              headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(INTERNAL_ERROR, ServiceError.code, f"internal error ({type(exc).__name__})")
