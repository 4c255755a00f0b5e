"""The door, the event loop and stopping, against a real ``groundlabel serve`` (a subprocess) on a real
Redis, with no worker (every ``/predict`` waits its whole deadline):

- the body cap covers every path and method: ``/health`` and ``/`` take no body, any other path refuses a
  body over ``GROUNDLABEL_MAX_BODY_BYTES`` from its headers, before reading it;
- bodies are decoded, hashed and serialized off the event loop: ``/health`` answers within 100 ms (p99)
  while 50 MB ``/predict`` bodies, sent by another process, are parsed;
- a 422 never echoes a ``context`` value;
- ``serve`` with a ``/predict`` in flight exits promptly on SIGTERM, answering the request.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USER, PASSWORD = "loop", "loop-secret"
AUTH = "Basic " + __import__("base64").b64encode(f"{USER}:{PASSWORD}".encode()).decode()
CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<PolygonLabels name="poly" toName="image"><Label value="Thing"/></PolygonLabels></View>'
)

#: Sends ``count`` POST /predict requests of a ``mb`` MB inline image, ``parallel`` at a time, from its own
#: process (so that the sender never shares a GIL with the probes); prints one JSON line per request.
UPLOADER = r"""
import base64, http.client, json, os, sys, threading, time
port, auth, count, parallel = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
raw = os.urandom(int(float(sys.argv[5]) * 1e6 * 3 / 4))
image = "data:image/png;base64," + base64.b64encode(raw).decode()
task = {"id": 1, "data": {"image": image}}
body = json.dumps({"tasks": [task], "label_config": sys.argv[6], "project": "3"}).encode()
headers = {"Authorization": auth, "Content-Type": "application/json"}
gate = threading.Semaphore(parallel)
def send(i):
    with gate:
        start = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/predict", body=body, headers=headers)
        answer = conn.getresponse()
        answer.read()
        seconds = time.monotonic() - start
        print(json.dumps({"status": answer.status, "seconds": seconds, "bytes": len(body)}), flush=True)
threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
[t.start() for t in threads]
[t.join() for t in threads]
"""


def start_serve(log_path, env: dict[str, str], ready: str = "UP") -> tuple[subprocess.Popen, int]:
    """``groundlabel serve`` with basic auth and ``env``; returns once ``/health`` says ``ready`` (the
    status, or ``engines`` for the in-process runner's ``ready``)."""
    port = free_port()
    full = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY")
    }
    full.update(env, PYTHONPATH=str(REPO), BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=PASSWORD)
    full.setdefault("GROUNDLABEL_MODEL_VERSION", "loop-test")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "groundlabel", "serve", "--port", str(port)],
            env=full,
            cwd=str(REPO),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, log_path.read_text()
        try:
            status, body = http_get(port, "/health")
            health = json.loads(body)
            if status == 200 and ready in (health.get("status"), health.get("engines")):
                return proc, port
        except (OSError, ValueError):
            pass
        assert time.monotonic() < deadline, f"serve did not start: {log_path.read_text()[-2000:]}"
        time.sleep(0.2)


@pytest.fixture
def serve(redis_url, tiny_gem_env, tmp_path):
    """``groundlabel serve`` with basic auth on Redis (no worker); yields its port."""
    env = {**tiny_gem_env, "REDIS_URL": redis_url, "GROUNDLABEL_PREDICT_TIMEOUT": "4"}
    proc, port = start_serve(tmp_path / "serve.log", env)
    yield port
    proc.terminate()
    proc.wait(30)


def http_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def raw(port: int, head: str, body: bytes = b"", timeout: float = 5.0) -> tuple[bytes, float]:
    """Send a request's head and the start of its body; the answer's status line and the seconds it took."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n", 1)[0], time.monotonic() - start


def test_the_body_cap_covers_every_path_and_method(serve):
    huge = str(300 * 1024 * 1024)
    for method, path, auth in (
        ("POST", "/health", ""),
        ("GET", "/health", ""),
        ("PUT", "/", ""),
        ("POST", "/nowhere", f"Authorization: {AUTH}\r\n"),
        ("DELETE", "/predict", f"Authorization: {AUTH}\r\n"),
        ("POST", "/metrics", f"Authorization: {AUTH}\r\n"),
    ):
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {huge}\r\n"
        status, seconds = raw(serve, head, b"{" + b" " * 65536)
        assert status.startswith(b"HTTP/1.1 413"), (method, path, status)
        assert seconds < 2.0, (method, path, seconds)
    # /health and / read no body: any body is refused, chunked or declared, however small.
    status, _ = raw(serve, "GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n", b"0123456789")
    assert status.startswith(b"HTTP/1.1 413"), status
    chunked = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    status, _ = raw(serve, chunked, b"4\r\nabcd\r\n")
    assert status.startswith(b"HTTP/1.1 413"), status
    assert http_get(serve, "/health")[0] == 200 and http_get(serve, "/")[0] == 200


def probe_health_while(port: int, busy: subprocess.Popen, interval: float = 0.02) -> list[float]:
    """``/health`` latencies (seconds), one request after another on one connection, while ``busy`` runs."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    latencies: list[float] = []
    try:
        while busy.poll() is None:
            start = time.perf_counter()
            conn.request("GET", "/health")
            answer = conn.getresponse()
            answer.read()
            assert answer.status == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(interval)
    finally:
        conn.close()
    return latencies


def test_health_stays_fast_while_50_mb_bodies_are_parsed(serve):
    uploader = subprocess.Popen(
        [sys.executable, "-c", UPLOADER, str(serve), AUTH, "4", "2", "50", CONFIG],
        stdout=subprocess.PIPE,
        text=True,
    )
    latencies = probe_health_while(serve, uploader)
    answers = [json.loads(line) for line in uploader.stdout.read().splitlines()]
    assert [a["status"] for a in answers] == [200] * 4, answers
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    assert len(latencies) >= 50, f"only {len(latencies)} probes"
    assert p99 < 0.1, (
        f"/health p99 {p99 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms over {len(latencies)}"
    )


def test_long_strings_are_written_a_slice_at_a_time_as_json_dumps_would():
    """The payload writer gives json.dumps's exact bytes, escapes and long strings included, and the stored
    zlib stream reads back as the payload."""
    import random
    import zlib

    from groundlabel.redis_queue import LONG_STRING_CHARS, dumps_json, stored_zlib

    rnd = random.Random(3)
    for alphabet in ("abc+/=", 'a"\\\n\x00\x7fé😀\ud800', "x"):
        for length in (10, LONG_STRING_CHARS + 1, 3 * 2**18 + 7):
            text = "".join(rnd.choice(alphabet) for _ in range(length))
            job = (
                "workers.jobs.run_job",
                None,
                ({"tasks": [{"id": 1, "data": {"image": text}}], "n": [text]},),
                {},
            )
            assert dumps_json(job) == json.dumps(job).encode()
    for size in (0, 1, 65535, 65536, 200_001):
        data = rnd.randbytes(size)
        assert zlib.decompress(stored_zlib(data)) == data


def test_a_422_never_echoes_a_context_value(redis_url):
    from fastapi.testclient import TestClient

    from groundlabel.settings import Settings
    from labeling_backend.app import create_app

    secret = "SECRET-value-4711"
    regions = [
        {"type": "keypointlabels", "value": {"x": secret, "y": 1, "keypointlabels": ["Thing"]}},
        {"type": "keypointlabels", "value": {"x": 1, "y": 1, "keypointlabels": secret}},
        {"type": "keypointlabels", "value": {"x": 1, "y": 1, "keypointlabels": [{secret: 1}]}},
        {"type": "rectanglelabels", "value": {"x": 1, "y": 1, "width": [secret], "rectanglelabels": ["T"]}},
        {"type": {secret: 1}, "value": {}},
        {"type": "keypointlabels", "value": secret},
    ]
    settings = Settings.from_env({}, redis_url=redis_url, predict_timeout=0.2, model_version="loop-test")
    with TestClient(create_app(settings)) as client:
        for region in regions:
            body = {
                "tasks": [{"id": 1, "data": {"image": "http://images.invalid/1.png"}}],
                "label_config": CONFIG,
                "params": {"context": {"result": [{"from_name": "poly", "to_name": "image", **region}]}},
            }
            answer = client.post("/predict", json=body)
            assert answer.status_code == 422, (region, answer.text)
            assert "context" in answer.json()["detail"] and secret not in answer.text, answer.text


@pytest.mark.parametrize("runner", ["redis", "inprocess"])
def test_serve_with_a_predict_in_flight_stops_promptly_on_sigterm(runner, redis_url, tiny_gem_env, tmp_path):
    """A /predict waiting for a job (no worker on Redis; an image host that never finishes in-process) with
    a 60 s deadline: SIGTERM answers it at once, saying why, and serve exits within seconds."""
    import signal
    import threading

    from conftest import png_bytes
    from slow_http import SlowImageServer

    with SlowImageServer(png_bytes(40, 30), seconds=120) as slow:
        env = {**tiny_gem_env, "GROUNDLABEL_PREDICT_TIMEOUT": "60", "GROUNDLABEL_ALLOWED_HOSTS": slow.host}
        if runner == "redis":
            env["REDIS_URL"] = redis_url
        proc, port = start_serve(tmp_path / "serve.log", env, ready="UP" if runner == "redis" else "ready")
        answer: dict = {}

        def predict() -> None:
            body = json.dumps({"tasks": [{"id": 1, "data": {"image": slow.url}}], "label_config": CONFIG})
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=90)
            headers = {"Authorization": AUTH, "Content-Type": "application/json"}
            conn.request("POST", "/predict", body=body, headers=headers)
            reply = conn.getresponse()
            answer.update(status=reply.status, body=json.loads(reply.read()))

        request = threading.Thread(target=predict, daemon=True)
        request.start()
        if runner == "inprocess":
            assert slow.started.wait(60), "the job never fetched its image"
        else:
            time.sleep(2.0)  # the request waits for its job
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        finally:
            if proc.poll() is None:
                proc.kill()
        took = time.monotonic() - started
        request.join(10)
        log = (tmp_path / "serve.log").read_text()
        assert took < 5.0, f"serve took {took:.1f} s to stop: {log[-2000:]}"
        assert answer.get("status") == 200, (answer, log[-2000:])
        (error,) = answer["body"]["errors"]
        assert "stopping" in error["error"], error
        assert "Application shutdown complete" in log
