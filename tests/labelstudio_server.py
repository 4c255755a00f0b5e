"""A real Label Studio for the tests: headless, SQLite, a temporary data folder, a free loopback port.

Label Studio lives in its own virtual environment, ``.ls-venv`` (``bash scripts/setup.sh test``). Its
first start migrates a fresh database (about a minute), so one server is shared by every test module
of a pytest session (:func:`shared_label_studio`) and stopped when the session's process exits.

The server is started with legacy tokens enabled and a known legacy token (``LABEL_STUDIO_USER_TOKEN``),
serves local files from ``<data>/files`` (``LOCAL_FILES_SERVING_ENABLED``), and may connect ML backends
on loopback (``SSRF_PROTECTION_ENABLED=false``, ``USE_DEFAULT_BANNED_SUBNETS=false``). A personal
access token is obtained through the login form (:meth:`LabelStudioServer.personal_access_token`).
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
LS_BINARY = REPO / ".ls-venv" / "bin" / "label-studio"
START_TIMEOUT = float(os.environ.get("GROUNDLABEL_TEST_LS_START_TIMEOUT", "300"))

#: The label config of the test projects: polygons (one label with a prompt override) and brush masks.
PROJECT_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image" model_score_threshold="0.0">
    <Label value="Thing" predicted_values="red square,thing"/>
    <Label value="Other"/>
  </PolygonLabels>
  <BrushLabels name="mask" toName="image" model_score_threshold="0.0"><Label value="Thing"/></BrushLabels>
</View>"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def label_studio_available() -> tuple[bool, str]:
    """Whether the tests can start Label Studio, and if not, why."""
    if not LS_BINARY.exists():
        return (
            False,
            f"Label Studio is not installed in {LS_BINARY.parent.parent.name} (bash scripts/setup.sh test)",
        )
    return True, ""


def require_label_studio() -> None:
    """Skip the calling test when Label Studio is not installed; fail under CI=true, where it must be."""
    import pytest

    ok, reason = label_studio_available()
    if ok:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


class LabelStudioServer:
    """One Label Studio process; :meth:`start` blocks until ``/health`` answers."""

    def __init__(self, data_dir: Path, *, port: int | None = None, extra_env: dict[str, str] | None = None):
        self.data_dir = Path(data_dir)
        self.files_root = self.data_dir / "files"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.username = "admin@example.com"
        self.password = secrets.token_urlsafe(12)
        self.legacy_token = secrets.token_hex(20)  # 40 characters: the legacy token's maximum length
        self.extra_env = dict(extra_env or {})
        self.process: subprocess.Popen | None = None
        self.log_path = self.data_dir / "label-studio.log"
        self._pat: str | None = None
        self._lock = threading.Lock()

    # -- process ----------------------------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("LABEL_STUDIO_", "HEARTEX_", "DJANGO_"))
            and k
            not in ("USERNAME", "PASSWORD", "USER_TOKEN", "PORT", "HOST", "DATABASE_NAME", "VIRTUAL_ENV")
        }
        env.update(
            {
                "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
                "LABEL_STUDIO_USERNAME": self.username,
                "LABEL_STUDIO_PASSWORD": self.password,
                "LABEL_STUDIO_USER_TOKEN": self.legacy_token,
                "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
                "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
                "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.files_root),
                "SSRF_PROTECTION_ENABLED": "false",
                "USE_DEFAULT_BANNED_SUBNETS": "false",
                "LATEST_VERSION_CHECK": "false",
                "COLLECT_ANALYTICS": "false",
                "ML_TIMEOUT_PREDICT": "300",
                "ML_TIMEOUT_SETUP": "30",
                "ML_TIMEOUT_HEALTH": "10",
                "ML_CONNECTION_TIMEOUT": "5",
                "OMP_NUM_THREADS": "1",
                "HOME": str(self.data_dir / "home"),
            }
        )
        env.update(self.extra_env)
        return env

    def start(self) -> LabelStudioServer:
        """Start the server and wait until it is healthy; raise RuntimeError with its log if not."""
        if not LS_BINARY.exists():
            raise RuntimeError(f"{LS_BINARY} is missing: run `bash scripts/setup.sh test`")
        self.files_root.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "home").mkdir(exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the process's lifetime
        self.process = subprocess.Popen(
            [
                str(LS_BINARY),
                "start",
                "--no-browser",
                "--internal-host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=self.data_dir,
            env=self.environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self._wait_healthy()
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"Label Studio exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                response = httpx.get(self.url + "/health", timeout=2)
                if response.status_code == 200 and response.json().get("status") == "UP":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(
            f"Label Studio did not answer /health within {START_TIMEOUT:g} s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop the server (its whole process group), politely then firmly."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def __enter__(self) -> LabelStudioServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- API --------------------------------------------------------------------------------------

    def api(self, method: str, path: str, *, token: str | None = None, **kwargs: Any) -> httpx.Response:
        """One API request with the legacy token (or ``token``, sent as ``Token``)."""
        headers = {"Authorization": f"Token {token or self.legacy_token}", **kwargs.pop("headers", {})}
        kwargs.setdefault("timeout", 300)
        return httpx.request(method, self.url + path, headers=headers, **kwargs)

    def api_json(self, method: str, path: str, **kwargs: Any) -> Any:
        """Like :meth:`api`, raising with the answer's body when the status is not 2xx."""
        response = self.api(method, path, **kwargs)
        if response.status_code >= 300:
            raise AssertionError(f"{method} {path} answered {response.status_code}: {response.text[:500]}")
        return response.json() if response.content else None

    def personal_access_token(self) -> str:
        """The admin's personal access token (a JWT refresh token), created once via the login form."""
        with self._lock:
            if self._pat is None:
                self._pat = self._create_pat()
            return self._pat

    def _create_pat(self) -> str:
        with httpx.Client(base_url=self.url, timeout=60, follow_redirects=False) as client:
            page = client.get("/user/login/")
            csrf = client.cookies.get("csrftoken")
            if not csrf:
                match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
                csrf = match.group(1) if match else ""
            login = client.post(
                "/user/login/",
                data={"email": self.username, "password": self.password, "csrfmiddlewaretoken": csrf},
                headers={"Referer": self.url + "/user/login/"},
            )
            if login.status_code not in (200, 302) or "sessionid" not in client.cookies:
                raise RuntimeError(f"login to Label Studio failed: HTTP {login.status_code}")
            csrf = client.cookies.get("csrftoken") or csrf
            response = client.post("/api/token/", headers={"X-CSRFToken": csrf, "Referer": self.url + "/"})
            if response.status_code not in (200, 201):
                raise RuntimeError(f"creating a personal access token failed: HTTP {response.status_code}")
            return response.json()["token"]

    def retrieve_predictions(
        self, project: int, ids: list[int] | None = None, *, timeout: float = 300
    ) -> float:
        """*Retrieve Predictions* as the Data Manager sends it, on every task of ``project`` or on ``ids``;
        the seconds Label Studio took. Raises when it does not answer 200."""
        selected = {"all": True, "excluded": []} if ids is None else {"all": False, "included": ids}
        start = time.monotonic()
        response = self.api(
            "POST",
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project},
            json={"selectedItems": selected},
            timeout=timeout,
        )
        if response.status_code != 200:
            raise AssertionError(
                f"Retrieve Predictions answered {response.status_code}: {response.text[:500]}"
            )
        return time.monotonic() - start

    def create_project(self, title: str, label_config: str) -> int:
        return int(
            self.api_json("POST", "/api/projects", json={"title": title, "label_config": label_config})["id"]
        )

    def add_local_storage(self, project: int, subdir: str) -> int:
        """Connect ``files_root/subdir`` as a local-files import storage of ``project`` (no sync)."""
        path = self.files_root / subdir
        path.mkdir(parents=True, exist_ok=True)
        body = {"project": project, "path": str(path), "use_blob_urls": True, "title": subdir}
        return int(self.api_json("POST", "/api/storages/localfiles", json=body)["id"])

    def import_tasks(self, project: int, tasks: list[dict]) -> list[int]:
        """Import tasks; return the project's task ids in order."""
        self.api_json("POST", f"/api/projects/{project}/import", json=tasks)
        return [t["id"] for t in self.list_tasks(project)]

    def list_tasks(self, project: int) -> list[dict]:
        tasks: list[dict] = []
        page = 1
        while True:
            response = self.api(
                "GET", "/api/tasks", params={"project": project, "page": page, "page_size": 100}
            )
            if response.status_code == 404:
                break
            data = response.json()
            batch = data.get("tasks", []) if isinstance(data, dict) else data
            tasks.extend(batch)
            if not batch or len(tasks) >= int(data.get("total", len(tasks))):
                break
            page += 1
        return sorted(tasks, key=lambda t: t["id"])

    def predictions(self, task_id: int) -> list[dict]:
        return self.api_json("GET", "/api/predictions", params={"task": task_id})


_SHARED: LabelStudioServer | None = None
_SHARED_LOCK = threading.Lock()


def shared_label_studio() -> LabelStudioServer:
    """The session's Label Studio, started on first use and stopped when the process exits."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            data_dir = Path(tempfile.mkdtemp(prefix="groundlabel-ls-"))
            server = LabelStudioServer(data_dir)

            def _cleanup() -> None:
                server.stop()
                shutil.rmtree(data_dir, ignore_errors=True)

            atexit.register(_cleanup)
            server.start()
            _SHARED = server
        return _SHARED
