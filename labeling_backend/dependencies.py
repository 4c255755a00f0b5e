"""What the endpoints depend on: the backend's state, and the caller's credentials."""

from __future__ import annotations

from fastapi import Request

from labeling_backend.app import BackendState
from labeling_backend.auth import check_authorization


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
