"""Fetching a task's image for a worker, safely.

Where an image URL leads, and with which credentials:

- ``/data/upload/...`` and other paths relative to Label Studio, and absolute URLs on the configured
  Label Studio's origin: downloaded from Label Studio with its token. A legacy token is sent as
  ``Authorization: Token ...``; a personal access token (a JWT refresh token) is exchanged at
  ``/api/token/refresh/`` for a short-lived access token, cached until shortly before it expires, and
  sent as ``Authorization: Bearer ...``.
- ``/data/local-files/?d=REL``: read from ``LOCAL_FILES_DOCUMENT_ROOT`` when the file exists there
  (a path leaving the root is refused), otherwise downloaded from Label Studio as above.
- ``s3://``, ``gs://``, ``azure-blob://`` URIs: Label Studio presigns them
  (``/tasks/{id}/presign/?fileuri=<base64>``, with the token) and redirects to the storage; the token
  never follows that redirect.
- plain ``http(s)://`` URLs: only from hosts listed in ``GROUNDLABEL_ALLOWED_HOSTS``. Host names are
  resolved first; private, loopback, link-local and other non-global addresses are refused unless the
  host is listed explicitly (not through a ``*`` or ``*.domain`` pattern). Redirects are followed by
  hand, each hop checked again.

Downloads stream with a byte limit and a total deadline, then go through
:func:`workers.images.decode_image` (RGB, EXIF orientation, pixel limits). Every failure raises
:class:`FetchError` naming the URL (without credentials or query secrets) and the reason. Tokens are
never logged nor put in error messages.
"""

from __future__ import annotations

import base64
import dataclasses
import http.cookiejar
import ipaddress
import json
import logging
import os
import posixpath
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urljoin, urlsplit, urlunsplit

import httpx

from groundlabel.errors import UserError

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 30.0
DEFAULT_TOTAL_TIMEOUT = 120.0
DEFAULT_MAX_REDIRECTS = 5

#: URI schemes that Label Studio presigns through a cloud storage connection.
CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")

REFUSED_TOKEN_REASON = (
    "Label Studio refused the token (legacy tokens must be enabled, or use a personal access token)"
)


class FetchError(UserError):
    """A task's image could not be fetched; the message names the URL (no secrets) and the reason."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = redact_url(url)
        self.reason = reason
        super().__init__(f"cannot fetch image {self.url}: {reason}")


def redact_url(url: str) -> str:
    """The URL without user info and without query values that could carry secrets (presigned URLs).

    The ``d`` parameter of Label Studio's local-files URLs is kept: it is a file path, and the most
    useful part of an error message.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = parts.query
    if query:
        if parts.path.rstrip("/").endswith("/data/local-files"):
            query = "&".join(q for q in query.split("&") if q.startswith("d="))
        else:
            query = "<redacted>"
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


# ---------------------------------------------------------------------------------------------------
# Settings


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise UserError(f"{name}={raw!r} is not a number") from exc
    if value <= 0:
        raise UserError(f"{name} must be positive, got {raw!r}")
    return value


def _env_int(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise UserError(f"{name}={raw!r} is not an integer") from exc
    if value <= 0:
        raise UserError(f"{name} must be positive, got {raw!r}")
    return value


def _normalise_base_url(url: str | None, what: str) -> str | None:
    if url is None or not url.strip():
        return None
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{what} must be an http(s) URL with a host, e.g. http://localhost:8080; got {url!r}")
    return url


@dataclass(frozen=True)
class FetchSettings:
    """Where images may come from, with which token, and how much of them a worker accepts."""

    label_studio_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    local_files_root: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int | None = None  # None: decode_image's limit (GROUNDLABEL_MAX_IMAGE_PIXELS)
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    total_timeout: float = DEFAULT_TOTAL_TIMEOUT
    max_redirects: int = DEFAULT_MAX_REDIRECTS

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "label_studio_url", _normalise_base_url(self.label_studio_url, "LABEL_STUDIO_URL")
        )
        hosts = tuple(h.strip().lower() for h in self.allowed_hosts if h and h.strip())
        object.__setattr__(self, "allowed_hosts", hosts)
        if self.max_bytes <= 0:
            raise UserError(f"the image byte limit must be positive, got {self.max_bytes}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> FetchSettings:
        """Read the settings from environment variables.

        ``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY`` (legacy token or personal access token),
        ``LOCAL_FILES_DOCUMENT_ROOT`` (or ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``),
        ``GROUNDLABEL_ALLOWED_HOSTS`` (comma-separated ``host``, ``host:port``, ``*.domain`` or ``*``),
        ``GROUNDLABEL_MAX_IMAGE_BYTES`` (shared with :func:`workers.images.decode_image`, which also reads
        ``GROUNDLABEL_MAX_IMAGE_PIXELS``),
        ``GROUNDLABEL_FETCH_CONNECT_TIMEOUT``, ``GROUNDLABEL_FETCH_READ_TIMEOUT``,
        ``GROUNDLABEL_FETCH_TOTAL_TIMEOUT`` (seconds), ``GROUNDLABEL_FETCH_MAX_REDIRECTS``.
        """
        env = os.environ if env is None else env
        root = env.get("LOCAL_FILES_DOCUMENT_ROOT") or env.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
        return cls(
            label_studio_url=env.get("LABEL_STUDIO_URL") or None,
            api_key=(env.get("LABEL_STUDIO_API_KEY") or "").strip() or None,
            local_files_root=root or None,
            allowed_hosts=tuple((env.get("GROUNDLABEL_ALLOWED_HOSTS") or "").split(",")),
            max_bytes=_env_int(env, "GROUNDLABEL_MAX_IMAGE_BYTES", DEFAULT_MAX_BYTES) or DEFAULT_MAX_BYTES,
            connect_timeout=_env_float(env, "GROUNDLABEL_FETCH_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT),
            read_timeout=_env_float(env, "GROUNDLABEL_FETCH_READ_TIMEOUT", DEFAULT_READ_TIMEOUT),
            total_timeout=_env_float(env, "GROUNDLABEL_FETCH_TOTAL_TIMEOUT", DEFAULT_TOTAL_TIMEOUT),
            max_redirects=_env_int(env, "GROUNDLABEL_FETCH_MAX_REDIRECTS", DEFAULT_MAX_REDIRECTS)
            or DEFAULT_MAX_REDIRECTS,
        )

    # -- host policy ---------------------------------------------------------------------------------

    def host_rule(self, host: str, port: int) -> str | None:
        """How ``host:port`` is allowed: ``"explicit"``, ``"pattern"``, or None when it is not."""
        host = host.lower().strip("[]")
        best: str | None = None
        for entry in self.allowed_hosts:
            entry_host, entry_port = _split_host_port(entry)
            if entry_port is not None and entry_port != port:
                continue
            if entry_host == host:
                return "explicit"
            if entry_host == "*" or (entry_host.startswith("*.") and host.endswith(entry_host[1:])):
                best = "pattern"
        return best

    def with_request_url(self, label_studio_url: str | None) -> FetchSettings:
        """Settings for a request that named a Label Studio URL (Label Studio's ``hostname``).

        A configured ``LABEL_STUDIO_URL`` always wins: the request's URL is then ignored (Label Studio
        often names itself differently, e.g. ``localhost`` for ``127.0.0.1``). Without one, the request's
        URL is used only when it is on a host in ``GROUNDLABEL_ALLOWED_HOSTS``, and no token is sent
        there: a request never chooses where the worker sends its token.
        """
        if not label_studio_url or self.label_studio_url:
            return self
        try:
            url = _normalise_base_url(label_studio_url, "the request's Label Studio URL") or ""
        except UserError as exc:
            raise FetchError(label_studio_url, str(exc)) from exc
        parts = urlsplit(url)
        host, port = parts.hostname or "", _port(parts)
        rule = self.host_rule(host, port)
        if rule is None:
            raise FetchError(
                url,
                "LABEL_STUDIO_URL is not set and the request's Label Studio URL is not on a host in "
                "GROUNDLABEL_ALLOWED_HOSTS",
            )
        if rule != "explicit":
            _check_addresses(url, host, port)
        return dataclasses.replace(self, label_studio_url=url, api_key=None)


def _split_host_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [v6]:port
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if port.isdigit():
            return host, int(port)
    return entry, None


def _port(parts) -> int:
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is not None:
        return port
    return 443 if parts.scheme == "https" else 80


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), _port(parts)


# ---------------------------------------------------------------------------------------------------
# Tokens


def _jwt_claims(token: str) -> dict | None:
    """The claims of a JWT (unverified), or None when the token is not a JWT (a legacy token)."""
    pieces = token.split(".")
    if len(pieces) != 3:
        return None
    try:
        payload = pieces[1] + "=" * (-len(pieces[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, json.JSONDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


class _TokenCache:
    """Access tokens obtained from personal access tokens, per Label Studio, until they expire."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}

    def clear(self) -> None:
        with self._lock:
            self._tokens.clear()

    def invalidate(self, base_url: str, pat: str) -> None:
        with self._lock:
            self._tokens.pop((base_url, pat), None)

    def access_token(self, client: httpx.Client, base_url: str, pat: str) -> str:
        key = (base_url, pat)
        with self._lock:
            cached = self._tokens.get(key)
            if cached and cached[1] > time.time() + 30:
                return cached[0]
            refresh_url = base_url + "/api/token/refresh/"
            try:
                response = client.post(refresh_url, json={"refresh": pat})
            except httpx.TimeoutException as exc:
                raise FetchError(refresh_url, "timed out exchanging the personal access token") from exc
            except httpx.HTTPError as exc:
                raise FetchError(refresh_url, f"cannot reach Label Studio: {_describe(exc)}") from exc
            if response.status_code in (400, 401, 403):
                raise FetchError(refresh_url, f"{REFUSED_TOKEN_REASON} (HTTP {response.status_code})")
            if response.status_code != 200:
                raise FetchError(refresh_url, f"token refresh answered HTTP {response.status_code}")
            try:
                access = response.json()["access"]
            except (ValueError, KeyError, TypeError) as exc:
                raise FetchError(refresh_url, "token refresh answered without an access token") from exc
            claims = _jwt_claims(access) or {}
            expires = float(claims.get("exp") or time.time() + 240)
            self._tokens[key] = (access, expires)
            return access


_TOKENS = _TokenCache()


def _auth_header(client: httpx.Client, settings: FetchSettings) -> dict[str, str]:
    key = settings.api_key
    if not key or not settings.label_studio_url:
        return {}
    claims = _jwt_claims(key)
    if claims is None:
        return {"Authorization": f"Token {key}"}
    if claims.get("token_type") == "refresh":
        return {"Authorization": f"Bearer {_TOKENS.access_token(client, settings.label_studio_url, key)}"}
    return {"Authorization": f"Bearer {key}"}  # an access token given directly


# ---------------------------------------------------------------------------------------------------
# Address checks


def _check_addresses(url: str, host: str, port: int) -> None:
    """Refuse a host that resolves to a non-global address (private, loopback, link-local, ...)."""
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
        addresses = [literal]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise FetchError(url, f"cannot resolve host {host!r} (DNS failure)") from exc
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for address in addresses:
        mapped = getattr(address, "ipv4_mapped", None)
        if mapped is not None:
            address = mapped
        if not address.is_global or address.is_multicast:
            raise FetchError(
                url,
                f"host {host!r} resolves to the non-public address {address}; list it explicitly in "
                "GROUNDLABEL_ALLOWED_HOSTS to allow it",
            )


# ---------------------------------------------------------------------------------------------------
# Fetching


def _describe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "..."


def _is_label_studio(url: str, settings: FetchSettings) -> bool:
    return bool(settings.label_studio_url) and _origin(url) == _origin(settings.label_studio_url)


def _check_hop(url: str, settings: FetchSettings, *, trusted: bool) -> None:
    """Refuse a URL the worker must not request. ``trusted``: Label Studio itself chose this URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(url, f"unsupported URL scheme {parts.scheme!r}")
    if _is_label_studio(url, settings):
        return
    host, port = parts.hostname, _port(parts)
    rule = settings.host_rule(host, port)
    if rule is None and not trusted:
        raise FetchError(
            url,
            f"host {host}:{port} is not allowed (not Label Studio, not in GROUNDLABEL_ALLOWED_HOSTS)",
        )
    if rule != "explicit":
        _check_addresses(url, host, port)


_CLIENTS: dict[tuple[float, float], httpx.Client] = {}
_CLIENTS_LOCK = threading.Lock()


def _client(settings: FetchSettings) -> httpx.Client:
    """A shared HTTP client per timeout pair: building one costs tens of milliseconds (TLS context),
    and a shared one keeps connections to Label Studio alive between images. Thread-safe."""
    key = (settings.connect_timeout, settings.read_timeout)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            timeout = httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout)
            # No redirects (followed by hand, each hop checked), no proxies or netrc from the environment.
            # No cookies either: a session cookie from Label Studio must not stand in for the token.
            no_cookies = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
            client = httpx.Client(
                timeout=timeout, follow_redirects=False, trust_env=False, cookies=no_cookies
            )
            _CLIENTS[key] = client
        return client


def _download(url: str, settings: FetchSettings, *, with_token: bool, trusted: bool = False) -> bytes:
    """GET ``url`` with a byte limit and a deadline, following redirects by hand."""
    deadline = time.monotonic() + settings.total_timeout
    client = _client(settings)
    current, hops, retried = url, 0, False
    from_label_studio = False
    while True:
        _check_hop(current, settings, trusted=trusted or from_label_studio)
        headers = {"Accept": "image/*,*/*;q=0.5"}
        to_ls = with_token and _is_label_studio(current, settings)
        if to_ls:
            headers.update(_auth_header(client, settings))
        try:
            with client.stream("GET", current, headers=headers) as response:
                status = response.status_code
                if status in (301, 302, 303, 307, 308):
                    location = response.headers.get("location")
                    if not location:
                        raise FetchError(current, f"HTTP {status} redirect without a Location")
                    hops += 1
                    if hops > settings.max_redirects:
                        raise FetchError(url, f"more than {settings.max_redirects} redirects")
                    target = urljoin(current, location)
                    if to_ls and urlsplit(target).path.rstrip("/").endswith("/user/login"):
                        reason = f"{REFUSED_TOKEN_REASON} (redirected to the login page)"
                        raise FetchError(current, reason)
                    # Label Studio's own redirects (presigned storage URLs) are trusted once.
                    from_label_studio = _is_label_studio(current, settings)
                    current = target
                    continue
                if status in (401, 403) and to_ls and not retried and _jwt_claims(settings.api_key or ""):
                    _TOKENS.invalidate(settings.label_studio_url or "", settings.api_key or "")
                    retried = True
                    continue
                _raise_for_status(current, status, to_ls)
                return _read_limited(current, response, settings, deadline)
        except httpx.TimeoutException as exc:
            raise FetchError(current, f"timed out ({type(exc).__name__})") from exc
        except httpx.ConnectError as exc:
            text = _describe(exc)
            if "Name or service not known" in text or "nodename nor servname" in text:
                host = urlsplit(current).hostname
                raise FetchError(current, f"cannot resolve host {host!r} (DNS failure)") from exc
            raise FetchError(current, f"connection failed: {text}") from exc
        except httpx.HTTPError as exc:
            raise FetchError(current, f"download failed: {_describe(exc)}") from exc


def _raise_for_status(url: str, status: int, to_label_studio: bool) -> None:
    if status < 400:
        if status >= 300:
            raise FetchError(url, f"unexpected HTTP {status}")
        return
    if status in (401, 403):
        if to_label_studio:
            raise FetchError(url, f"{REFUSED_TOKEN_REASON} (HTTP {status})")
        raise FetchError(url, f"the server refused access (HTTP {status})")
    if status == 404:
        raise FetchError(url, "not found (HTTP 404)")
    raise FetchError(url, f"the server answered HTTP {status}")


def _read_limited(url: str, response: httpx.Response, settings: FetchSettings, deadline: float) -> bytes:
    limit = settings.max_bytes
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise FetchError(url, f"too large: {int(declared)} bytes announced, the limit is {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit:
            raise FetchError(url, f"too large: more than the limit of {limit} bytes")
        if time.monotonic() > deadline:
            raise FetchError(url, f"timed out: the download took longer than {settings.total_timeout:g} s")
        chunks.append(chunk)
    return b"".join(chunks)


def _local_file(url: str, settings: FetchSettings) -> Path | None:
    """The file behind a ``/data/local-files/?d=...`` URL under the local document root, if there."""
    parts = urlsplit(url)
    d = parse_qs(parts.query).get("d")
    if not d:
        raise FetchError(url, "a local-files URL needs a ?d=<path> parameter")
    rel = d[0]  # parse_qs has already percent-decoded it, once, as Label Studio does
    if "\x00" in rel:
        raise FetchError(url, "the local-files path contains a NUL byte")
    # Label Studio normalises the path and strips leading slashes: "/a/b.png" is "a/b.png" under the root.
    rel = posixpath.normpath(rel.replace("\\", "/")).lstrip("/")
    if rel == ".." or rel.startswith("../") or rel in ("", "."):
        raise FetchError(url, "the local-files path leaves the document root (path traversal refused)")
    rel_path = Path(rel)
    if not settings.local_files_root:
        return None
    root = Path(settings.local_files_root).resolve()
    candidate = (root / rel_path).resolve()
    if candidate != root and root not in candidate.parents:
        raise FetchError(url, "the local-files path leaves the document root (path traversal refused)")
    return candidate if candidate.is_file() else None


def _read_file(url: str, path: Path, settings: FetchSettings) -> bytes:
    size = path.stat().st_size
    if size > settings.max_bytes:
        raise FetchError(url, f"too large: {size} bytes, the limit is {settings.max_bytes} bytes")
    return path.read_bytes()


def _data_uri(url: str, settings: FetchSettings) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise FetchError(url[:40], "only base64 data: URIs are supported")
    if len(payload) * 3 // 4 > settings.max_bytes:
        raise FetchError(url[:40], f"too large: the limit is {settings.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=False)
    except ValueError as exc:
        raise FetchError(url[:40], f"invalid base64 data: {exc}") from exc


def fetch_bytes(
    url: str,
    *,
    task_id: int | None = None,
    settings: FetchSettings | None = None,
    label_studio_url: str | None = None,
) -> bytes:
    """The raw bytes behind a task's image URL, following the rules of this module."""
    settings = settings or FetchSettings.from_env()
    settings = settings.with_request_url(label_studio_url)
    if not isinstance(url, str) or not url.strip():
        raise FetchError(str(url), "the task has no image URL")
    url = url.strip()
    scheme = urlsplit(url).scheme.lower()

    if scheme == "data":
        return _data_uri(url, settings)

    if scheme in CLOUD_SCHEMES:
        if not settings.label_studio_url:
            raise FetchError(url, "cloud storage URIs are presigned by Label Studio: set LABEL_STUDIO_URL")
        if task_id is None:
            raise FetchError(url, "cloud storage URIs need the task id for Label Studio's presign endpoint")
        fileuri = base64.b64encode(url.encode()).decode()
        presign = f"{settings.label_studio_url}/tasks/{int(task_id)}/presign/?fileuri={fileuri}"
        return _download(presign, settings, with_token=True)

    if scheme in ("http", "https"):
        return _download(url, settings, with_token=_is_label_studio(url, settings))

    if scheme == "" and url.startswith("/"):
        path = urlsplit(url).path
        if path.rstrip("/").endswith("/data/local-files"):
            local = _local_file(url, settings)
            if local is not None:
                return _read_file(url, local, settings)
        if not settings.label_studio_url:
            raise FetchError(
                url,
                "the URL is relative to Label Studio but LABEL_STUDIO_URL is not set"
                + ("" if settings.local_files_root else " (nor LOCAL_FILES_DOCUMENT_ROOT)"),
            )
        return _download(settings.label_studio_url + url, settings, with_token=True)

    raise FetchError(url, f"unsupported image URL (scheme {scheme or 'none'!r})")


def fetch_image(
    url: str,
    *,
    task_id: int | None = None,
    settings: FetchSettings | None = None,
    label_studio_url: str | None = None,
) -> Image.Image:
    """Fetch and decode a task's image (RGB, EXIF orientation applied).

    ``label_studio_url`` is the Label Studio URL that came with the request, if any; it is used only
    when ``LABEL_STUDIO_URL`` is not set, and only on an allowed host, without the token (see
    :meth:`FetchSettings.with_request_url`).
    Raises :class:`FetchError` (a :class:`~groundlabel.errors.UserError`) with the reason.
    """
    from workers.images import decode_image

    settings = settings or FetchSettings.from_env()
    data = fetch_bytes(url, task_id=task_id, settings=settings, label_studio_url=label_studio_url)
    kwargs: dict[str, int] = {"max_bytes": settings.max_bytes}
    if settings.max_pixels is not None:
        kwargs["max_pixels"] = settings.max_pixels
    try:
        return decode_image(data, **kwargs)
    except FetchError:
        raise
    except UserError as exc:
        raise FetchError(url, str(exc)) from exc


def clear_token_cache() -> None:
    """Forget cached access tokens (after rotating a personal access token)."""
    _TOKENS.clear()
