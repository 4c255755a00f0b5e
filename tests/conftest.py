"""Shared test fixtures: a real redis-server per session, tiny random-weight GEM models, worker processes.

- ``redis_server``: a ``redis-server`` on a free loopback port (no persistence), started once per session
  and stopped at the end; ``redis_url`` gives it flushed for each test.
- ``tiny_gem_config`` / ``tiny_gem_env``: an open_clip model-config JSON file for a tiny ViT and the
  environment variables that make a worker build GEM on it with random weights.
- ``make_tiny_gem_engine()``: the same engine in the test process.
- ``start_worker``: real ``groundlabel worker`` subprocesses, killed at the end of the test.
- ``png_data_uri`` / ``png_header_only``: images inside task data, no HTTP server needed.
- ``label_studio_session`` / ``serve_backend``: the session's real Label Studio and one ``groundlabel serve``
  on the tiny model connected to it, shared by the end-to-end and the browser tests.
- ``serve_process(env, log_path)``: another ``groundlabel serve`` with its own environment, for one test.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GROUNDLABEL_CPU_PRECISION", "fp32")  # the workers the tests start: fp32 anywhere

REPO = Path(__file__).resolve().parents[1]

#: A tiny CLIP ViT (3 blocks, width 48, patch 8) in open_clip's model-config format.
TINY_GEM_CONFIG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 48, "head_width": 12, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server process, without persistence unless ``extra_args`` asks (``--appendonly yes``)."""

    def __init__(self, port: int | None = None, extra_args: list[str] | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (bash scripts/setup.sh test installs it)")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--loglevel",
                "warning",
                *(extra_args or []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for this test."""
    client = redis_server.client()
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def tiny_gem_config(tmp_path_factory) -> Path:
    """An open_clip model-config file ``tinyclip.json`` (model name ``tinyclip``)."""
    path = tmp_path_factory.mktemp("gem") / "tinyclip.json"
    path.write_text(json.dumps(TINY_GEM_CONFIG))
    return path


@pytest.fixture(scope="session")
def tiny_gem_env(tiny_gem_config: Path) -> dict[str, str]:
    """Environment variables for a worker running GEM on the tiny model with random weights."""
    return {
        "GROUNDLABEL_GEM_MODEL_CONFIG": str(tiny_gem_config),
        "GROUNDLABEL_GEM_PRETRAINED": "none",
        "GROUNDLABEL_GEM_IMAGE_SIZE": "64",
        "GROUNDLABEL_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread for the test: small models train fastest so, and CI's two cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tiny_gem_engine(seed: int = 0, image_size: int = 64, **options):
    """A GemEngine on the tiny CLIP with random weights, built in this process (``options``: more
    :class:`GemConfig` fields)."""
    import open_clip
    import torch
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from workers.models.gem import GemConfig, GemEngine

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=TINY_GEM_CONFIG["embed_dim"],
        vision_cfg=CLIPVisionCfg(**TINY_GEM_CONFIG["vision_cfg"]),
        text_cfg=CLIPTextCfg(**TINY_GEM_CONFIG["text_cfg"]),
    ).eval()
    config = GemConfig(model_name="tinyclip", pretrained=None, image_size=image_size, device="cpu", **options)
    return GemEngine(config, clip_model=model)


class WorkerProcess:
    """A real ``groundlabel worker`` subprocess."""

    def __init__(
        self,
        redis_url: str,
        env: dict[str, str],
        *,
        heartbeat: float = 0.5,
        extra_args: list[str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        full_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "groundlabel",
                "worker",
                "--redis-url",
                redis_url,
                "--heartbeat",
                str(heartbeat),
                "--maintenance-interval",
                "2",
                *(extra_args or []),
            ],
            env=full_env,
            cwd=str(REPO),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, redis_url: str, timeout: float = 60.0) -> None:
        """Wait until the worker has registered itself in Redis (models loaded)."""
        import redis
        from rq import Worker

        conn = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {self.proc.returncode}: {self.output()}")
                if any(w.pid == self.proc.pid for w in Worker.all(connection=conn)):
                    return
                time.sleep(0.1)
        finally:
            conn.close()
        raise RuntimeError(f"worker not ready after {timeout} s: {self.output()}")

    def output(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-3000:]
        return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not subprocess.DEVNULL:
            self._log.close()


@pytest.fixture
def start_worker(tmp_path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``groundlabel worker`` processes; each is killed when the test ends."""
    started: list[WorkerProcess] = []

    def start(redis_url: str, env: dict[str, str], **kwargs) -> WorkerProcess:
        worker = WorkerProcess(redis_url, env, log_path=tmp_path / f"worker{len(started)}.log", **kwargs)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


def png_bytes(width: int = 40, height: int = 30, seed: int = 0, noise: float = 40) -> bytes:
    """A small RGB PNG with a bright square on a dark background (uniform noise up to ``noise``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = (rng.random((height, width, 3)) * noise).astype(np.uint8)
    pixels[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = (220, 60, 40)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def png_data_uri(width: int = 40, height: int = 30, seed: int = 0) -> str:
    """A ``data:image/png;base64,...`` URL holding :func:`png_bytes`."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(width, height, seed)).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces ``width`` × ``height`` pixels but which holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


POLYGON_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image" model_score_threshold="0.0">
    <Label value="Thing" predicted_values="red square,thing"/>
    <Label value="Other"/>
  </PolygonLabels>
</View>
"""

INTERACTIVE_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image"/>
  <KeyPointLabels name="click" toName="image"><Label value="Thing"/></KeyPointLabels>
  <BrushLabels name="mask" toName="image" model_score_threshold="0.0"><Label value="Thing"/></BrushLabels>
</View>
"""


def brush_config(labels: list[str]) -> str:
    """A label config of one brush-mask control with these labels, every prediction shown (threshold 0)."""
    return (
        '<View><Image name="image" value="$image"/>'
        '<BrushLabels name="mask" toName="image" model_score_threshold="0.0">'
        + "".join(f'<Label value="{c}"/>' for c in labels)
        + "</BrushLabels></View>"
    )


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without groundlabel's connection settings, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "GROUNDLABEL_MODEL_VERSION")
    }
    env.update(extra)
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.fixture(scope="session")
def label_studio_session():
    """The session's real Label Studio (``tests/labelstudio_server.py``); skipped when not installed."""
    from labelstudio_server import require_label_studio, shared_label_studio

    require_label_studio()
    return shared_label_studio()


@contextlib.contextmanager
def serve_process(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """``groundlabel serve`` on a free port with ``env``; yields its URL once the engines are loaded (on
    Redis: once it answers) and stops it at the end."""
    import httpx

    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "groundlabel", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"groundlabel serve exited: {log_path.read_text()[-3000:]}")
            try:
                health = httpx.get(url + "/health", timeout=2).json()
                on_redis = "engines" not in health and health.get("status") == "UP"  # workers load them
                if health.get("engines") == "ready" or on_redis:
                    break
                if str(health.get("engines", "")).startswith("failed"):
                    raise RuntimeError(f"engines failed: {health}")
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"backend not ready: {log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="session")
def serve_backend(label_studio_session, tiny_gem_env, tmp_path_factory) -> Iterator[str]:
    """``groundlabel serve`` on a free port with GEM on the tiny random CLIP (jobs in-process), downloading
    images from the session's Label Studio with a personal access token; yields its URL once the engines
    are loaded. One per session: the end-to-end and the browser tests share it."""
    log_path = tmp_path_factory.mktemp("backend") / "serve.log"
    env = clean_env(
        {
            **tiny_gem_env,
            "LABEL_STUDIO_URL": label_studio_session.url,
            "LABEL_STUDIO_API_KEY": label_studio_session.personal_access_token(),
        }
    )
    with serve_process(env, log_path) as url:
        yield url


def _pin_engines_to_fp32() -> Callable:
    """Engines built in the tests resolve ``auto`` precisions as on a CPU without native bf16, so every
    output compared with a reference is fp32 on any machine (a test asking for bf16 says so, with
    ``cpu_precision="bf16"`` or a CPU's flags). Pinned when this file is imported, before any fixture of
    module or session scope builds an engine; :func:`_engines_in_fp32` restores it after a test that
    patched it. Workers started by the tests get ``GROUNDLABEL_CPU_PRECISION=fp32`` from this process's
    environment (set above)."""
    from workers.models import cpu

    pinned = without_native_bf16(cpu.machine_cpu())

    def machine_cpu() -> cpu.CpuInfo:
        return pinned

    cpu.machine_cpu = machine_cpu
    return machine_cpu


@pytest.fixture(autouse=True)
def _engines_in_fp32(monkeypatch) -> None:
    """Each test starts with the tests' view of the CPU (:func:`_pin_engines_to_fp32`), whatever an
    earlier test patched."""
    from workers.models import cpu

    monkeypatch.setattr(cpu, "machine_cpu", _PINNED_MACHINE_CPU)


def without_native_bf16(info):
    """``info`` (a :class:`workers.models.cpu.CpuInfo`) less its native-bf16 flags: how the tests see the
    machine's CPU."""
    from workers.models import cpu

    return cpu.CpuInfo(info.model, info.flags - set(cpu.BF16_FLAGS))


_PINNED_MACHINE_CPU = _pin_engines_to_fp32()
