"""Stopping a real ``groundlabel serve`` (in-process jobs) leaves none of its child processes running.

A job is kept busy by a slow image while the server is stopped: with SIGTERM the server stops its
children and exits promptly; killed outright (SIGKILL), its children notice and exit by themselves.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import POLYGON_CONFIG, REPO, free_port, png_bytes
from slow_http import SlowImageServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        out.extend(kids)
        frontier.extend(kids)
    return out


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_stopping_serve_stops_its_children(sig, tiny_gem_env, tmp_path):
    port = free_port()
    with SlowImageServer(png_bytes(40, 30), seconds=60.0) as slow:
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        env.update(tiny_gem_env)
        env.update(
            PYTHONPATH=str(REPO),
            GROUNDLABEL_ALLOWED_HOSTS=slow.host,
            GROUNDLABEL_PREDICT_TIMEOUT="3",
            GROUNDLABEL_MODEL_VERSION="test-stop",
        )
        log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
        serve = subprocess.Popen(
            [sys.executable, "-m", "groundlabel", "serve", "--port", str(port)],
            env=env,
            cwd=str(REPO),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        children: list[int] = []
        try:
            deadline = time.monotonic() + 120
            while True:
                assert serve.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    if httpx.get(f"{base}/health", timeout=2).json().get("engines") == "ready":
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "serve did not get ready"
                time.sleep(0.2)

            task = {"id": 1, "data": {"image": slow.url}}

            def predict() -> None:
                body = {"tasks": [task], "label_config": POLYGON_CONFIG}
                with contextlib.suppress(httpx.HTTPError):  # the server may be killed under the request
                    httpx.post(f"{base}/predict", json=body, timeout=30)

            request = threading.Thread(target=predict, daemon=True)
            request.start()
            assert slow.started.wait(30), "the job never fetched its image"
            children = _descendants(serve.pid)
            assert children, "serve has no child process"

            started = time.monotonic()
            serve.send_signal(sig)
            serve.wait(30)
            left = _wait_gone(children, 15)
            assert not left, f"child processes {left} still run after serve stopped"
            if sig == signal.SIGTERM:
                # uvicorn shuts down gracefully, then re-raises the signal it caught
                assert serve.returncode in (0, -signal.SIGTERM), (tmp_path / "serve.log").read_text()
                assert "Application shutdown complete" in (tmp_path / "serve.log").read_text()
                assert time.monotonic() - started < 20
            request.join(30)
        finally:
            for pid in [serve.pid, *children]:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            serve.wait(10)
            log.close()
