"""The door: credentials and the body-size cap, checked before a request body is read.

FastAPI reads and parses a body before any dependency runs, so a check there comes too late: a 400 MB
body without credentials would be read and parsed first. :class:`Guard` is an ASGI middleware in front of
every path and method: it refuses a request without valid credentials (401; every path but the open ones,
``/health`` and ``/``) or with a declared ``Content-Length`` over the cap (413) at once, from its headers.
The cap is ``GROUNDLABEL_MAX_BODY_BYTES``, and 0 for the open paths, whose handlers read no body. A body
without a declared length (chunked) is read here, and refused (413) as soon as it passes the cap.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from groundlabel.settings import BackendSettings
from labeling_backend.auth import check_authorization, www_authenticate

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Paths anyone may call; they take no body (their handlers read none).
OPEN_PATHS = frozenset({"/health", "/"})


def too_large_text(limit: int, path: str | None = None) -> str:
    """The reason of a 413 answer (``limit`` 0: ``path`` takes no body)."""
    if not limit:
        return f"{path or 'this path'} takes no request body"
    return f"the request body is larger than {limit} bytes (GROUNDLABEL_MAX_BODY_BYTES)"


class Guard:
    """ASGI middleware: authentication and the body cap, from the headers, before the body is read."""

    def __init__(self, app: ASGIApp, settings: BackendSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        path = scope.get("path")
        is_open = path in OPEN_PATHS
        if not is_open and not (path == "/metrics" and self.settings.metrics_public):
            reason = check_authorization(headers.get("authorization"), self.settings)
            if reason is not None:
                extra = {"www-authenticate": www_authenticate(self.settings)}
                await _answer(send, 401, reason, extra)
                return
        limit = 0 if is_open else self.settings.max_body_bytes
        declared = headers.get("content-length", "").strip()
        if declared.isdigit():
            if int(declared) > limit:
                await _answer(send, 413, too_large_text(limit, path))
                return
            await self.app(scope, receive, send)  # the server delivers no more than the declared length
            return
        messages: list[Message] = []
        size = 0
        while True:  # no declared length: read the body here, up to the cap
            message = await receive()
            messages.append(message)
            if message.get("type") != "http.request":
                break
            size += len(message.get("body") or b"")
            if size > limit:
                await _answer(send, 413, too_large_text(limit, path))
                return
            if not message.get("more_body"):
                break
        await self.app(scope, _replay(messages, receive), send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """``receive`` that first hands out ``messages``, then reads on."""
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay


async def _answer(send: Send, status: int, detail: str, extra: dict[str, str] | None = None) -> None:
    """A JSON error answer; the connection is closed since the body was not read."""
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
