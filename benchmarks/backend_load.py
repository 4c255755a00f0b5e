"""Load on the ML backend: /predict requests per second and latency, and task throughput per worker count.

Everything runs on loopback: a ``redis-server`` on a free port, ``groundlabel serve`` (uvicorn) and
``groundlabel worker`` processes started by this script, driven by an httpx async client with a bounded
number of requests in flight. GEM runs with random weights (``--model tiny``: a 3-block ViT, which
measures the service around the model; ``--model ViT-B-16`` for the real architecture).

Scenarios:
- ``interactive``: single-task requests with a typed text prompt (interactive queue), each task new, so
  every request is a job on the warm worker;
- ``cached``: the same requests again, answered from the result cache;
- ``batch-1w`` / ``batch-2w``: whole-project style requests of ``--chunk`` tasks each, end-to-end task
  throughput with one and two workers.

    .venv/bin/python benchmarks/backend_load.py [--requests 200] [--concurrency 16] [--tasks 96]
Writes ``benchmarks/results/backend_load.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
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

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.procs: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(args, env=self.env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)
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

    def start_backend(self) -> str:
        port = free_port()
        self._spawn(
            [sys.executable, "-m", "groundlabel", "serve", "--port", str(port), "--log-level", "warning"],
            "backend",
        )
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
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="groundlabel-bench-"))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
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
    stack = Stack(env, tmp)
    rows: list[dict] = []
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
        bodies = [interactive(i) for i in range(args.requests)]
        rows.append(
            {"scenario": "interactive", "workers": 1, **asyncio.run(drive(url, bodies, args.concurrency))}
        )
        rows.append({"scenario": "cached", "workers": 1, **asyncio.run(drive(url, bodies, args.concurrency))})

        def batches(offset: int) -> list[dict]:
            ids = list(range(offset, offset + args.tasks))
            return [
                {
                    "tasks": [{"id": i, "data": {"image": image}} for i in ids[s : s + args.chunk]],
                    "label_config": CONFIG,
                }
                for s in range(0, len(ids), args.chunk)
            ]

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
    print(
        f"model={args.model} gem_input={args.image_size} image={args.image}x{args.image * 3 // 4} "
        f"chunk={args.chunk} cpu_count={os.cpu_count()}"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"args": vars(args), "machine": platform.platform(), "cpu_count": os.cpu_count(), "rows": rows},
            indent=2,
        )
    )
    print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
