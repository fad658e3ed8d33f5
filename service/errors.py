"""Service errors: each has an HTTP status and a stable machine-readable code, and is
sent as JSON `{"error": {"code": ..., "message": ...}}` by the handlers installed here
(plus `details`, an object of figures, where an error has them: 413 `clip_too_large`).

Codes are the contract with clients (`service.client` maps them back to exceptions);
messages are for humans. Bad input never reaches a 500: body parsers and routes raise one
of these, and model-side ValueErrors are wrapped as `InvalidInput` at the hand-off.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def error_body(code: str, message: str, details: dict | None = None) -> dict:
    return {"error": {"code": code, "message": message, **({"details": details} if details else {})}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   details: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


# Framework-raised statuses (unknown route, wrong method) get codes in the same scheme.
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


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
        return error_response(exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail),
                              exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, ServiceError.code, f"internal error ({type(exc).__name__})")
