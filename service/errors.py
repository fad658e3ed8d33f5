"""Service errors: each has an HTTP status and a stable machine-readable code, and is
sent as JSON `{"error": {"code": ..., "message": ...}}` by the handlers installed here
(plus `details`, an object of figures, where an error has them: 413 `clip_too_large`).

Codes are the contract with clients (`cdt_client.client` maps answers back to exceptions);
messages are for humans. Bad input never reaches a 500: body parsers and routes raise one
of these, and model-side ValueErrors are wrapped as `InvalidInput` at the hand-off.
`ERROR_CODES` (`cdt_client.formats.api`, shared with the client) lists every code by status;
the OpenAPI's error schemas (`error_responses`) enumerate them, so a client (or a fuzzer)
can check any error answer against it.
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

from cdt_client.formats.api import ERROR_CODES

log = logging.getLogger("cdt.service")


class ServiceError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, code: str | None = None, headers: dict[str, str] | None = None,
                 details: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.headers = headers or {}
        self.details = details  # machine-readable figures behind the message, when there are any


class BadParameter(ServiceError):
    status, code = 400, "bad_parameter"


class MissingApiKey(ServiceError):
    status, code = 401, "missing_api_key"


class InvalidApiKey(ServiceError):
    status, code = 403, "invalid_api_key"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class UnsupportedMedia(ServiceError):
    status, code = 415, "unsupported_media_type"


class InvalidInput(ServiceError):
    """Well-formed request, content the model cannot take (undecodable, wrong shape/dtype)."""

    status, code = 422, "invalid_input"


class ClientClosedRequest(ServiceError):
    """The client went away before the answer (nginx's 499); nobody reads this response."""

    status, code = 499, "client_closed_request"


class Overloaded(ServiceError):
    status, code = 429, "overloaded"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class Unavailable(ServiceError):
    status, code = 503, "unavailable"


class GatewayTimeout(ServiceError):
    status, code = 504, "timeout"


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


# Framework-raised statuses (a body that does not parse, unknown route, wrong method) get codes
# in the same scheme.
_HTTP_CODES = {400: "bad_parameter", 404: "not_found", 405: "method_not_allowed"}


def allowed_methods(request: Request) -> str:
    """The Allow header of a path: the methods of every route at it (Starlette's 405 names only
    those of the first route that matched the path)."""
    methods = {method for route in request.app.router.routes if route.matches(request.scope)[0] != Match.NONE
               for method in getattr(route, "methods", None) or ()}
    return ", ".join(sorted(methods))


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers, exc.details)

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return error_response(400, BadParameter.code, problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = {**(exc.headers or {}), **({"Allow": allowed_methods(request)} if exc.status_code == 405 else {})}
        return error_response(exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail),
                              headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, ServiceError.code, f"internal error ({type(exc).__name__})")
