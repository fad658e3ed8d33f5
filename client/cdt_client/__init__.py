"""Python client of the CDT video-tokenizer service, and the formats it shares with it.

    from cdt_client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        latents = client.encode_file("clip.mp4", frames=17)

`cdt_client.client` holds the clients and their errors, `cdt_client.retry` the retry policy,
`cdt_client.formats` the wire and file formats. The names below load on first use, so the
server, which imports `cdt_client.formats`, does not load the HTTP client with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .client import AsyncClient, Client, ServiceError
    from .retry import NO_RETRY, Retrying

__all__ = ["NO_RETRY", "AsyncClient", "Client", "Retrying", "ServiceError"]
_HOMES = {"AsyncClient": "client", "Client": "client", "ServiceError": "client", "NO_RETRY": "retry",
          "Retrying": "retry"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'cdt_client' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
