"""Image fetching: host policy (SSRF), redirects, limits, timeouts, local files, Label Studio tokens.

Plain-HTTP cases run against small servers on loopback started here; the token cases run against a
real Label Studio (``tests/labelstudio_server.py``).
"""

from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from labelstudio_server import require_label_studio, shared_label_studio
from PIL import Image

from groundlabel.errors import UserError
from workers.fetch import (
    REFUSED_TOKEN_REASON,
    FetchError,
    FetchSettings,
    clear_token_cache,
    fetch_bytes,
    fetch_image,
    redact_url,
)


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

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
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
    settings = FetchSettings.from_env(env)
    assert settings.label_studio_url == "http://ls.example.com:8080"
    assert settings.api_key == "abc" and "abc" not in repr(settings)
    assert settings.allowed_hosts == ("images.example.com", "cdn.example.org:8443")
    assert settings.max_bytes == 1000 and settings.read_timeout == 2.5
    assert settings.host_rule("cdn.example.org", 8443) == "explicit"
    assert settings.host_rule("cdn.example.org", 443) is None
    assert FetchSettings(allowed_hosts=("*.example.com",)).host_rule("a.b.example.com", 443) == "pattern"
    assert FetchSettings(allowed_hosts=("*.example.com",)).host_rule("example.com.evil.org", 443) is None
    with pytest.raises(UserError, match="GROUNDLABEL_FETCH_READ_TIMEOUT"):
        FetchSettings.from_env({"GROUNDLABEL_FETCH_READ_TIMEOUT": "soon"})
    with pytest.raises(UserError, match="LABEL_STUDIO_URL"):
        FetchSettings.from_env({"LABEL_STUDIO_URL": "localhost:8080"})


def test_redact_url():
    assert redact_url("https://user:pw@bucket.s3.amazonaws.com/a.png?X-Amz-Signature=abc") == (
        "https://bucket.s3.amazonaws.com/a.png?<redacted>"
    )
    assert redact_url("/data/local-files/?d=photos/a.png") == "/data/local-files/?d=photos/a.png"
    err = FetchError("https://x.example.com/a.png?token=secret", "boom")
    assert "secret" not in str(err) and "boom" in str(err)


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
