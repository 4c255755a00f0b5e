"""Access to Label Studio's images, shared by the workers and the exporters.

One layer decides where an image reference leads, with which credentials, and how it is downloaded:

- :class:`FetchSettings`: Label Studio's URL and key, the local folders, the allowed hosts, the limits.
- :class:`LabelStudioAuth`: the ``Authorization`` header for a Label Studio URL and key. A legacy token
  is sent as ``Token KEY``; a personal access token (a JWT refresh token) is exchanged at
  ``/api/token/refresh/`` for a short-lived access token, cached until shortly before it expires, and
  sent as ``Bearer ACCESS``; an access JWT given directly is sent as ``Bearer KEY``. A refused cached
  access token is invalidated and exchanged once more.
- :func:`local_files_path` and :func:`upload_paths`: the files behind ``/data/local-files/?d=REL`` and
  ``/data/upload/REST`` under a local folder, refusing paths that leave it.
- :func:`download_bytes` and :func:`download_file`: a GET with a byte limit and a total deadline, the
  redirects followed by hand and every hop checked (:func:`check_hop`): Label Studio's origin, hosts in
  the allowed list, or a redirect chosen by Label Studio itself (a presigned storage URL, trusted for
  one hop); host names are resolved first and non-public addresses refused unless the host is listed
  explicitly. The token goes only to Label Studio's origin, never to a redirect target elsewhere, and a
  redirect to Label Studio's login page is reported as a refused token.

Every failure raises :class:`FetchError`, naming the URL without credentials or query secrets
(:func:`redact_url`). Tokens are never logged nor put in messages.
"""

from __future__ import annotations

import base64
import dataclasses
import http.cookiejar
import ipaddress
import json
import os
import posixpath
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import SplitResult, parse_qs, unquote, urljoin, urlsplit, urlunsplit

import httpx

from groundlabel.errors import UserError
from groundlabel.limits import DEFAULT_MAX_BYTES

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 30.0
DEFAULT_TOTAL_TIMEOUT = 120.0
DEFAULT_MAX_REDIRECTS = 5

#: URI schemes that Label Studio presigns through a cloud storage connection.
CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")

#: The prefixes under a local folder where ``/data/upload/REST`` may be, in the order they are tried
#: (the folder may be Label Studio's upload folder, its media folder or its data folder).
UPLOAD_PREFIXES = ("", "upload/", "media/upload/")

REFUSED_TOKEN_REASON = (
    "Label Studio refused the token (legacy tokens must be enabled, or use a personal access token)"
)


class FetchError(UserError):
    """An image could not be fetched; the message names the URL (no secrets) and the reason."""

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


def normalise_base_url(url: str | None, what: str) -> str | None:
    """``url`` without its trailing slash, or None when empty; a UserError naming ``what`` when invalid."""
    if url is None or not url.strip():
        return None
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{what} must be an http(s) URL with a host, e.g. http://localhost:8080; got {url!r}")
    return url


@dataclass(frozen=True)
class FetchSettings:
    """Where images may come from, with which token, and how much of them is accepted.

    ``upload_root``: a local folder holding Label Studio's uploads (see :func:`upload_paths`); None
    downloads them. ``hosts_setting``: how the allowed-hosts list is named in messages.
    """

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
    upload_root: str | None = None
    hosts_setting: str = field(default="GROUNDLABEL_ALLOWED_HOSTS", repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "label_studio_url", normalise_base_url(self.label_studio_url, "LABEL_STUDIO_URL")
        )
        hosts = tuple(h.strip().lower() for h in self.allowed_hosts if h and h.strip())
        object.__setattr__(self, "allowed_hosts", hosts)
        if self.max_bytes <= 0:
            raise UserError(f"the image byte limit must be positive, got {self.max_bytes}")

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
        there: a request never chooses where the token goes.
        """
        if not label_studio_url or self.label_studio_url:
            return self
        try:
            url = normalise_base_url(label_studio_url, "the request's Label Studio URL") or ""
        except UserError as exc:
            raise FetchError(label_studio_url, str(exc)) from exc
        parts = urlsplit(url)
        host, port = parts.hostname or "", _port(parts)
        rule = self.host_rule(host, port)
        if rule is None:
            raise FetchError(
                url,
                f"LABEL_STUDIO_URL is not set and the request's Label Studio URL is not on a host in "
                f"{self.hosts_setting}",
            )
        if rule != "explicit":
            _check_addresses(url, host, port, self.hosts_setting)
        return dataclasses.replace(self, label_studio_url=url, api_key=None)


    def token_url(self, request_url: str | None) -> str | None:
        """Where Label Studio's API may be called with the token: ``LABEL_STUDIO_URL`` when it is set (the
        request's URL is then ignored); without it, the request's URL only when its host is listed by name
        in ``GROUNDLABEL_ALLOWED_HOSTS`` (a pattern such as ``*`` allows images, never the token); None
        without either. A :class:`UserError` says why a request's URL is refused: a request never chooses
        where the token goes."""
        if self.label_studio_url or not request_url:
            return self.label_studio_url
        url = normalise_base_url(request_url, "the request's Label Studio URL") or ""
        parts = urlsplit(url)
        if self.host_rule(parts.hostname or "", _port(parts)) != "explicit":
            raise UserError(
                f"LABEL_STUDIO_URL is not set, and the Label Studio URL a request named "
                f"({redact_url(url)}) is not a host listed by name in {self.hosts_setting}: the token is "
                "sent only to hosts the operator named"
            )
        return url


def _split_host_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [v6]:port
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if port.isdigit():
            return host, int(port)
    return entry, None


def _port(parts: SplitResult) -> int:
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


def is_label_studio(url: str, settings: FetchSettings) -> bool:
    """Whether ``url`` is on the configured Label Studio's origin (scheme, host and port)."""
    return bool(settings.label_studio_url) and _origin(url) == _origin(settings.label_studio_url or "")


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


def _describe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "..."


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


class LabelStudioAuth:
    """The ``Authorization`` header for one Label Studio URL and API key.

    ``kind`` says what the key is: ``"none"`` (no key or no URL: no header), ``"legacy"`` (sent as
    ``Token KEY``), ``"personal"`` (a personal access token, exchanged at ``/api/token/refresh/`` and
    sent as ``Bearer ACCESS``; the access token is cached, per URL and key, for every instance) or
    ``"access"`` (an access JWT, sent as ``Bearer KEY``). After Label Studio refuses a request,
    :meth:`invalidate` forgets the cached access token so that the next :meth:`header` exchanges anew.
    """

    def __init__(self, label_studio_url: str | None, api_key: str | None) -> None:
        self.label_studio_url = normalise_base_url(label_studio_url, "the Label Studio URL")
        self._key = (api_key or "").strip() or None
        if not self._key or not self.label_studio_url:
            self.kind = "none"
        else:
            claims = _jwt_claims(self._key)
            if claims is None:
                self.kind = "legacy"
            elif claims.get("token_type") == "refresh":
                self.kind = "personal"
            else:
                self.kind = "access"

    def __repr__(self) -> str:
        return f"LabelStudioAuth({self.label_studio_url!r}, kind={self.kind!r})"

    def header(self, client: httpx.Client | None = None) -> dict[str, str]:
        """``{"Authorization": ...}`` for a request to Label Studio (empty without a key).

        ``client`` sends the token exchange of a personal access token (default: a shared client).
        """
        if self.kind == "none":
            return {}
        if self.kind == "legacy":
            return {"Authorization": f"Token {self._key}"}
        if self.kind == "access":
            return {"Authorization": f"Bearer {self._key}"}
        client = client or _client(DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT)
        access = _TOKENS.access_token(client, self.label_studio_url or "", self._key or "")
        return {"Authorization": f"Bearer {access}"}

    def invalidate(self) -> bool:
        """Forget the cached access token; True when asking again may succeed (a personal access token)."""
        if self.kind != "personal":
            return False
        _TOKENS.invalidate(self.label_studio_url or "", self._key or "")
        return True


def clear_token_cache() -> None:
    """Forget cached access tokens (after rotating a personal access token)."""
    _TOKENS.clear()


# ---------------------------------------------------------------------------------------------------
# Local files and uploads


def is_local_files_url(ref: str) -> bool:
    """Whether ``ref`` (relative or absolute) is a Label Studio ``/data/local-files/`` URL."""
    return urlsplit(ref).path.rstrip("/").endswith("/data/local-files")


def is_upload_url(ref: str) -> bool:
    """Whether ``ref`` (relative or absolute) is a Label Studio ``/data/upload/...`` URL."""
    return "/data/upload/" in urlsplit(ref).path


def _relative(ref: str, rel: str, what: str) -> str:
    """``rel`` normalised as Label Studio does; a path leaving the root is refused."""
    if "\x00" in rel:
        raise FetchError(ref, f"the {what} path contains a NUL byte")
    # Label Studio normalises the path and strips leading slashes: "/a/b.png" is "a/b.png" under the root.
    rel = posixpath.normpath(rel.replace("\\", "/")).lstrip("/")
    if rel == ".." or rel.startswith("../"):
        raise FetchError(ref, f"the {what} path leaves the document root (path traversal refused)")
    if rel in ("", "."):
        raise FetchError(ref, f"the {what} path names no file")
    return rel


def _under(ref: str, root: Path, rel: str, what: str) -> Path:
    candidate = (root / rel).resolve()
    if candidate != root and root not in candidate.parents:  # a symlink pointing out of the root
        raise FetchError(ref, f"the {what} path leaves the document root (path traversal refused)")
    return candidate


def local_files_path(ref: str, root: str | Path | None) -> Path | None:
    """The file a ``/data/local-files/?d=REL`` URL names under ``root`` (None without a root).

    ``REL`` is percent-decoded once, as Label Studio does, normalised, and stripped of leading slashes;
    a path that leaves ``root`` (``..``, a symlink pointing out) raises :class:`FetchError`, with or
    without a root. The file may not exist: the caller checks.
    """
    d = parse_qs(urlsplit(ref).query).get("d")
    if not d:
        raise FetchError(ref, "a local-files URL needs a ?d=<path> parameter")
    rel = _relative(ref, d[0], "local-files")
    if root is None or str(root) == "":
        return None
    return _under(ref, Path(root).resolve(), rel, "local-files")


def upload_paths(ref: str, root: str | Path | None) -> list[Path]:
    """The files a ``/data/upload/REST`` URL may be under ``root``, in the order to try them.

    ``ROOT/REST``, ``ROOT/upload/REST``, ``ROOT/media/upload/REST`` (``root`` may be Label Studio's
    upload, media or data folder); ``REST`` is percent-decoded once. A path leaving ``root`` raises
    :class:`FetchError`; without a root the list is empty.
    """
    path = urlsplit(ref).path
    if "/data/upload/" not in path:
        raise FetchError(ref, "not a /data/upload/ URL")
    rel = _relative(ref, unquote(path.split("/data/upload/", 1)[1]), "upload")
    if root is None or str(root) == "":
        return []
    base = Path(root).resolve()
    return [_under(ref, base, prefix + rel, "upload") for prefix in UPLOAD_PREFIXES]


# ---------------------------------------------------------------------------------------------------
# Host and address checks


def _check_addresses(url: str, host: str, port: int, setting: str = "GROUNDLABEL_ALLOWED_HOSTS") -> None:
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
                f"{setting} to allow it",
            )


def _check_scheme(url: str) -> SplitResult:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(url, f"unsupported URL scheme {parts.scheme!r}")
    return parts


def check_hop(url: str, settings: FetchSettings, *, trusted: bool = False) -> None:
    """Refuse a URL that must not be requested; ``trusted``: Label Studio itself redirected here.

    Allowed: Label Studio's origin; a host in ``allowed_hosts``; any host when ``trusted``. Unless the
    host is listed explicitly (not through ``*`` or ``*.domain``) or is Label Studio, its addresses must
    all be public.
    """
    parts = _check_scheme(url)
    if is_label_studio(url, settings):
        return
    host, port = parts.hostname or "", _port(parts)
    rule = settings.host_rule(host, port)
    if rule is None and not trusted:
        raise FetchError(
            url, f"host {host}:{port} is not allowed (not Label Studio, not in {settings.hosts_setting})"
        )
    if rule != "explicit":
        _check_addresses(url, host, port, settings.hosts_setting)


# ---------------------------------------------------------------------------------------------------
# Downloads

_CLIENTS: dict[tuple[float, float], httpx.Client] = {}
_CLIENTS_LOCK = threading.Lock()


def _client(connect_timeout: float, read_timeout: float) -> httpx.Client:
    """A shared HTTP client per timeout pair: building one costs tens of milliseconds (TLS context),
    and a shared one keeps connections to Label Studio alive between images. Thread-safe."""
    key = (connect_timeout, read_timeout)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
            # No redirects (followed by hand, each hop checked), no proxies or netrc from the environment.
            # No cookies either: a session cookie from Label Studio must not stand in for the token.
            no_cookies = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
            client = httpx.Client(
                timeout=timeout, follow_redirects=False, trust_env=False, cookies=no_cookies
            )
            _CLIENTS[key] = client
        return client


def _download(
    url: str, settings: FetchSettings, write: Callable[[bytes], object], *, user_chosen: bool
) -> None:
    """GET ``url`` into ``write`` with a byte limit and a deadline, following redirects by hand."""
    deadline = time.monotonic() + settings.total_timeout
    client = _client(settings.connect_timeout, settings.read_timeout)
    # The token goes only to Label Studio's origin, and only when the download starts there.
    auth = (
        LabelStudioAuth(settings.label_studio_url, settings.api_key)
        if is_label_studio(url, settings)
        else None
    )
    current, hops, retried, from_label_studio = url, 0, False, False
    while True:
        if hops == 0 and user_chosen:
            _check_scheme(current)  # the user's own URL: any http(s) host; its redirects are checked
        else:
            check_hop(current, settings, trusted=from_label_studio)
        headers = {"Accept": "image/*,*/*;q=0.5"}
        to_ls = auth is not None and is_label_studio(current, settings)
        if to_ls and auth is not None:
            headers.update(auth.header(client))
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
                        raise FetchError(current, f"{REFUSED_TOKEN_REASON} (redirected to the login page)")
                    # Label Studio's own redirects (presigned storage URLs) are trusted for one hop.
                    from_label_studio = is_label_studio(current, settings)
                    current = target
                    continue
                if status in (401, 403) and to_ls and not retried and auth is not None and auth.invalidate():
                    retried = True
                    continue
                _raise_for_status(current, status, to_ls)
                _read_limited(current, response, settings, deadline, write)
                return
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


def _read_limited(
    url: str,
    response: httpx.Response,
    settings: FetchSettings,
    deadline: float,
    write: Callable[[bytes], object],
) -> None:
    limit = settings.max_bytes
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise FetchError(url, f"too large: {int(declared)} bytes announced, the limit is {limit} bytes")
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit:
            raise FetchError(url, f"too large: more than the limit of {limit} bytes")
        if time.monotonic() > deadline:
            raise FetchError(url, f"timed out: the download took longer than {settings.total_timeout:g} s")
        write(chunk)


def download_bytes(url: str, settings: FetchSettings, *, user_chosen: bool = False) -> bytes:
    """The body of ``url`` (an absolute http(s) URL), every hop checked by :func:`check_hop`.

    ``user_chosen``: the URL is the user's own choice (written in an export), so its first hop may be
    any http(s) host; the redirects from it are still checked.
    """
    chunks: list[bytes] = []
    _download(url, settings, chunks.append, user_chosen=user_chosen)
    return b"".join(chunks)


def download_file(url: str, dest: str | Path, settings: FetchSettings, *, user_chosen: bool = False) -> int:
    """Download ``url`` to ``dest`` as :func:`download_bytes` does; the size in bytes.

    Nothing is left at ``dest`` when the download fails.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    size = 0
    try:
        with open(part, "wb") as fh:

            def write(chunk: bytes) -> None:
                nonlocal size
                size += len(chunk)
                fh.write(chunk)

            _download(url, settings, write, user_chosen=user_chosen)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return size
