"""Load on the ML backend: /predict requests per second and latency, and task throughput per worker count.

Everything runs on loopback: a ``redis-server`` on a free port, ``groundlabel serve`` (uvicorn) and
``groundlabel worker`` processes started by this script, driven by an httpx async client with a bounded
number of requests in flight. GEM runs with random weights (``--model tiny``: a 3-block ViT, which
measures the service around the model; ``--model ViT-B-16`` for the real architecture).

Scenarios:
- ``overhead``: ``--overhead`` single-task interactive requests one at a time (concurrency 1), each task new,
  first on RQ/Redis, then on the in-process runner (``groundlabel serve`` without ``REDIS_URL``); for each
  request the backend's overhead is its latency minus the job function's own time on the worker (read
  from ``groundlabel_job_run_seconds`` in ``/metrics`` before and after it): HTTP, enqueueing, the
  worker picking the job up, and the backend seeing it finish;
- ``interactive``: single-task requests with a typed text prompt (interactive queue), each task new, so
  every request is a job on the warm worker;
- ``cached``: the same requests again, answered from the result cache;
- ``batch-1w`` / ``batch-2w``: whole-project style requests of ``--chunk`` tasks each, end-to-end task
  throughput with one and two workers.

    .venv/bin/python benchmarks/backend_load.py [--requests 200] [--concurrency 16] [--tasks 96]
        [--overhead 200] [--scenarios overhead,interactive,cached,batch] [--repo PATH]
Writes ``benchmarks/results/backend_load.json``. ``--repo`` runs the services of another checkout (for
before/after figures); a checkout without ``groundlabel_job_run_seconds`` reports latency only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "backend_load.json"
sys.path.insert(0, str(REPO))

from benchmarks.common import write_result  # noqa: E402

TINY = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 48, "head_width": 12, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image"/>
  <PolygonLabels name="poly" toName="image"><Label value="Thing" predicted_values="red square"/>
  <Label value="Other"/></PolygonLabels>
</View>"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_uri(width: int, height: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = (rng.random((height, width, 3)) * 60).astype(np.uint8)
    pixels[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = (220, 50, 40)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Stack:
    """redis-server, the backend and workers as subprocesses."""

    def __init__(self, env: dict[str, str], logs: Path, repo: Path = REPO) -> None:
        self.env, self.logs, self.repo = env, logs, repo
        self.procs: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(args, env=self.env, cwd=str(self.repo), stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def start_redis(self) -> str:
        port = free_port()
        self._spawn(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            "redis",
        )
        url = f"redis://127.0.0.1:{port}/0"
        self.env["REDIS_URL"] = url
        import redis

        client = redis.Redis.from_url(url)
        for _ in range(200):
            try:
                client.ping()
                return url
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def start_backend(self, *, inprocess: bool = False) -> str:
        port = free_port()
        env = dict(self.env)
        if inprocess:
            self.env.pop("REDIS_URL", None)
        proc = self._spawn(
            [sys.executable, "-m", "groundlabel", "serve", "--port", str(port), "--log-level", "warning"],
            "backend-inprocess" if inprocess else "backend",
        )
        self.env = env
        self.backend = proc
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the backend did not start")

    def start_worker(self, url: str) -> None:
        proc = self._spawn(
            [sys.executable, "-m", "groundlabel", "worker", "--log-level", "WARNING"],
            f"worker{len(self.workers)}",
        )
        self.workers.append(proc)
        want = len(self.workers)
        for _ in range(3000):
            if httpx.get(url + "/health", timeout=2).json().get("workers", 0) >= want:
                return
            if proc.poll() is not None:
                raise RuntimeError("a worker exited; see its log")
            time.sleep(0.1)
        raise RuntimeError("the worker did not register")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _run_seconds(client: httpx.Client) -> float | None:
    """``groundlabel_job_run_seconds``' sum over the queues; None when the backend has no such metric."""
    text = client.get("/metrics").text
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("groundlabel_job_run_seconds_sum")
    ]
    return sum(values) if "groundlabel_job_run_seconds" in text else None


def overhead(url: str, bodies: list[dict]) -> dict:
    """Requests one at a time: latency, model time (the job's own run time) and the difference."""
    latency, model, failures = [], [], 0
    with httpx.Client(base_url=url, timeout=120) as client:
        for body in bodies:
            before = _run_seconds(client)
            start = time.perf_counter()
            r = client.post("/predict", json=body)
            latency.append(time.perf_counter() - start)
            after = _run_seconds(client)
            if r.status_code != 200 or r.json().get("errors"):
                failures += 1
            if before is not None and after is not None:
                model.append(after - before)
    lat = np.array(latency) * 1000
    row = {
        "requests": len(bodies),
        "concurrency": 1,
        "failed_requests": failures,
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
    }
    if model:
        over = lat - np.array(model) * 1000
        row.update(
            model_p50_ms=round(float(np.percentile(np.array(model) * 1000, 50)), 1),
            overhead_p50_ms=round(float(np.percentile(over, 50)), 1),
            overhead_p99_ms=round(float(np.percentile(over, 99)), 1),
        )
    return row


async def drive(url: str, bodies: list[dict], concurrency: int) -> dict:
    """Send ``bodies`` to /predict with at most ``concurrency`` in flight; latency and throughput."""
    latencies: list[float] = []
    failures = 0
    tasks_done = 0
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(body: dict) -> None:
            nonlocal failures, tasks_done
            async with sem:
                start = time.perf_counter()
                r = await client.post("/predict", json=body)
                latencies.append(time.perf_counter() - start)
                data = r.json()
                if r.status_code != 200 or data.get("errors"):
                    failures += 1
                tasks_done += sum(
                    1 for x in data.get("results", []) if isinstance(x, dict) and "error" not in x
                )

        start = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {
        "requests": len(bodies),
        "concurrency": concurrency,
        "failed_requests": failures,
        "tasks": tasks_done,
        "wall_s": round(wall, 3),
        "req_per_s": round(len(bodies) / wall, 1),
        "tasks_per_s": round(tasks_done / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="interactive / cached requests")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tasks", type=int, default=96, help="tasks per batch scenario")
    parser.add_argument("--chunk", type=int, default=8, help="tasks per batch request (and per job)")
    parser.add_argument("--model", default="tiny", help="'tiny' or an open_clip ViT name (random weights)")
    parser.add_argument("--image-size", type=int, default=64, help="GEM input size")
    parser.add_argument("--image", type=int, default=320, help="task image width (height = 3/4 of it)")
    parser.add_argument("--overhead", type=int, default=200, help="requests of the overhead scenario")
    parser.add_argument("--scenarios", default="overhead,interactive,cached,batch")
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose services are run")
    args = parser.parse_args(argv)
    scenarios = set(args.scenarios.split(","))

    load_before = os.getloadavg()  # the machine may be shared: report how busy it was
    tmp = Path(tempfile.mkdtemp(prefix="groundlabel-bench-"))
    env = {
        **os.environ,
        "PYTHONPATH": str(args.repo),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "GROUNDLABEL_GEM_PRETRAINED": "none",
        "GROUNDLABEL_GEM_IMAGE_SIZE": str(args.image_size),
        "GROUNDLABEL_DEVICE": "cpu",
        "GROUNDLABEL_CHUNK_SIZE": str(args.chunk),
        "GROUNDLABEL_MODEL_VERSION": "bench",
        "GROUNDLABEL_PREDICT_TIMEOUT": "85",
    }
    for key in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "GROUNDLABEL_API_TOKEN"):
        env.pop(key, None)
    if args.model == "tiny":
        (tmp / "tinyclip.json").write_text(json.dumps(TINY))
        env["GROUNDLABEL_GEM_MODEL_CONFIG"] = str(tmp / "tinyclip.json")
    else:
        env["GROUNDLABEL_GEM_MODEL"] = args.model
    image = image_uri(args.image, args.image * 3 // 4)
    stack = Stack(env, tmp, args.repo.resolve())
    rows: list[dict] = []
    overhead_rows: list[dict] = []
    try:
        stack.start_redis()
        url = stack.start_backend()
        stack.start_worker(url)
        context = {
            "result": [
                {
                    "type": "textarea",
                    "from_name": "prompt",
                    "to_name": "image",
                    "value": {"text": ["the red square"]},
                }
            ]
        }

        def interactive(i: int) -> dict:
            return {
                "tasks": [{"id": i, "data": {"image": image}}],
                "label_config": CONFIG,
                "params": {"context": context},
            }

        asyncio.run(drive(url, [interactive(10_000_000 + i) for i in range(4)], 2))  # warm the text cache
        if "overhead" in scenarios:
            bodies = [interactive(20_000_000 + i) for i in range(args.overhead)]
            overhead_rows.append({"runner": "redis", **overhead(url, bodies)})
            local = stack.start_backend(inprocess=True)
            for _ in range(3000):  # the child loads the engines
                if httpx.get(local + "/health", timeout=2).json().get("engines") in ("ready", None):
                    break
                time.sleep(0.1)
            overhead(local, [interactive(30_000_000 + i) for i in range(4)])  # warm the child
            bodies = [interactive(40_000_000 + i) for i in range(args.overhead)]
            overhead_rows.append({"runner": "in-process", **overhead(local, bodies)})
            stack.backend.send_signal(signal.SIGTERM)
        bodies = [interactive(i) for i in range(args.requests)]
        if "interactive" in scenarios:
            rows.append(
                {"scenario": "interactive", "workers": 1, **asyncio.run(drive(url, bodies, args.concurrency))}
            )
        if "cached" in scenarios:
            rows.append(
                {"scenario": "cached", "workers": 1, **asyncio.run(drive(url, bodies, args.concurrency))}
            )

        def batches(offset: int) -> list[dict]:
            ids = list(range(offset, offset + args.tasks))
            return [
                {
                    "tasks": [{"id": i, "data": {"image": image}} for i in ids[s : s + args.chunk]],
                    "label_config": CONFIG,
                }
                for s in range(0, len(ids), args.chunk)
            ]

        if "batch" in scenarios:
            rows.append(
                {
                    "scenario": "batch",
                    "workers": 1,
                    **asyncio.run(drive(url, batches(1_000_000), args.concurrency)),
                }
            )
            stack.start_worker(url)
            rows.append(
                {
                    "scenario": "batch",
                    "workers": 2,
                    **asyncio.run(drive(url, batches(2_000_000), args.concurrency)),
                }
            )
    finally:
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    header = [
        "scenario",
        "workers",
        "requests",
        "concurrency",
        "tasks",
        "failed_requests",
        "wall_s",
        "req_per_s",
        "tasks_per_s",
        "p50_ms",
        "p99_ms",
    ]
    load = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]}
    print(
        f"model={args.model} gem_input={args.image_size} image={args.image}x{args.image * 3 // 4} "
        f"chunk={args.chunk} cpu_count={os.cpu_count()} load_average(1,5,15 min)={load}"
    )
    if rows:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(str(row[h]) for h in header) + " |")
    if overhead_rows:
        columns = ["runner", "requests", "failed_requests", "p50_ms", "p99_ms", "model_p50_ms",
                   "overhead_p50_ms", "overhead_p99_ms"]  # fmt: skip
        print("\n/predict at concurrency 1: latency, model time and the backend's overhead over it")
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for row in overhead_rows:
            print("| " + " | ".join(str(row.get(c, "-")) for c in columns) + " |")
    report = {"load_average": load, "rows": rows, "overhead": overhead_rows}
    write_result(RESULTS, {"args": {**vars(args), "repo": str(args.repo)}, **report})
    print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
