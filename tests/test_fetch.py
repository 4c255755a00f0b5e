"""Image fetching: host policy (SSRF), redirects, limits, timeouts, local files, Label Studio tokens.

Plain-HTTP cases run against small servers on loopback started here; the token cases run against a
real Label Studio (``tests/labelstudio_server.py``).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from labelstudio_server import require_label_studio, shared_label_studio
from PIL import Image

from groundlabel.errors import UserError
from groundlabel.ls_access import (
    REFUSED_TOKEN_REASON,
    FetchError,
    FetchSettings,
    clear_token_cache,
    redact_url,
)
from groundlabel.settings import Settings
from workers.fetch import fetch_bytes, fetch_image


def png_bytes(width: int = 24, height: int = 16, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep the test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        server: ImageServer = self.server  # type: ignore[assignment]
        server.requests.append((self.path, dict(self.headers)))
        path = self.path.split("?", 1)[0]
        try:
            if path == "/img.png":
                body = png_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif path == "/redirect":
                self.send_response(302)
                self.send_header("Location", server.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif path == "/announced-huge":
                self.send_response(200)
                self.send_header("Content-Length", str(10**9))
                self.end_headers()
                self.wfile.write(b"\0" * 1024)
            elif path == "/endless":
                # No Content-Length: the limit must be enforced while streaming.
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Connection", "close")
                self.end_headers()
                chunk = b"\x89PNG" + b"\0" * 65532
                for _ in range(2000):  # 128 MiB if nobody stops reading
                    self.wfile.write(chunk)
                    server.sent += len(chunk)
            elif path == "/slow":
                time.sleep(3)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif path == "/drip":
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                for _ in range(40):
                    self.wfile.write(b"\0" * 16)
                    self.wfile.flush()
                    time.sleep(0.1)
            elif path == "/private":
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
        except (BrokenPipeError, ConnectionResetError):
            server.aborted = True


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), handler or _Handler)
        self.requests: list[tuple[str, dict]] = []
        self.redirect_to = "/img.png"
        self.sent = 0
        self.aborted = False
        self.port = self.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def server():
    srv = ImageServer()
    yield srv
    srv.close()


@pytest.fixture
def other_server():
    srv = ImageServer()
    yield srv
    srv.close()


def allow(srv: ImageServer, **kwargs: object) -> FetchSettings:
    return FetchSettings(allowed_hosts=(f"127.0.0.1:{srv.port}",), **kwargs)  # type: ignore[arg-type]


# --- host policy -------------------------------------------------------------------------------------


def test_allowed_host_is_fetched_and_decoded(server):
    image = fetch_image(server.base + "/img.png", settings=allow(server))
    assert image.mode == "RGB" and image.size == (24, 16)
    assert image.getpixel((3, 3)) == (200, 30, 30)
    assert "Authorization" not in server.requests[0][1]  # no token to a host that is not Label Studio


def test_disallowed_host_is_never_contacted(server):
    url = f"http://localhost:{server.port}/img.png"  # same server, but "localhost" is not listed
    with pytest.raises(FetchError, match="not allowed"):
        fetch_bytes(url, settings=allow(server))
    with pytest.raises(FetchError, match="not allowed"):
        fetch_bytes(server.base + "/img.png", settings=FetchSettings())
    wrong_port = FetchSettings(allowed_hosts=(f"127.0.0.1:{server.port + 1}",))
    with pytest.raises(FetchError, match="not allowed"):
        fetch_bytes(server.base + "/img.png", settings=wrong_port)
    assert server.requests == []


def test_loopback_and_private_addresses_need_an_explicit_entry(server):
    anywhere = FetchSettings(allowed_hosts=("*",))
    with pytest.raises(FetchError, match="non-public address 127.0.0.1"):
        fetch_bytes(server.base + "/img.png", settings=anywhere)
    with pytest.raises(FetchError, match="non-public address"):
        fetch_bytes(f"http://localhost:{server.port}/img.png", settings=anywhere)
    for address in ("10.1.2.3", "192.168.0.1", "169.254.169.254", "[::1]", "0.0.0.0"):
        with pytest.raises(FetchError, match="non-public"):
            fetch_bytes(f"http://{address}/latest/meta-data/", settings=anywhere)
    assert server.requests == []
    # The same address listed explicitly (host alone: any port) is allowed.
    assert fetch_bytes(server.base + "/img.png", settings=FetchSettings(allowed_hosts=("127.0.0.1",)))


def test_redirects_are_rechecked_at_every_hop(server, other_server):
    settings = allow(server)
    server.redirect_to = f"{other_server.base}/img.png"  # another port: another host
    with pytest.raises(FetchError, match="not allowed"):
        fetch_bytes(server.base + "/redirect", settings=settings)
    assert other_server.requests == []
    server.redirect_to = "http://169.254.169.254/latest/meta-data/"
    with pytest.raises(FetchError, match="not allowed"):
        fetch_bytes(server.base + "/redirect", settings=settings)
    server.redirect_to = "/img.png"  # same host: followed
    assert fetch_image(server.base + "/redirect", settings=settings).size == (24, 16)
    server.redirect_to = "/redirect"  # a loop
    with pytest.raises(FetchError, match="more than 2 redirects"):
        fetch_bytes(server.base + "/redirect", settings=allow(server, max_redirects=2))


def test_dns_failure_is_reported():
    with pytest.raises(FetchError, match="cannot resolve host"):
        fetch_bytes("http://no-such-host.invalid/img.png", settings=FetchSettings(allowed_hosts=("*",)))


def test_unsupported_schemes_are_refused():
    settings = FetchSettings(allowed_hosts=("*",))
    for url in ("file:///etc/passwd", "ftp://example.com/a.png", "gopher://x/", "etc/passwd"):
        with pytest.raises(FetchError, match="unsupported"):
            fetch_bytes(url, settings=settings)
    with pytest.raises(FetchError, match="no image URL"):
        fetch_bytes("  ", settings=settings)


# --- limits and timeouts -----------------------------------------------------------------------------


def test_announced_size_over_the_limit_is_refused(server):
    with pytest.raises(FetchError, match="too large: 1000000000 bytes announced"):
        fetch_bytes(server.base + "/announced-huge", settings=allow(server, max_bytes=100_000))


def test_size_limit_stops_the_stream(server):
    start = time.monotonic()
    with pytest.raises(FetchError, match="too large: more than the limit of 200000 bytes"):
        fetch_bytes(server.base + "/endless", settings=allow(server, max_bytes=200_000))
    assert time.monotonic() - start < 10
    deadline = time.monotonic() + 5
    while not server.aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.aborted, "the client kept the connection open after the limit"
    assert server.sent < 64 * 1024 * 1024


def test_read_timeout(server):
    start = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        fetch_bytes(server.base + "/slow", settings=allow(server, read_timeout=0.5))
    assert time.monotonic() - start < 2.5


def test_total_deadline_against_a_slow_drip(server):
    with pytest.raises(FetchError, match="longer than 0.5 s"):
        fetch_bytes(server.base + "/drip", settings=allow(server, read_timeout=2, total_timeout=0.5))


def test_the_job_deadline_bounds_a_slow_drip(server):
    """The total timeout is 120 s, but the job's deadline is 1 s away: the download stops by then."""
    settings = allow(server, read_timeout=30, total_timeout=120)
    start = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        fetch_bytes(server.base + "/drip", settings=settings, deadline=time.time() + 1.0)
    assert time.monotonic() - start < 2.5
    with pytest.raises(FetchError, match="deadline passed"):
        fetch_bytes(server.base + "/img.png", settings=settings, deadline=time.time() - 1)


def test_presign_fileuri_is_what_label_studio_decodes():
    """Label Studio reads ``fileuri`` from the query string (``+`` becomes a space) and decodes it with
    ``base64.urlsafe_b64decode``; a standard-base64 ``+`` or ``/`` would break the URI."""
    from urllib.parse import parse_qs, urlsplit

    from workers.fetch import presign_url

    uris = ("s3://bucket/a>>?b.png", "gs://b/??>.png", "azure-blob://c/d/e.png?x=1")
    assert {"+", "/"} <= set("".join(base64.b64encode(u.encode()).decode() for u in uris))
    for uri in uris:
        url = presign_url("http://ls:8080", 7, uri)
        assert urlsplit(url).path == "/tasks/7/presign/"
        (fileuri,) = parse_qs(urlsplit(url).query)["fileuri"]
        assert base64.urlsafe_b64decode(fileuri.encode()).decode() == uri


def test_http_errors_carry_the_reason(server):
    with pytest.raises(FetchError, match=r"not found \(HTTP 404\)"):
        fetch_bytes(server.base + "/missing.png", settings=allow(server))
    with pytest.raises(FetchError, match=r"refused access \(HTTP 401\)"):
        fetch_bytes(server.base + "/private", settings=allow(server))


def test_undecodable_bytes_are_a_fetch_error(tmp_path):
    (tmp_path / "notes.png").write_bytes(b"this is not an image")
    settings = FetchSettings(local_files_root=str(tmp_path))
    with pytest.raises(FetchError) as info:
        fetch_image("/data/local-files/?d=notes.png", settings=settings)
    assert isinstance(info.value, UserError) and "notes.png" in str(info.value)


# --- local files, data URIs, request URLs ------------------------------------------------------------


def test_local_files_are_read_from_the_document_root(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a b.png").write_bytes(png_bytes(10, 7))
    settings = FetchSettings(local_files_root=str(tmp_path))
    assert fetch_image("/data/local-files/?d=photos/a%20b.png", settings=settings).size == (10, 7)
    assert fetch_image("/data/local-files/?d=/photos/./a%20b.png", settings=settings).size == (10, 7)


def test_local_files_path_traversal_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (root / "escape").symlink_to(tmp_path)
    settings = FetchSettings(local_files_root=str(root), label_studio_url="http://127.0.0.1:9")
    for d in ("../secret.png", "photos/../../secret.png", "..%2Fsecret.png", "escape/secret.png"):
        with pytest.raises(FetchError, match="path traversal refused"):
            fetch_bytes(f"/data/local-files/?d={d}", settings=settings)
    with pytest.raises(FetchError, match=r"\?d=<path>"):
        fetch_bytes("/data/local-files/", settings=settings)


def test_relative_urls_need_label_studio(tmp_path):
    with pytest.raises(FetchError, match="LABEL_STUDIO_URL is not set"):
        fetch_bytes("/data/upload/1/a.png", settings=FetchSettings())
    with pytest.raises(FetchError, match="LABEL_STUDIO_URL is not set"):
        fetch_bytes(
            "/data/local-files/?d=missing.png", settings=FetchSettings(local_files_root=str(tmp_path))
        )
    with pytest.raises(FetchError, match="presigned by Label Studio"):
        fetch_bytes("s3://bucket/a.png", task_id=1, settings=FetchSettings())
    with pytest.raises(FetchError, match="need the task id"):
        fetch_bytes("gs://bucket/a.png", settings=FetchSettings(label_studio_url="http://127.0.0.1:9"))


def test_data_uri():
    import base64

    uri = "data:image/png;base64," + base64.b64encode(png_bytes(5, 4)).decode()
    assert fetch_image(uri, settings=FetchSettings()).size == (5, 4)
    with pytest.raises(FetchError, match="too large"):
        fetch_bytes(uri, settings=FetchSettings(max_bytes=10))


def test_request_label_studio_url_cannot_redirect_the_token(server):
    settings = FetchSettings(label_studio_url=server.base, api_key="legacy-secret-token")
    # A configured Label Studio wins over whatever the request names: the token goes only there.
    for named in (server.base + "/", "http://evil.example.com", f"http://localhost:{server.port}", "junk"):
        assert fetch_bytes("/img.png", settings=settings, label_studio_url=named)
        assert server.requests[-1][1]["Authorization"] == "Token legacy-secret-token"
    assert len(server.requests) == 4
    # Without one, the request's URL is used only on an allowed host, and never with the token.
    unconfigured = FetchSettings(api_key="legacy-secret-token", allowed_hosts=(f"localhost:{server.port}",))
    with pytest.raises(FetchError, match="not on a host in GROUNDLABEL_ALLOWED_HOSTS"):
        fetch_bytes("/img.png", settings=unconfigured, label_studio_url="http://evil.example.com")
    assert fetch_bytes("/img.png", settings=unconfigured, label_studio_url=f"http://localhost:{server.port}")
    assert "Authorization" not in server.requests[-1][1]
    assert len(server.requests) == 5


def test_settings_from_env(tmp_path):
    env = {
        "LABEL_STUDIO_URL": "http://ls.example.com:8080/",
        "LABEL_STUDIO_API_KEY": " abc ",
        "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path),
        "GROUNDLABEL_ALLOWED_HOSTS": "images.example.com, cdn.example.org:8443 ,",
        "GROUNDLABEL_MAX_IMAGE_BYTES": "1000",
        "GROUNDLABEL_FETCH_READ_TIMEOUT": "2.5",
    }
    settings = Settings.from_env(env).fetch
    assert settings.label_studio_url == "http://ls.example.com:8080"
    assert settings.api_key == "abc" and "abc" not in repr(settings)
    assert settings.allowed_hosts == ("images.example.com", "cdn.example.org:8443")
    assert settings.max_bytes == 1000 and settings.read_timeout == 2.5
    assert settings.host_rule("cdn.example.org", 8443) == "explicit"
    assert settings.host_rule("cdn.example.org", 443) is None
    assert FetchSettings(allowed_hosts=("*.example.com",)).host_rule("a.b.example.com", 443) == "pattern"
    assert FetchSettings(allowed_hosts=("*.example.com",)).host_rule("example.com.evil.org", 443) is None
    with pytest.raises(UserError, match="GROUNDLABEL_FETCH_READ_TIMEOUT"):
        Settings.from_env({"GROUNDLABEL_FETCH_READ_TIMEOUT": "soon"})
    with pytest.raises(UserError, match="LABEL_STUDIO_URL"):
        Settings.from_env({"LABEL_STUDIO_URL": "localhost:8080"})


def test_redact_url():
    assert redact_url("https://user:pw@bucket.s3.amazonaws.com/a.png?X-Amz-Signature=abc") == (
        "https://bucket.s3.amazonaws.com/a.png?<redacted>"
    )
    assert redact_url("/data/local-files/?d=photos/a.png") == "/data/local-files/?d=photos/a.png"
    err = FetchError("https://x.example.com/a.png?token=secret", "boom")
    assert "secret" not in str(err) and "boom" in str(err)


# --- the exporters download through the same layer -----------------------------------------------

LEGACY_TOKEN = "legacy-secret-token"


def _jwt(claims: dict) -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


PERSONAL_TOKEN = _jwt({"token_type": "refresh", "exp": 4102444800, "jti": "pat"})


class _LabelStudioHandler(_Handler):
    """Label Studio's token refresh and uploads; everything else as :class:`_Handler`."""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        server: FakeLabelStudio = self.server  # type: ignore[assignment]
        server.requests.append((self.path, dict(self.headers)))
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path != "/api/token/refresh/" or body.get("refresh") != PERSONAL_TOKEN:
            self._send(401, b'{"detail": "Token is invalid or expired"}')
            return
        server.refreshes += 1
        server.access = _jwt({"token_type": "access", "exp": int(time.time()) + 300, "n": server.refreshes})
        self._send(200, json.dumps({"access": server.access}).encode(), {"Content-Type": "application/json"})

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        server: FakeLabelStudio = self.server  # type: ignore[assignment]
        path = self.path.split("?", 1)[0]
        if not path.startswith("/data/upload/"):
            super().do_GET()
            return
        server.requests.append((self.path, dict(self.headers)))
        accepted = {f"Token {LEGACY_TOKEN}"} | ({f"Bearer {server.access}"} if server.access else set())
        if self.headers.get("Authorization") not in accepted:
            self._send(401)
        elif path == "/data/upload/elsewhere.png":  # a presigned storage URL, as for cloud storage
            self._send(302, headers={"Location": server.redirect_to})
        elif path == "/data/upload/login.png":
            self._send(302, headers={"Location": f"/user/login/?next={path}"})
        else:
            self._send(200, png_bytes(31, 17), {"Content-Type": "image/png"})


class FakeLabelStudio(ImageServer):
    def __init__(self) -> None:
        super().__init__(_LabelStudioHandler)
        self.refreshes = 0
        self.access: str | None = None


@pytest.fixture
def fake_ls():
    srv = FakeLabelStudio()
    clear_token_cache()
    yield srv
    clear_token_cache()
    srv.close()


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def test_export_download_checks_every_redirect(server, other_server, tmp_path):
    from exporters.images import DOWNLOAD_LIMIT, ImageNotFound, ImageResolver

    assert DOWNLOAD_LIMIT == 200 * 1024 * 1024
    assert ImageResolver().fetch_settings().max_bytes == DOWNLOAD_LIMIT
    resolver = ImageResolver()
    # A URL written in the export is the user's choice: fetched even on loopback ...
    resolver.place(server.base + "/img.png", tmp_path / "a.png", "copy")
    assert _size(tmp_path / "a.png") == (24, 16)
    # ... but where it redirects is checked as the workers check it.
    server.redirect_to = f"{other_server.base}/img.png"
    with pytest.raises(ImageNotFound, match=r"not allowed \(not Label Studio, not in --allowed-hosts\)"):
        resolver.place(server.base + "/redirect", tmp_path / "b.png", "copy")
    assert not (tmp_path / "b.png").exists()
    with pytest.raises(ImageNotFound, match="non-public address 127.0.0.1"):
        ImageResolver(allowed_hosts="*").place(server.base + "/redirect", tmp_path / "b.png", "copy")
    server.redirect_to = "http://169.254.169.254/latest/meta-data/"
    with pytest.raises(ImageNotFound, match="non-public address 169.254.169.254"):
        ImageResolver(allowed_hosts=("*",)).place(server.base + "/redirect", tmp_path / "b.png", "copy")
    server.redirect_to = "file:///etc/passwd"
    with pytest.raises(ImageNotFound, match="unsupported URL scheme 'file'"):
        resolver.place(server.base + "/redirect", tmp_path / "b.png", "copy")
    assert other_server.requests == []
    # A host listed explicitly (a private address included) is followed.
    server.redirect_to = f"{other_server.base}/img.png"
    listed = ImageResolver(allowed_hosts=f"127.0.0.1:{other_server.port}")
    listed.place(server.base + "/redirect", tmp_path / "b.png", "copy")
    assert _size(tmp_path / "b.png") == (24, 16) and len(other_server.requests) == 1
    # Non-http schemes are refused at the first hop too.
    with pytest.raises(ImageNotFound, match="not read directly"):
        resolver.place("ftp://example.com/a.png", tmp_path / "c.png", "copy")


def test_export_download_sends_the_token_to_label_studio_only(fake_ls, other_server, tmp_path):
    from exporters.images import ImageNotFound, ImageResolver

    fake_ls.redirect_to = f"{other_server.base}/img.png"
    resolver = ImageResolver(
        label_studio_url=fake_ls.base, api_key=LEGACY_TOKEN, allowed_hosts=f"127.0.0.1:{other_server.port}"
    )
    # Label Studio redirects to "storage": the token goes to Label Studio, not to the redirect target.
    resolver.place("/data/upload/elsewhere.png", tmp_path / "a.png", "copy")
    assert _size(tmp_path / "a.png") == (24, 16)
    assert fake_ls.requests[-1][1]["Authorization"] == f"Token {LEGACY_TOKEN}"
    assert "Authorization" not in other_server.requests[-1][1]
    # An absolute URL on Label Studio's origin gets the token; one on another origin never does.
    resolver.place(fake_ls.base + "/data/upload/1/a.png", tmp_path / "b.png", "copy")
    assert fake_ls.requests[-1][1]["Authorization"] == f"Token {LEGACY_TOKEN}"
    resolver.place(other_server.base + "/img.png", tmp_path / "c.png", "copy")
    assert "Authorization" not in other_server.requests[-1][1]
    # Another host redirecting to Label Studio does not bring the token along.
    other_server.redirect_to = fake_ls.base + "/data/upload/1/a.png"
    with pytest.raises(ImageNotFound, match=r"refused access \(HTTP 401\)"):
        resolver.place(other_server.base + "/redirect", tmp_path / "d.png", "copy")
    assert "Authorization" not in fake_ls.requests[-1][1]
    # Label Studio's own redirect is trusted for one hop, yet a loopback target must be listed.
    with pytest.raises(ImageNotFound, match="non-public address 127.0.0.1"):
        ImageResolver(label_studio_url=fake_ls.base, api_key=LEGACY_TOKEN).place(
            "/data/upload/elsewhere.png", tmp_path / "e.png", "copy"
        )
    # A redirect to the login page means the token was refused.
    with pytest.raises(ImageNotFound, match="redirected to the login page"):
        resolver.place("/data/upload/login.png", tmp_path / "f.png", "copy")
    assert not any(LEGACY_TOKEN in str(h) for p, h in other_server.requests)


def test_export_exchanges_a_personal_access_token_like_the_workers(fake_ls, tmp_path):
    from exporters.images import ImageNotFound, ImageResolver
    from groundlabel.ls_access import LabelStudioAuth

    resolver = ImageResolver(label_studio_url=fake_ls.base, api_key=PERSONAL_TOKEN)
    resolver.place("/data/upload/1/a.png", tmp_path / "a.png", "copy")
    assert _size(tmp_path / "a.png") == (31, 17)
    assert fake_ls.refreshes == 1
    assert fake_ls.requests[-1][1]["Authorization"] == f"Bearer {fake_ls.access}"
    # The workers use the same token class and its cache: no second exchange.
    settings = FetchSettings(label_studio_url=fake_ls.base, api_key=PERSONAL_TOKEN)
    assert fetch_image("/data/upload/1/a.png", settings=settings).size == (31, 17)
    assert fake_ls.refreshes == 1
    auth = LabelStudioAuth(fake_ls.base + "/", PERSONAL_TOKEN)
    assert auth.kind == "personal" and auth.header() == {"Authorization": f"Bearer {fake_ls.access}"}
    assert PERSONAL_TOKEN not in repr(auth)
    # A refused access token is invalidated, exchanged once more and the download retried.
    fake_ls.access = None
    resolver.place("/data/upload/1/a.png", tmp_path / "b.png", "copy")
    assert fake_ls.refreshes == 2 and _size(tmp_path / "b.png") == (31, 17)
    # A personal access token that Label Studio did not issue fails at the refresh endpoint.
    forged = _jwt({"token_type": "refresh", "exp": 4102444800, "jti": "forged"})
    with pytest.raises(ImageNotFound, match="refused the token") as info:
        ImageResolver(label_studio_url=fake_ls.base, api_key=forged).place(
            "/data/upload/1/a.png", tmp_path / "c.png", "copy"
        )
    assert forged not in str(info.value) and fake_ls.refreshes == 2
    # The other kinds of key.
    assert LabelStudioAuth(fake_ls.base, "abc").header() == {"Authorization": "Token abc"}
    access = _jwt({"token_type": "access", "exp": 4102444800})
    assert LabelStudioAuth(fake_ls.base, access).header() == {"Authorization": f"Bearer {access}"}
    assert LabelStudioAuth(fake_ls.base, None).header() == {} == LabelStudioAuth(None, "abc").header()


def test_local_files_and_uploads_resolve_alike_for_workers_and_exporters(tmp_path):
    from exporters.images import ImageNotFound, ImageResolver
    from groundlabel.ls_access import local_files_path, upload_paths

    root = tmp_path / "root"
    files = {
        "pics/a.png": (10, 7),
        "pics/a b.png": (11, 7),
        "pics/a%20b.png": (12, 7),  # a literal percent sign in the name
        "3/up.png": (13, 7),  # ROOT/REST
        "upload/4/up.png": (14, 7),  # ROOT/upload/REST
        "media/upload/5/up.png": (15, 7),  # ROOT/media/upload/REST
    }
    for rel, (w, h) in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(png_bytes(w, h))
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (root / "escape").symlink_to(tmp_path)
    refs = {
        "/data/local-files/?d=pics/a.png": (10, 7),
        "/data/local-files/?d=/pics/./a.png": (10, 7),
        "/data/local-files/?d=pics/a%20b.png": (11, 7),
        "/data/local-files/?d=pics/a%2520b.png": (12, 7),  # decoded once, as Label Studio does
        "/data/upload/3/up.png": (13, 7),
        "/data/upload/4/up.png": (14, 7),
        "/data/upload/5/up.png": (15, 7),
    }
    workers = FetchSettings(local_files_root=str(root), upload_root=str(root))
    resolver = ImageResolver(images_root=root)
    for ref, size in refs.items():
        assert fetch_image(ref, settings=workers).size == size, ref
        assert _size(resolver.locate(ref)) == size, ref
        shared = upload_paths(ref, root) if ref.startswith("/data/upload/") else [local_files_path(ref, root)]
        assert resolver.local_candidates(ref) == shared
    # Outside the roots, with the same reason on both sides (and no HTTP: port 9 is never contacted).
    workers = FetchSettings(
        local_files_root=str(root), upload_root=str(root), label_studio_url="http://127.0.0.1:9"
    )
    resolver = ImageResolver(images_root=root, label_studio_url="http://127.0.0.1:9")
    for ref in (
        "/data/local-files/?d=../secret.png",
        "/data/local-files/?d=pics/../../secret.png",
        "/data/local-files/?d=..%2Fsecret.png",
        "/data/local-files/?d=escape/secret.png",
        "/data/upload/..%2F..%2Fsecret.png",
        "/data/upload/escape/secret.png",
    ):
        with pytest.raises(FetchError, match="path traversal refused"):
            fetch_bytes(ref, settings=workers)
        with pytest.raises(ImageNotFound, match="path traversal refused"):
            resolver.place(ref, tmp_path / "out.png", "copy")
    assert not (tmp_path / "out.png").exists()


def test_export_cli_allowed_hosts(server, other_server, tmp_path, monkeypatch):
    from exporters.synthetic import polygon_result
    from groundlabel_cli import main as cli

    for name in ("GROUNDLABEL_ALLOWED_HOSTS", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    server.redirect_to = f"{other_server.base}/img.png"
    result = polygon_result([[10, 10], [60, 10], [30, 60]], "cat", 24, 16)
    tasks = [
        {
            "id": 1,
            "data": {"image": server.base + "/redirect"},
            "annotations": [{"id": 1, "result": [result]}],
        }
    ]
    src = tmp_path / "export.json"
    src.write_text(json.dumps(tasks))

    def export(out: Path, *extra: str) -> dict:
        assert cli.main(["export", str(src), "--format", "coco", "--out", str(out), "-q", *extra]) == 0
        return json.loads((out / "export_summary.json").read_text())

    refused = export(tmp_path / "refused")
    assert refused["skipped"]["image not found"]["count"] == 1
    assert "--allowed-hosts" in refused["skipped"]["image not found"]["examples"][0]
    assert other_server.requests == []
    allowed = export(tmp_path / "allowed", "--allowed-hosts", f"127.0.0.1:{other_server.port}")
    assert allowed["exported"]["images copied"] == 1
    assert _size(tmp_path / "allowed" / "images" / "redirect") == (24, 16)


# --- a real Label Studio -----------------------------------------------------------------------------

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image"><Label value="Cat"/></PolygonLabels>
</View>"""


@pytest.fixture(scope="module")
def label_studio():
    require_label_studio()
    return shared_label_studio()


@pytest.fixture(scope="module")
def ls_images(label_studio):
    """A project with an uploaded and a local-files image: (project, upload URL, local-files URL)."""
    project = label_studio.create_project("fetch tests", LABEL_CONFIG)
    response = label_studio.api(
        "POST", f"/api/projects/{project}/import", files={"file": ("up.png", png_bytes(31, 17), "image/png")}
    )
    assert response.status_code == 201, response.text
    tasks = label_studio.list_tasks(project)
    upload_url = tasks[0]["data"]["image"]
    assert upload_url.startswith("/data/upload/"), upload_url
    label_studio.add_local_storage(project, "fetchtest")
    (label_studio.files_root / "fetchtest" / "local.png").write_bytes(png_bytes(13, 9))
    return project, upload_url, "/data/local-files/?d=fetchtest/local.png"


def _ls_settings(label_studio, api_key: str | None) -> FetchSettings:
    return FetchSettings(label_studio_url=label_studio.url, api_key=api_key)


@pytest.mark.slow
@pytest.mark.integration
def test_label_studio_legacy_token(label_studio, ls_images):
    _, upload_url, local_url = ls_images
    settings = _ls_settings(label_studio, label_studio.legacy_token)
    assert fetch_image(upload_url, settings=settings).size == (31, 17)
    assert fetch_image(local_url, settings=settings).size == (13, 9)  # through Label Studio over HTTP
    assert fetch_image(label_studio.url + upload_url, settings=settings).size == (31, 17)  # absolute form


@pytest.mark.slow
@pytest.mark.integration
def test_label_studio_personal_access_token(label_studio, ls_images):
    _, upload_url, local_url = ls_images
    clear_token_cache()
    settings = _ls_settings(label_studio, label_studio.personal_access_token())
    assert fetch_image(upload_url, settings=settings).size == (31, 17)
    assert fetch_image(local_url, settings=settings).size == (13, 9)


@pytest.mark.slow
@pytest.mark.integration
def test_label_studio_refuses_a_wrong_token(label_studio, ls_images):
    _, upload_url, _ = ls_images
    for key in ("0123456789abcdef0123456789abcdef01234567", None):
        with pytest.raises(FetchError) as info:
            fetch_bytes(upload_url, settings=_ls_settings(label_studio, key))
        assert REFUSED_TOKEN_REASON in str(info.value)
        assert "0123456789abcdef" not in str(info.value)
    # A personal access token that Label Studio did not issue fails at the refresh endpoint.
    forged = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCIsImV4cCI6NDEwMjQ0NDgwMH0.c2lnbmF0dXJl"
    with pytest.raises(FetchError, match="refused the token"):
        fetch_bytes(upload_url, settings=_ls_settings(label_studio, forged))


@pytest.mark.slow
@pytest.mark.integration
def test_label_studio_missing_file(label_studio, ls_images):
    settings = _ls_settings(label_studio, label_studio.legacy_token)
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_bytes("/data/local-files/?d=fetchtest/none.png", settings=settings)


@pytest.mark.slow
@pytest.mark.integration
def test_local_root_is_read_without_label_studio(label_studio, ls_images):
    _, _, local_url = ls_images
    settings = FetchSettings(
        local_files_root=str(label_studio.files_root), label_studio_url="http://127.0.0.1:9"
    )
    assert fetch_image(local_url, settings=settings).size == (13, 9)  # port 9 is never contacted
    assert Path(label_studio.files_root, "fetchtest", "local.png").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_label_studio_export_reads_the_project_and_its_images(label_studio, ls_images, tmp_path):
    from exporters.images import ImageResolver
    from exporters.labelstudio import fetch_project
    from groundlabel.ls_client import LabelStudioError

    project, upload_url, local_url = ls_images
    for key in (label_studio.legacy_token, label_studio.personal_access_token()):
        clear_token_cache()
        tasks, config, _ = fetch_project(project, url=label_studio.url, api_key=key)
        assert [t["data"]["image"] for t in tasks] == [upload_url] and "PolygonLabels" in config
        resolver = ImageResolver(label_studio_url=label_studio.url, api_key=key)
        assert resolver.size(upload_url) == (31, 17)
        assert resolver.size(local_url) == (13, 9)  # through Label Studio over HTTP
        resolver.close()
    wrong = "0123456789abcdef0123456789abcdef01234567"
    with pytest.raises(LabelStudioError, match="refused the API key") as info:
        fetch_project(project, url=label_studio.url, api_key=wrong)
    assert wrong not in str(info.value)
    with pytest.raises(LabelStudioError, match="no such project"):
        fetch_project(987654, url=label_studio.url, api_key=label_studio.legacy_token)
