"""Who the server answers: ASGI middleware in front of every route.

- :class:`HostOriginGuard`: the ``Host`` header must name a loopback host, the bound address or an
  allowed host (a DNS-rebinding page names its own domain there); a browser request carrying an
  ``Origin`` must come from the server's own page or an allowed origin (another site's page may not post
  chat messages, even as ``no-cors`` text/plain). Both answer 403. Every response gets headers that keep
  the page from being framed or sniffed, and a content security policy that runs only the page's own files.
- :class:`ApiKeyGuard`: with an API key, every ``/v1`` route needs ``Authorization: Bearer KEY`` (401).

Cross-origin calls from allowed origins get CORS headers from Starlette's ``CORSMiddleware``, placed
between the two (a CORS preflight carries no Authorization header).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sinklora.serve.schemas import APIError
from sinklora.settings import is_loopback

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
]


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body().model_dump(), status_code=error.status, headers=error.headers)


def host_name(host_header: str) -> str:
    """``127.0.0.1:8000`` -> ``127.0.0.1``, ``[::1]:8000`` -> ``::1``, lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HostOriginGuard:
    """403 for a Host that is not ours or an Origin that is neither ours nor allowed; security headers on all."""

    def __init__(self, app: ASGIApp, *, bound_host: str, allowed_hosts: Iterable[str] = (),
                 allowed_origins: Iterable[str] = ()):
        self.app = app
        self.hosts = {host_name(h) for h in allowed_hosts} | {host_name(bound_host)}
        self.origins = {o.lower() for o in allowed_origins}

    def host_allowed(self, host_header: str) -> bool:
        name = host_name(host_header)
        return bool(name) and ("*" in self.hosts or is_loopback(name) or name in self.hosts)

    def origin_allowed(self, origin: str, host_header: str) -> bool:
        parts = urlsplit(origin.lower())
        same = parts.scheme in ("http", "https") and parts.netloc == host_header.strip().lower()
        return same or origin.lower() in self.origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host, origin = headers.get("host", ""), headers.get("origin")
        error = None
        if not self.host_allowed(host):
            error = APIError(403, f"Host {host!r} is not served here: use 127.0.0.1 or localhost, or start the "
                                  "server with this name in allowed_hosts", code="host_not_allowed")
        elif origin is not None and not self.origin_allowed(origin, host):
            error = APIError(403, f"cross-origin request from {origin!r} refused: start the server with this origin "
                                  "in allowed_origins to allow it", code="origin_not_allowed")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        if error is not None:
            await error_response(error)(scope, receive, send_with_headers)
        else:
            await self.app(scope, receive, send_with_headers)


class ApiKeyGuard:
    """401 for a ``/v1`` request without ``Authorization: Bearer KEY`` (compared in constant time)."""

    def __init__(self, app: ASGIApp, *, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' (OpenAI "
                                      "clients: api_key=KEY)", code="invalid_api_key",
                                 headers={"WWW-Authenticate": "Bearer"})
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)
