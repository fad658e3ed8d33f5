"""API keys: `Authorization: Bearer <key>` when CDT_API_KEYS is set; off otherwise.

`principal` gives the caller's principal, an opaque id derived from the key (never the key
itself), which sessions use to scope what each caller may see; `deps.Owner` is the routes'
dependency on it.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .callers import ANONYMOUS
from .domain_errors import InvalidApiKey, MissingApiKey
from .errors import error_responses

BEARER = HTTPBearer(auto_error=False, description="one of the keys in CDT_API_KEYS (when set)")

# The errors of every route that depends on the caller's key.
AUTH_ERRORS = error_responses(
    {401: "`missing_api_key`: keys are configured and the request sends none",
     403: "`invalid_api_key`: the key sent is not one of CDT_API_KEYS"},
    headers={401: {"WWW-Authenticate": {"description": "`Bearer`", "required": True, "schema": {"type": "string"}}}})


def principal_of(key: str) -> str:
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


def key_matches(candidate: str, keys: tuple[str, ...]) -> bool:
    """Constant-time per key, and every key is compared, so timing reveals nothing."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate.encode(), key.encode())
    return found


def principal(credentials: HTTPAuthorizationCredentials | None, keys: tuple[str, ...]) -> str:
    """The caller's principal: ANONYMOUS when no keys are configured, else its key's."""
    if not keys:
        return ANONYMOUS
    if credentials is None:
        raise MissingApiKey("this endpoint needs an API key: send 'Authorization: Bearer <key>'")
    if not key_matches(credentials.credentials, keys):
        raise InvalidApiKey("the API key is not valid")
    return principal_of(credentials.credentials)
