"""The backend under hostile load: huge unauthenticated bodies, and /health while /predict requests wait.

Everything runs on loopback: a ``redis-server`` on a free port and ``groundlabel serve`` (uvicorn) with
basic auth, started by this script; no worker, so every ``/predict`` waits its whole deadline.

Scenarios:
- ``huge-body``: one unauthenticated POST of ``--body-mb`` MB to ``/predict`` (a JSON body streamed from a
  raw socket), then ``--parallel`` of them at once: seconds until the answer's status line arrives, the
  status, and the backend's peak resident memory (``VmHWM``);
- ``health``: ``--waiting`` ``/predict`` requests waiting for jobs no worker runs, and meanwhile
  ``--probes`` ``/health`` calls one after another: their latency p50 and max.

    .venv/bin/python benchmarks/backend_hardening.py [--body-mb 300] [--parallel 4] [--waiting 60]
        [--repo PATH]

``--repo`` runs the backend of another checkout (for before/after figures). Writes
``benchmarks/results/backend_hardening.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "backend_hardening.json"
sys.path.insert(0, str(REPO))

from benchmarks.common import write_result  # noqa: E402

CONFIG = """<View><Image name="image" value="$image"/>
<PolygonLabels name="poly" toName="image"><Label value="Thing"/></PolygonLabels></View>"""
AUTH = ("bench", "bench-secret")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (``VmHWM``), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def huge_post(port: int, megabytes: int) -> tuple[float, str]:
    """Stream an unauthenticated ``megabytes`` MB JSON body; seconds until the status line, and the status."""
    size = megabytes * 1024 * 1024
    sock = socket.create_connection(("127.0.0.1", port), timeout=600)
    head = (
        f"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()
    start = time.perf_counter()
    sock.sendall(head)

    def send_body() -> None:
        prefix, suffix, block = b'{"tasks": [', b"]}", b" " * (1 << 20)
        remaining = size - len(prefix) - len(suffix)
        try:
            sock.sendall(prefix)
            while remaining > 0:
                n = min(len(block), remaining)
                sock.sendall(block[:n])
                remaining -= n
            sock.sendall(suffix)
        except OSError:  # the server answered and closed the connection
            pass

    sender = threading.Thread(target=send_body, daemon=True)
    sender.start()
    data = b""
    try:
        while b"\r\n" not in data:
            piece = sock.recv(4096)
            if not piece:
                break
            data += piece
    except OSError:
        pass
    took = time.perf_counter() - start
    sock.close()
    sender.join(5)
    return took, data.split(b"\r\n", 1)[0].decode(errors="replace") or "(connection closed)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--body-mb", type=int, default=300)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--parallel-mb", type=int, default=200)
    parser.add_argument("--waiting", type=int, default=60)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--predict-timeout", type=float, default=20.0)
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose backend is run")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="groundlabel-hardening-"))
    redis_port, port = free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(args.repo),
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "BASIC_AUTH_USER": AUTH[0],
        "BASIC_AUTH_PASS": AUTH[1],
        "GROUNDLABEL_MODEL_VERSION": "bench",
        "GROUNDLABEL_PREDICT_TIMEOUT": str(args.predict_timeout),
    }
    procs = []
    rows: list[dict] = []
    try:
        redis_args = ["--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        procs.append(
            subprocess.Popen(
                [shutil.which("redis-server") or "redis-server", *redis_args],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        log = open(tmp / "backend.log", "wb")  # noqa: SIM115
        backend = subprocess.Popen(
            [sys.executable, "-m", "groundlabel", "serve", "--port", str(port), "--log-level", "warning"],
            env=env,
            cwd=str(args.repo),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(backend)
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        base_rss = peak_rss_mb(backend.pid)

        took, status = huge_post(port, args.body_mb)
        rows.append(
            {
                "scenario": f"1 x {args.body_mb} MB, no credentials",
                "seconds": round(took, 2),
                "status": status,
                "peak_rss_mb": peak_rss_mb(backend.pid),
                "rss_at_start_mb": base_rss,
            }
        )
        with ThreadPoolExecutor(args.parallel) as pool:
            start = time.perf_counter()
            answers = list(pool.map(lambda _: huge_post(port, args.parallel_mb), range(args.parallel)))
            wall = time.perf_counter() - start
        rows.append(
            {
                "scenario": f"{args.parallel} x {args.parallel_mb} MB at once, no credentials",
                "seconds": round(wall, 2),
                "status": ", ".join(sorted({a[1] for a in answers})),
                "peak_rss_mb": peak_rss_mb(backend.pid),
                "rss_at_start_mb": base_rss,
            }
        )

        def predict(i: int) -> int:
            body = {
                "tasks": [{"id": 900_000 + i, "data": {"image": f"http://x/{i}.png"}}],
                "label_config": CONFIG,
            }
            r = httpx.post(url + "/predict", json=body, auth=AUTH, timeout=args.predict_timeout + 60)
            return r.status_code

        prober = httpx.Client(base_url=url, timeout=args.predict_timeout + 60)  # one kept-alive connection

        def probe(n: int) -> np.ndarray:
            out = []
            for _ in range(n):
                start = time.perf_counter()
                prober.get("/health")
                out.append((time.perf_counter() - start) * 1000)
                time.sleep(0.05)
            return np.array(out)

        idle = probe(args.probes)
        rows.append(
            {
                "scenario": "/health, nothing waiting",
                "health_p50_ms": round(float(np.median(idle)), 1),
                "health_max_ms": round(float(idle.max()), 1),
            }
        )
        with ThreadPoolExecutor(args.waiting) as pool:
            futures = [pool.submit(predict, i) for i in range(args.waiting)]
            time.sleep(2.0)
            probes = probe(args.probes)
            print("probes (ms):", " ".join(f"{p:.0f}" for p in probes))
            waiting = sum(not f.done() for f in futures)
            for f in futures:
                f.result()
        lat = np.array(probes)
        rows.append(
            {
                "scenario": f"/health with {args.waiting} /predict waiting",
                "waiting_at_end": waiting,
                "health_p50_ms": round(float(np.percentile(lat, 50)), 1),
                "health_max_ms": round(float(lat.max()), 1),
            }
        )
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"repo={args.repo} cpu_count={os.cpu_count()} load={os.getloadavg()[0]:.1f}")
    for row in rows:
        print("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
    write_result(RESULTS, {"args": {**vars(args), "repo": str(args.repo)}, "rows": rows})
    print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
