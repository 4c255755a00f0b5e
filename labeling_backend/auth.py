"""Request authentication: HTTP basic auth or a bearer token.

Credentials are compared with :func:`hmac.compare_digest`. When neither ``BASIC_AUTH_USER`` /
``BASIC_AUTH_PASS`` nor ``GROUNDLABEL_API_TOKEN`` is set, the service is open (a warning is logged at
start). When both are set, either one is accepted.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from groundlabel.settings import BackendSettings


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def check_authorization(header: str | None, settings: BackendSettings) -> str | None:
    """None when the ``Authorization`` header is acceptable, else the reason it is refused."""
    if not settings.auth_enabled:
        return None
    if not header:
        return "credentials required (HTTP basic auth or a bearer token)"
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    scheme = scheme.lower()
    if scheme == "basic" and settings.basic_auth_user and settings.basic_auth_pass:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return "malformed basic auth credentials"
        user, sep, password = decoded.partition(":")
        # Compare both fields every time so that timing does not tell which one was wrong.
        ok_user = _equal(user, settings.basic_auth_user)
        ok_pass = _equal(password, settings.basic_auth_pass)
        return None if (sep and ok_user and ok_pass) else "wrong user name or password"
    if scheme in ("bearer", "token") and settings.api_token:
        return None if _equal(value, settings.api_token) else "wrong token"
    accepted = []
    if settings.basic_auth_user:
        accepted.append("Basic")
    if settings.api_token:
        accepted.append("Bearer")
    return f"unsupported authorization scheme; use {' or '.join(accepted)}"


def www_authenticate(settings: BackendSettings) -> str:
    """The ``WWW-Authenticate`` header of a 401 answer."""
    if settings.basic_auth_user:
        return 'Basic realm="groundlabel"'
    return 'Bearer realm="groundlabel"'
