"""The HTTP edge of errors: every domain error (`service.domain_errors`) is sent with the
status `HTTP_STATUS` gives its class, as JSON `{"error": {"code": ..., "message": ...}}`
(plus `details`, an object of figures, where an error has them: 413 `clip_too_large`).

Codes are the contract with clients (`cdt_client.client` maps them back to exceptions);
messages are for humans. Bad input never reaches a 500: body parsers, the session service
and the routes raise domain errors. Anything else that escapes a handler (a `ValueError`
from inside the model included) is a bug: logged, and answered 500 `internal_error`.
`ERROR_CODES` (`cdt_client.formats.api`, shared with the client) lists every code by status;
the OpenAPI's error schemas (`error_responses`) enumerate them, so a client (or a fuzzer) can
check any error answer against it.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from cdt_client.formats.api import ERROR_CODES, EXPECTED_SEQ_HEADER
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .domain_errors import (BadParameter, ClientGone, Conflict, InvalidApiKey, InvalidInput, MissingApiKey, NotFound,
                            Overloaded, SeqOutOfOrder, ServiceError, Timeout, TooLarge, Unavailable,
                            UnsupportedFormat)

log = logging.getLogger("cdt.service")

# Each domain error's status; the codes an answer of a status may carry are ERROR_CODES'
# (`cdt_client.formats.api`, the list clients share).
HTTP_STATUS: dict[type[ServiceError], int] = {
    BadParameter: 400, MissingApiKey: 401, InvalidApiKey: 403, NotFound: 404, Conflict: 409, TooLarge: 413,
    UnsupportedFormat: 415, InvalidInput: 422, Overloaded: 429,
    ClientGone: 499,  # nginx's: nobody reads this answer, so ERROR_CODES does not list it
    Unavailable: 503, Timeout: 504,
}
INTERNAL_ERROR = 500
# Framework-raised statuses (a body that does not parse, unknown route, wrong method) get codes
# in the same scheme.
_FRAMEWORK_CODES = {400: "bad_parameter", 404: "not_found", 405: "method_not_allowed"}


def http_status(cls: type[ServiceError]) -> int:
    """The status of the nearest of `cls` and its bases that HTTP_STATUS lists (500 for none: a
    domain error without a row is a bug)."""
    return next((HTTP_STATUS[c] for c in cls.__mro__ if c in HTTP_STATUS), INTERNAL_ERROR)


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
        return error_response(http_status(type(exc)), exc.code, exc.message, headers_of(exc), exc.details)

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
