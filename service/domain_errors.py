"""What can go wrong for a caller, in the service's own terms: each error carries a stable,
machine-readable `code` and a message for humans, and knows nothing of HTTP.

Body parsing, the session service, the worker pool and memory admission raise these; the
HTTP edge (`service.errors`) maps each class to its status, and its figures (a retry delay,
the seq a session expects) to headers. A `ValueError` from inside the model is none of
these: it is a bug, answered as a logged 500.
"""

from __future__ import annotations


class ServiceError(Exception):
    """An error the caller can act on; `code` defaults to its class's."""

    code = "internal_error"

    def __init__(self, message: str, code: str | None = None, details: dict | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.details = details  # machine-readable figures behind the message, when there are any
        self.retry_after_s = retry_after_s  # when a retry may succeed, if that is known


class BadParameter(ServiceError):
    """A parameter out of its bounds, or an empty body."""

    code = "bad_parameter"


class MissingApiKey(ServiceError):
    code = "missing_api_key"


class InvalidApiKey(ServiceError):
    code = "invalid_api_key"


class NotFound(ServiceError):
    code = "not_found"


class Conflict(ServiceError):
    """The request does not fit the state it addresses (another model, a finished session)."""

    code = "conflict"


class SeqOutOfOrder(Conflict):
    """A session chunk other than the one the session expects next."""

    code = "seq_out_of_order"

    def __init__(self, message: str, expected_seq: int | None = None) -> None:
        super().__init__(message)
        self.expected_seq = expected_seq  # None when a race, not the sender, moved the session on


class TooLarge(ServiceError):
    """Over a size limit: the upload, the clip, a session's log, or the memory budget."""

    code = "payload_too_large"


class UnsupportedFormat(ServiceError):
    """A body whose format is not taken here, or whose bytes contradict its declared type."""

    code = "unsupported_media_type"


class InvalidInput(ServiceError):
    """A well-formed request whose content the model cannot take (undecodable, wrong shape)."""

    code = "invalid_input"


class ClientGone(ServiceError):
    """The client went away before the answer; nobody reads it."""

    code = "client_closed_request"


class Overloaded(ServiceError):
    """No room for the request now; it may succeed after `retry_after_s`."""

    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int, code: str | None = None) -> None:
        super().__init__(message, code=code, retry_after_s=retry_after_s)


class Unavailable(ServiceError):
    """The service cannot serve now: not ready, shutting down, no slot in time, store down."""

    code = "unavailable"


class Timeout(ServiceError):
    """A model job ran over its time."""

    code = "timeout"


class DeviceOutOfMemory(Unavailable):
    """The device could not allocate a job's memory; it goes on serving, so a retry may fit."""

    code = "device_out_of_memory"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


class DeviceFailed(Unavailable):
    """The device failed (a fatal accelerator error): it takes no more jobs."""

    code = "device_failed"
