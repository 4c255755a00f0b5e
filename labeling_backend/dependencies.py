"""What the endpoints depend on: the backend's state, the caller's credentials, and request bodies read
off the event loop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio.to_thread
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from labeling_backend.auth import check_authorization
from labeling_backend.state import BackendState

M = TypeVar("M", bound=BaseModel)


class AuthError(Exception):
    """The request's credentials are missing or wrong; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def get_state(request: Request) -> BackendState:
    """The app's :class:`BackendState`."""
    return request.app.state.backend


def require_auth(request: Request) -> None:
    """Refuse a request without valid credentials (when authentication is configured)."""
    reason = check_authorization(request.headers.get("authorization"), get_state(request).settings.backend)
    if reason is not None:
        raise AuthError(reason)


def metrics_auth(request: Request) -> None:
    """``/metrics`` is open with ``GROUNDLABEL_METRICS_PUBLIC=true``, else like every other endpoint."""
    if not get_state(request).settings.backend.metrics_public:
        require_auth(request)


def json_body(model: type[M]) -> Callable[[Request], Awaitable[M]]:
    """A dependency giving the request's JSON body as a ``model``, decoded and validated on a worker
    thread: the event loop only collects the body's chunks, so a 50 MB body never stalls ``/health``.
    A malformed body raises :class:`RequestValidationError` (422), located under ``body`` as FastAPI's
    own validation does."""

    async def read(request: Request) -> M:
        if not is_json(request.headers.get("content-type")):  # as FastAPI's strict content type
            msg = "the body must be JSON (Content-Type: application/json)"
            raise RequestValidationError([{"type": "content_type", "loc": ("body",), "msg": msg}])
        chunks = [chunk async for chunk in request.stream()]
        return await anyio.to_thread.run_sync(parse_body, model, chunks)

    return read


def is_json(content_type: str | None) -> bool:
    """Whether a ``Content-Type`` announces JSON (``application/json`` or ``application/*+json``)."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def parse_body(model: type[M], chunks: list[bytes]) -> M:
    """``model`` from the JSON text in ``chunks`` (on the calling thread)."""
    try:
        return model.model_validate_json(b"".join(chunks))
    except ValidationError as exc:
        found = exc.errors(include_input=False, include_url=False)
        errors: list[dict[str, Any]] = [{**e, "loc": ("body", *e.get("loc", ()))} for e in found]
        raise RequestValidationError(errors) from None
